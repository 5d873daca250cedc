"""`ModelSource`: what resolving a model reference gives back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from frostline.batches import Batch


@dataclass
class ModelSource:
    """A model ready to fine-tune, with what came with it."""

    ref: str
    """The model reference it was resolved from."""
    model: nn.Module
    """The model, head sized for the requested number of classes."""
    example_batch: Batch
    """A small batch the model accepts, for tracing and smoke tests."""
    pretrained: bool
    """False when the weights are random because no pretrained weights could be had offline."""
    notes: list[str] = field(default_factory=list)
    """Lines for people: what was loaded and how."""
    tokenizer: Any = None
    """The tokenizer of a text model."""
    preprocess: dict[str, Any] = field(default_factory=dict)
    """Input conventions of a vision model (input_size, mean, std, range)."""
