"""Datasets (raw PIL image + label) and the augmentation views built on them."""
