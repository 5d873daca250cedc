"""Giving a pretrained model a new head for N classes."""

from __future__ import annotations

from torch import nn

from frostline.errors import ModelRefError


def replace_head(model: nn.Module, head: str | None, num_classes: int) -> str:
    """Swap the last `nn.Linear` of the head module for a new one with `num_classes` outputs.

    Returns:
        A line for people saying what was replaced.

    Raises:
        ModelRefError: the head is unknown or holds no `nn.Linear`.
    """
    if head is None:
        raise ModelRefError(f"cannot size the head for {num_classes} classes: the model's head is unknown")
    module = model.get_submodule(head)
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelRefError(f"cannot size the head {head!r} for {num_classes} classes: it holds no nn.Linear")
    name, old = linears[-1]
    path = f"{head}.{name}" if name else head
    if old.out_features == num_classes:
        return f"head {path} already has {num_classes} outputs"
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return f"new head {path}: Linear({old.in_features}, {num_classes}) in place of {old.out_features} outputs"
