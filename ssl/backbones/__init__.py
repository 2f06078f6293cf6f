"""Backbones: timm models behind one feature API (see `base.Backbone`)."""

from ssl.backbones.base import Backbone, BackboneFeatures
from ssl.backbones.factory import build_backbone

__all__ = ["Backbone", "BackboneFeatures", "build_backbone"]
