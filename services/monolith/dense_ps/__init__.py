"""The dense parameter server: the dense tower's tensors, their optimizer, pull and push."""
