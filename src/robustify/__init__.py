"""robustify: make large pre-trained vision models robust to distribution shift, and measure it."""

__version__ = "0.1.0"
