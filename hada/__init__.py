"""HADA: graph-based amalgamation of frozen image-text backbones, as a runnable companion."""

__version__ = "0.1.0"
