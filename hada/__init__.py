"""HADA: graph-based amalgamation of frozen image-text backbones, as a runnable companion."""

import warnings

__version__ = "0.1.0"

# torch_geometric 2.8 scripts two of its classes with torch.jit.script when torch_geometric.nn is imported, and torch
# 2.10+ deprecates torch.jit.script with a FutureWarning that points into torch itself: upstream and harmless (hada
# scripts nothing). Filtered here, where every command, chapter and worker starts, for that one message only: it was
# printed by `hada train` and into every chapter that builds a model.
warnings.filterwarnings("ignore", message=r".*`?torch\.jit\.script`? is deprecated", category=FutureWarning)
