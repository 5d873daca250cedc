"""The freeze guard: lint a set-up before training, prove after training that frozen tensors never moved.

`check_setup` catches the classic freezing bugs before they cost a run: `model.features.requires_grad
= False` (an attribute on the Module that freezes nothing), trainable tensors the optimizer never
sees, frozen tensors the optimizer can still move, BatchNorm statistics that drift in a frozen block.
`FreezeGuard` fingerprints every frozen tensor and buffer and `verify()` compares them bit for bit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from frostline.errors import FrozenWeightsChanged, SetupError
from frostline.freeze import FreezePlan, frozen_batchnorms, held_in_eval

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem found in a set-up, with the fix."""

    severity: Severity
    code: str
    """Stable identifier: module-requires-grad, froze-nothing, nothing-trains, plan-drift,
    missing-from-optimizer, frozen-in-optimizer, batchnorm-train."""
    message: str
    fix: str
    tensors: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.severity}: {self.message}\n  fix: {self.fix}"


def _expr(path: str) -> str:
    return f"model.{path}" if path else "model"


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit:,d} more" if len(names) > limit else "")


def check_setup(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    plan: FreezePlan | None = None,
    raise_on_error: bool = True,
) -> list[Finding]:
    """Lint a model (and optimizer) before training.

    Args:
        model: the model about to train.
        optimizer: the optimizer that will train it, if already built.
        plan: the `FreezePlan` that was applied; lets the check tell intent from accident.
        raise_on_error: raise `SetupError` when any finding is an error.

    Returns:
        Every finding, errors first.

    Raises:
        SetupError: with `raise_on_error`, when a finding is an error; `.findings` holds them all.
    """
    findings = _module_attribute_findings(model)
    findings += _freeze_findings(model, plan)
    if optimizer is not None:
        findings += _optimizer_findings(model, optimizer)
    findings += _batchnorm_findings(model)
    findings.sort(key=lambda f: f.severity != "error")
    errors = [f for f in findings if f.severity == "error"]
    if errors and raise_on_error:
        raise SetupError("the training set-up has problems:\n" + "\n".join(str(f) for f in errors), findings)
    return findings


def _module_attribute_findings(model: nn.Module) -> list[Finding]:
    findings = []
    for path, module in model.named_modules():
        if "requires_grad" not in vars(module):
            continue
        value = vars(module)["requires_grad"]
        params = list(module.parameters())
        still = [p for p in params if p.requires_grad]
        name = type(module).__name__
        if value is False and still:
            findings.append(
                Finding(
                    "error",
                    "module-requires-grad",
                    f"`{_expr(path)}.requires_grad = False` set a plain attribute on the {name} module and froze nothing: "
                    f"{len(still):,d} of its {len(params):,d} parameter tensors ({sum(p.numel() for p in still):,d} parameters) "
                    "still require grad",
                    f"{_expr(path)}.requires_grad_(False), or `for p in {_expr(path)}.parameters(): p.requires_grad = False`; "
                    "then remove the attribute",
                )
            )
        else:
            findings.append(
                Finding(
                    "warning",
                    "module-requires-grad",
                    f"`{_expr(path)}.requires_grad = {value!r}` is a plain attribute on the {name} module; it does nothing "
                    "to its parameters and misleads whoever reads the code",
                    f"use {_expr(path)}.requires_grad_({value!r}) and delete the attribute (del {_expr(path)}.requires_grad)",
                )
            )
    return findings


def _freeze_findings(model: nn.Module, plan: FreezePlan | None) -> list[Finding]:
    named = list(model.named_parameters())
    trainable = [n for n, p in named if p.requires_grad]
    findings = []
    if not trainable:
        findings.append(
            Finding(
                "error",
                "nothing-trains",
                f"all {len(named):,d} parameter tensors are frozen: training would change nothing",
                "unfreeze at least the head, e.g. freeze(model, 'head')",
            )
        )
    elif len(trainable) == len(named) and (plan is None or plan.spec.mode != "none"):
        findings.append(
            Finding(
                "warning",
                "froze-nothing",
                f"every one of the {len(named):,d} parameter tensors requires grad: nothing is frozen",
                "freeze with frostline.freeze(model, 'last:2') or `for p in model.features.parameters(): p.requires_grad = False`; "
                "if full fine-tuning is meant, say so with freeze(model, 'none')",
            )
        )
    if plan is not None:
        drifted = sorted(set(trainable) ^ set(plan.trainable))
        if drifted:
            findings.append(
                Finding(
                    "error",
                    "plan-drift",
                    f"{len(drifted):,d} tensors no longer match the freeze plan ({plan.spec}): {_listing(drifted)}",
                    "change requires_grad only through frostline.freeze, then build the optimizer",
                    tuple(drifted),
                )
            )
    return findings


