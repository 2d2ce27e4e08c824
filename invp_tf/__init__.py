"""Invariance Propagation (Wang et al., NeurIPS 2020) in TensorFlow/Keras."""

__version__ = "0.1.0"
