"""cbctseg: ToothFairy2 CBCT multi-structure segmentation for grand-challenge, on nnU-Net v2."""

__version__ = "0.1.0"
