"""The training loss: cross-entropy, with class weights and label smoothing when the config asks for them.

Validation loss stays plain cross-entropy whatever the training loss is: it is what the overfitting monitor reads,
and it must mean the same in every run and every stage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def balanced_weights(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Inverse class frequency, N / (K n_k) (scikit-learn's "balanced"): each class weighs as much in the loss as
    any other, and weights average to 1 over the examples. A class without training examples gets weight 0."""
    counts = torch.bincount(labels.reshape(-1).long(), minlength=classes).double()
    weights = torch.where(counts > 0, len(labels) / (classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float()


def training_loss(
    class_weights: str, label_smoothing: float, labels: torch.Tensor, names: list[str]
) -> tuple[Loss, str | None]:
    """The loss a training step minimises, and a line for people saying how it differs from plain cross-entropy."""
    weight = balanced_weights(labels, len(names)) if class_weights == "auto" else None
    parts = []
    if weight is not None:
        shown = ", ".join(f"{name} {w:.2f}" for name, w in zip(names, weight.tolist(), strict=True))
        parts.append(f"class weights (auto: inverse frequency over {len(labels):,d} training examples): {shown}")
    if label_smoothing:
        parts.append(f"label smoothing {label_smoothing:g}")
    note = "training loss: cross-entropy with " + "; ".join(parts) + " (validation loss: plain cross-entropy)"

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        w = weight.to(logits.device) if weight is not None else None
        return F.cross_entropy(logits.float(), targets, weight=w, label_smoothing=label_smoothing)

    loss.class_weight = weight  # type: ignore[attr-defined]  # how shards of a batch weigh their means (distributed)
    return loss, note if parts else None
