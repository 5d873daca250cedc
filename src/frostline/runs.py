"""Reading a run folder back: the model with its best weights, its labels, its config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frostline.checkpoint import load_weights
from frostline.config import FitConfig, config_from_dict
from frostline.errors import ConfigError
from frostline.sources import open_model


@dataclass
class TrainedRun:
    """A fine-tuned model as its run folder left it."""

    folder: Path
    config: FitConfig
    model: nn.Module
    tokenizer: Any
    labels: list[str]
    max_length: int

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        from frostline.sources.data import encode_texts

        return encode_texts(self.tokenizer, texts, self.max_length)


def load_run(folder: str | Path) -> TrainedRun:
    """Rebuild the model of a run and load its best weights (best.safetensors).

    Raises:
        ConfigError: the folder is not a finished frostline run.
    """
    folder = Path(folder)
    missing = [name for name in ("config.json", "head.json", "best.safetensors") if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"{folder} is not a frostline run folder with best weights: {', '.join(missing)} missing")
    config = config_from_dict(json.loads((folder / "config.json").read_text()))
    head = json.loads((folder / "head.json").read_text())
    source = open_model(config.model.ref, num_classes=head["num_classes"])
    load_weights(source.model, folder / "best.safetensors")
    source.model.eval()
    return TrainedRun(
        folder, config, source.model, source.tokenizer, head["labels"], head.get("max_length", config.data.max_length)
    )
