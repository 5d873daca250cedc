"""A sentence-transformers encoder as a classifier, read the way the encoder was trained to be read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from frostline.errors import ConfigError

Pooling = Literal["mean", "cls", "max"]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, mode: Pooling) -> torch.Tensor:
    """Reduce token states (batch, tokens, dim) to one vector per example, ignoring padding."""
    if mode == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def pooling_of(folder: Path) -> tuple[Pooling, bool] | None:
    """The pooling mode and normalisation a sentence-transformers folder declares; None if it is not one."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    pooling = next((m for m in modules if m.get("type", "").endswith("Pooling")), None)
    if pooling is None:
        return None
    config = json.loads((folder / pooling.get("path", "1_Pooling") / "config.json").read_text())
    mode: Pooling = "mean"
    if config.get("pooling_mode_cls_token"):
        mode = "cls"
    elif config.get("pooling_mode_max_tokens"):
        mode = "max"
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    return mode, normalize


class SentenceClassifier(nn.Module):
    """Encoder -> pooling over the attention mask -> linear head, returning logits.

    The pooled embedding is the one the sentence encoder was trained to produce (mean pooling for
    MiniLM); a classifier on the [CLS] state alone would read a vector it was never trained to make.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: Pooling = "mean", normalize: bool = False):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize
        self.classifier = nn.Linear(encoder.config.hidden_size, num_classes)

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The pooled sentence embedding the head reads.

        Inputs of shape (texts, windows, tokens) are texts read in several windows (`data.windows`): the encoder
        reads each window that holds tokens, and the windows are pooled together as if they were one text (mean:
        over all their tokens; max: over all their tokens; cls: the mean of the windows' first tokens).
        """
        if input_ids.dim() == 3:
            pooled = self._pool_windows(input_ids, attention_mask, token_type_ids)
        else:
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            pooled = pool(hidden, attention_mask, self.pooling)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def _pool_windows(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        texts, windows, tokens = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.reshape(texts * windows, tokens)
        # only windows that hold tokens are encoded: a short text in a long-text batch costs one window
        filled = mask.any(dim=1).nonzero().squeeze(1)
        window_mask = mask[filled]
        hidden = self.encoder(
            input_ids=input_ids.reshape(texts * windows, tokens)[filled],
            attention_mask=window_mask,
            token_type_ids=None if token_type_ids is None else token_type_ids.reshape(texts * windows, tokens)[filled],
        ).last_hidden_state
        owner = filled // windows
        # each window pooled as a text of its own; then the windows of a text pooled together
        states = pool(hidden, window_mask, self.pooling)
        texts_shape = (texts, states.shape[-1])
        if self.pooling == "max":
            out = torch.full(texts_shape, torch.finfo(states.dtype).min, dtype=states.dtype, device=states.device)
            return out.scatter_reduce(0, owner.unsqueeze(1).expand_as(states), states, "amax")
        # mean: weighted by each window's tokens (as if one text); cls: the windows' first tokens, equally
        counted = window_mask if self.pooling == "mean" else torch.ones_like(window_mask[:, :1])
        weights = counted.sum(dim=1, keepdim=True).to(states.dtype)
        sums = torch.zeros(texts_shape, dtype=states.dtype, device=states.device).index_add(0, owner, states * weights)
        counts = torch.zeros(texts, 1, dtype=states.dtype, device=states.device).index_add(0, owner, weights)
        return sums / counts.clamp(min=1e-9)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.classifier(self.embed(input_ids, attention_mask, token_type_ids))


def check_windows(model: nn.Module, windows: int, ref: str) -> None:
    """Refuse `data.windows` above 1 for a model that cannot read a text in several windows.

    Raises:
        ConfigError: naming the model and the fix.
    """
    if windows > 1 and not isinstance(model, SentenceClassifier):
        raise ConfigError(
            f"data.windows={windows}: only sentence encoders (a pooling over tokens, e.g. hf:minilm) read a text in "
            f"several windows, and {ref} is a {type(model).__name__}; set data.windows to 1"
        )
