"""Model and data sources: references resolved into models (and later data sets)."""

from frostline.sources.models import load_model, open_model
from frostline.sources.source import ModelSource

__all__ = ["ModelSource", "load_model", "open_model"]
