"""The model: its config, the dense tower in TensorFlow, evaluation metrics."""
