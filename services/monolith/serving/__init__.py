"""Model-serving: the TF Serving Predict API over the serving embedding-PS and the dense model."""
