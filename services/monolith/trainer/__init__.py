"""The trainer: looks up embeddings, runs the dense tower in TensorFlow, pushes gradients."""
