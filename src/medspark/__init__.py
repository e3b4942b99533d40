"""medspark: train and track deep-learning models on medical images at cluster scale."""

__version__ = "0.1.0"

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter (CUDA probes on CPU hosts)
