"""loom's version, recorded in checkpoints and prepared datasets."""

__version__ = "0.3.0"
