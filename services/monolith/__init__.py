"""monolith: real-time recommendation with a collisionless embedding table."""

import os

# TensorFlow's C++ INFO and WARNING lines (CPU features, no CUDA) drown the services' own
# logs; an operator can still ask for them by setting the variable.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