def _optimizer_findings(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[Finding]:
    names = {p: n for n, p in model.named_parameters()}
    in_optimizer = {p for group in optimizer.param_groups for p in group["params"]}
    findings = []
    missing = [n for p, n in names.items() if p.requires_grad and p not in in_optimizer]
    if missing:
        findings.append(
            Finding(
                "error",
                "missing-from-optimizer",
                f"{len(missing):,d} trainable tensors are not in the optimizer and will never update: {_listing(missing)}",
                "build the optimizer after freezing, from the trainable tensors: "
                "torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)",
                tuple(missing),
            )
        )
    moving, idle = [], []
    for p in in_optimizer:
        if p.requires_grad or p not in names:
            continue
        state = optimizer.state.get(p, {})
        (moving if p.grad is not None or state else idle).append(names[p])
    if moving:
        findings.append(
            Finding(
                "error",
                "frozen-in-optimizer",
                f"{len(moving):,d} frozen tensors are in the optimizer with a gradient or optimizer state left over, so "
                f"weight decay and momentum will still move them: {_listing(moving)}",
                "rebuild the optimizer from the trainable tensors only, after freezing",
                tuple(moving),
            )
        )
    if idle:
        findings.append(
            Finding(
                "warning",
                "frozen-in-optimizer",
                f"{len(idle):,d} frozen tensors are in the optimizer: torch skips them while .grad is None, but a "
                f"zero_grad(set_to_none=False) or a later unfreeze gives them a gradient that weight decay and momentum act on: {_listing(idle)}",
                "pass only trainable tensors: torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)",
                tuple(idle),
            )
        )
    return findings


def _batchnorm_findings(model: nn.Module) -> list[Finding]:
    modules = dict(model.named_modules())
    held = held_in_eval(model)
    drifting, waiting = [], []
    for path in frozen_batchnorms(model):
        module = modules[path]
        # held by freeze: in eval mode, or in train mode because bn=train asked for it
        if any(path == h or path.startswith(h + ".") or h == "" for h in held):
            continue
        (drifting if module.training else waiting).append(path)
    findings = []
    if drifting:
        findings.append(
            Finding(
                "error",
                "batchnorm-train",
                f"{len(drifting):,d} BatchNorm modules with frozen parameters are in train mode; every forward pass "
                f"updates their running statistics, so the frozen block drifts: {_listing(drifting)}",
                "freeze with frostline.freeze(model, spec) (bn=eval holds them in eval mode), or call .eval() on them after every model.train()",
                tuple(drifting),
            )
        )
    if waiting:
        findings.append(
            Finding(
                "warning",
                "batchnorm-train",
                f"{len(waiting):,d} BatchNorm modules with frozen parameters will return to train mode at model.train() "
                f"and update their running statistics: {_listing(waiting)}",
                "freeze with frostline.freeze(model, spec) (bn=eval holds them in eval mode), or call .eval() on them after every model.train()",
                tuple(waiting),
            )
        )
    return findings


@dataclass(frozen=True)
class _Print:
    digest: bytes
    summary: str


def _fingerprint(t: torch.Tensor) -> _Print:
    flat = t.detach().reshape(-1).contiguous().cpu()
    digest = hashlib.blake2b(flat.view(torch.uint8).numpy().tobytes(), digest_size=16).digest()
    if flat.numel() == 1:
        summary = f"{flat.item()!r}"
    elif flat.is_floating_point():
        summary = f"norm {flat.double().norm().item():.6g}"
    else:
        summary = f"sum {flat.long().sum().item()}"
    return _Print(digest, summary)


@dataclass(frozen=True)
class GuardReport:
    """What `FreezeGuard.verify` checked."""

    tensors: int
    buffers: int

    def summary(self) -> str:
        return f"freeze guard: {self.tensors:,d} frozen tensors and {self.buffers:,d} buffers bit-identical"


class FreezeGuard:
    """Fingerprints every frozen parameter and the buffers of frozen modules; `verify` proves none moved.

    Buffers count as frozen when their module has no trainable parameter; BatchNorm statistics count
    when the BatchNorm is frozen, except under a plan with bn=train, which lets them update on purpose.
    """

    def __init__(self, model: nn.Module, plan: FreezePlan | None = None):
        self.model = model
        self.params = {n: _fingerprint(p) for n, p in model.named_parameters() if not p.requires_grad}
        self.buffers = {n: _fingerprint(b) for n, b in _frozen_buffers(model, plan)}

    def verify(self) -> GuardReport:
        """Compare every fingerprinted tensor with its current value.

        Raises:
            FrozenWeightsChanged: naming every tensor that moved by even one bit.
        """
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        changed = []
        for kind, prints, current in (("parameter", self.params, params), ("buffer", self.buffers, buffers)):
            for name, before in prints.items():
                if name not in current:
                    changed.append(f"{name} ({kind}, no longer in the model)")
                    continue
                after = _fingerprint(current[name])
                if after.digest != before.digest:
                    changed.append(f"{name} ({kind}, {before.summary} -> {after.summary})")
        if changed:
            raise FrozenWeightsChanged(
                f"{len(changed):,d} frozen tensors changed, and frozen tensors must stay bit-identical:\n  "
                + "\n  ".join(changed)
                + "\nlikely causes: BatchNorm run in train mode (freeze with bn=eval), frozen tensors in the optimizer "
                "with weight decay or momentum, or an in-place update outside the optimizer",
                changed,
            )
        return GuardReport(tensors=len(self.params), buffers=len(self.buffers))


def _frozen_buffers(model: nn.Module, plan: FreezePlan | None) -> list[tuple[str, torch.Tensor]]:
    frozen_bn = set() if plan is not None and plan.spec.bn == "train" else set(frozen_batchnorms(model))
    result = []
    for path, module in model.named_modules():
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if is_bn and path not in frozen_bn:
            continue
        if not is_bn and any(p.requires_grad for p in module.parameters()):
            continue
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None:
                result.append((f"{path}.{name}" if path else name, buffer))
    return result
