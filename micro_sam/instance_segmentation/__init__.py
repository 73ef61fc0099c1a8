"""Automatic instance segmentation: SAM's automatic mask generation (AMG) and decoder-based segmentation (AIS)."""
from .decoder import DecoderAdapter, get_decoder, get_predictor_and_decoder, get_unetr

__all__ = ["DecoderAdapter", "get_decoder", "get_predictor_and_decoder", "get_unetr"]
