"""Segment Anything for microscopy.

Importing the package is cheap: the heavy dependencies (torch, segment_anything) are imported by the
submodules that need them, e.g. ``micro_sam.util``.
"""
from .__version__ import __version__

__all__ = ["__version__"]
