"""Reading a run folder back: the model with its best weights, its labels, its config."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frostline.checkpoint import load_weights
from frostline.config import FitConfig, config_from_dict
from frostline.dataset import image_settings, relabel
from frostline.errors import ConfigError
from frostline.sources import open_model
from frostline.sources.data import open_text_data
from frostline.sources.images import is_image_ref, open_image_data


@dataclass
class TrainedRun:
    """A fine-tuned model as its run folder left it."""

    folder: Path
    config: FitConfig
    model: nn.Module
    tokenizer: Any
    labels: list[str]
    max_length: int
    preprocess: dict[str, Any] = field(default_factory=dict)
    """The image model's input conventions (empty for text models)."""

    @property
    def reads_images(self) -> bool:
        return self.tokenizer is None and bool(self.preprocess)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        from frostline.sources.data import encode_texts

        return encode_texts(self.tokenizer, texts, self.max_length)

    def encode_images(self, paths: list[str]) -> torch.Tensor:
        """Image files as the run's validation batches saw them (size, crop, normalisation).

        Raises:
            ConfigError: a file is missing or cannot be decoded.
        """
        from frostline.sources.images import read_image

        size, crop_pct, transform = image_settings(self.config.data, None, self.preprocess)
        images = []
        for path in paths:
            try:
                images.append(read_image(Path(path), size, crop_pct))
            except Exception as err:  # PIL raises many types for broken files
                raise ConfigError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
        return transform(torch.stack(images))

    def labelled(self, ref: str) -> tuple[Any, torch.Tensor, Any]:
        """All examples of a data reference as (inputs, labels in the run's label order, per-batch transform).

        Raises:
            ConfigError: the data has classes the trained model lacks, or cannot be read.
        """
        data_config = self.config.data
        if is_image_ref(ref):
            size, crop_pct, transform = image_settings(data_config, self.tokenizer, self.preprocess)
            data = open_image_data(ref, size, crop_pct)
        else:
            transform = None
            data = open_text_data(ref, data_config.text_column, data_config.label_column)
        data = relabel(data, self.labels, ref, "the trained model")
        labels = torch.tensor(data.labels)
        inputs = data.images if transform is not None else self.encode(data.texts)
        return inputs, labels, transform


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
        folder,
        config,
        source.model,
        source.tokenizer,
        head["labels"],
        head.get("max_length", config.data.max_length),
        source.preprocess,
    )
