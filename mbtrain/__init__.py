"""mbtrain: multi-task recommendation training with MetaBalance."""

__version__ = "0.2.0"
