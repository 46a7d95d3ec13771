"""monolith: real-time recommendation with a collisionless embedding table."""

import os

# TensorFlow's C++ INFO and WARNING lines (CPU features, no CUDA) drown the services' own
# logs; an operator can still ask for them by setting the variable. It must be set before
# TensorFlow is first imported, hence here. The lines TensorFlow prints before its logging
# reads it are filtered by `monolith.common.tf_startup`, at the same level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
