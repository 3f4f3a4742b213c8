"""MobileNetV2 training and quantization, tracked in Weights & Biases."""

__version__ = "0.1.0"
