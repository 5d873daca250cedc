"""Freeze specs, freeze plans, and `freeze`: the one function in frostline that flips requires_grad.

Early blocks hold general features (edges, textures, syntax) and stay frozen; the last blocks and
the head learn the task. A spec names what trains; it is resolved on the model's `ModelMap` into a
`FreezePlan` before anything changes, so an invalid spec leaves the model untouched.

Spec strings (clauses separated by ";" or spaces):
    head             the head only (linear probe)
    last:N           the last N blocks and everything after them (final norm, pooler, head)
    from:PATH        the entry PATH and everything after it in forward order
    none             everything (full fine-tuning)
    bitfit           every bias, and the head
    train=GLOB,...   only the parameters (or entries) matching a glob
    freeze=GLOB,...  everything but the parameters (or entries) matching a glob
    bn=eval|train    frozen BatchNorm keeps its running statistics (eval, the default) or updates them
    bn=fixed         every BatchNorm, trainable ones too, normalises with its running statistics (its
                     scale and shift still train): batch statistics of small fine-tuning batches are noisy
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from fnmatch import fnmatchcase
from typing import Any, Literal

from torch import nn

from frostline.batches import Batch
from frostline.errors import FreezeSpecError
from frostline.inspect import ModelMap, inspect_model

Mode = Literal["head", "last", "from", "none", "bitfit", "train", "freeze"]
BnPolicy = Literal["eval", "train", "fixed"]
_PLAIN_MODES = ("head", "none", "bitfit")
_FORMS = [
    "head",
    "last:N",
    "from:PATH",
    "none",
    "bitfit",
    "train=GLOB,...",
    "freeze=GLOB,...",
    "bn=eval",
    "bn=train",
    "bn=fixed",
]


@dataclass(frozen=True)
class FreezeSpec:
    """What to train, as one serialisable value; `str(spec)` parses back to an equal spec."""

    mode: Mode = "head"
    """Which selection rule: head, last, from, none, bitfit, train or freeze."""
    n: int | None = None
    """For `last`: how many blocks, counted from the head."""
    path: str | None = None
    """For `from`: the entry where training starts."""
    globs: tuple[str, ...] = ()
    """For `train` / `freeze`: parameter-name or entry-path patterns (fnmatch)."""
    bn: BnPolicy = "eval"
    """Frozen BatchNorm: `eval` keeps running statistics fixed, even after model.train(); `train` lets them update;
    `fixed`: every BatchNorm, trainable or not, keeps its running statistics (its affine parameters still train)."""

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in ("head", "last", "from", "none", "bitfit", "train", "freeze"):
            problems.append(f"unknown freeze mode {self.mode!r}; use one of {', '.join(_FORMS)}")
        if self.mode == "last" and (not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 0):
            problems.append(f"last:N needs a whole number N >= 0, got {self.n!r}")
        if self.mode == "from" and not self.path:
            problems.append("from:PATH needs the path of a block, for example from:encoder.layer.4")
        if self.mode in ("train", "freeze") and not self.globs:
            problems.append(f"{self.mode}=GLOB,... needs at least one pattern, for example {self.mode}=classifier.*")
        if self.bn not in ("eval", "train", "fixed"):
            problems.append(f"bn={self.bn} is not a BatchNorm policy; use bn=eval, bn=train or bn=fixed")
        if problems:
            raise FreezeSpecError("\n".join(problems))

    def __str__(self) -> str:
        selection = {
            "last": f"last:{self.n}",
            "from": f"from:{self.path}",
            "train": "train=" + ",".join(self.globs),
            "freeze": "freeze=" + ",".join(self.globs),
        }.get(self.mode, self.mode)
        return selection if self.bn == "eval" else f"{selection};bn={self.bn}"

    @classmethod
    def parse(cls, spec: str | dict[str, Any] | FreezeSpec) -> FreezeSpec:
        """Read a spec string (see the module docstring), a dict of this class's fields, or a spec."""
        if isinstance(spec, FreezeSpec):
            return spec
        if isinstance(spec, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(spec) - known)
            if unknown:
                raise FreezeSpecError(f"unknown freeze spec keys {unknown}; the keys are {sorted(known)}")
            values = dict(spec)
            if "globs" in values:
                values["globs"] = tuple([values["globs"]] if isinstance(values["globs"], str) else values["globs"])
            return cls(**values)
        if not isinstance(spec, str):
            raise FreezeSpecError(f"a freeze spec is a string or a dict, got {type(spec).__name__}")
        return _parse_string(spec)


def _parse_string(text: str) -> FreezeSpec:
    values: dict[str, Any] = {}
    clauses = [c for c in text.replace(";", " ").split() if c]
    if not clauses:
        raise FreezeSpecError(f"empty freeze spec; use one of {', '.join(_FORMS)}")
    for clause in clauses:
        key, sep, arg = clause.partition("=") if "=" in clause else clause.partition(":")
        if key == "bn" and sep == "=":
            values["bn"] = arg
            continue
        if "mode" in values:
            raise FreezeSpecError(f"freeze spec {text!r} has two selections ({values['mode']} and {key}); give one")
        if key in _PLAIN_MODES and not sep:
            values["mode"] = key
        elif key == "last" and sep == ":":
            if not arg.isdigit():
                raise FreezeSpecError(f"last:N needs a whole number N >= 0, got {arg!r} in {text!r}")
            values.update(mode="last", n=int(arg))
        elif key == "from" and sep == ":":
            values.update(mode="from", path=arg)
        elif key in ("train", "freeze") and sep == "=":
            values.update(mode=key, globs=tuple(g for g in arg.split(",") if g))
        else:
            close = difflib.get_close_matches(clause, _FORMS, n=2, cutoff=0.3)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise FreezeSpecError(f"unknown freeze spec clause {clause!r}{hint}; the forms are {', '.join(_FORMS)}")
    if "mode" not in values:
        raise FreezeSpecError(
            f"freeze spec {text!r} says only how BatchNorm behaves; add what trains, e.g. 'last:2;{text}'"
        )
    return FreezeSpec(**values)


@dataclass(frozen=True)
class EntryChange:
    """Trainable counts of one map entry before and after a freeze."""

    path: str
    kind: str
    tensors: int
    params: int
    trainable_tensors_before: int
    trainable_params_before: int
    trainable_tensors_after: int
    trainable_params_after: int
    param_names: tuple[str, ...] = field(default=(), repr=False)
    """Names of the parameter tensors this entry owns."""


@dataclass(frozen=True)
class FreezePlan:
    """The resolved result of a freeze spec on one model: what trains, per entry, before and after."""

    spec: FreezeSpec
    trainable: frozenset[str]
    """Names of the parameters that train after the freeze."""
    entries: tuple[EntryChange, ...]
    held_in_eval: tuple[str, ...] = field(default=())
    """Modules kept in eval mode: fully frozen entries, and (bn=eval) frozen BatchNorm outside them."""

    @property
    def tensors(self) -> int:
        return sum(e.tensors for e in self.entries)

    @property
    def params(self) -> int:
        return sum(e.params for e in self.entries)

    @property
    def trainable_tensors_before(self) -> int:
        return sum(e.trainable_tensors_before for e in self.entries)

    @property
    def trainable_params_before(self) -> int:
        return sum(e.trainable_params_before for e in self.entries)

    @property
    def trainable_tensors(self) -> int:
        return sum(e.trainable_tensors_after for e in self.entries)

    @property
    def trainable_params(self) -> int:
        return sum(e.trainable_params_after for e in self.entries)

    def summary(self) -> str:
        """One line for people: what the spec trains."""
        share = self.trainable_params / self.params if self.params else 0.0
        return (
            f"freeze {self.spec}: {self.trainable_tensors:,d} of {self.tensors:,d} tensors train "
            f"({self.trainable_params:,d} of {self.params:,d} parameters, {share:.2%})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": str(self.spec),
            "tensors": self.tensors,
            "params": self.params,
            "trainable_tensors_before": self.trainable_tensors_before,
            "trainable_params_before": self.trainable_params_before,
            "trainable_tensors": self.trainable_tensors,
            "trainable_params": self.trainable_params,
            "held_in_eval": list(self.held_in_eval),
            "entries": [{k: v for k, v in asdict(e).items() if k != "param_names"} for e in self.entries],
        }


def plan_freeze(model: nn.Module, spec: str | dict[str, Any] | FreezeSpec, model_map: ModelMap) -> FreezePlan:
    """Resolve `spec` on `model` without changing anything.

    Raises:
        FreezeSpecError: the spec is malformed or names nothing in the model (with the closest names).
    """
    spec = FreezeSpec.parse(spec)
    params = dict(model.named_parameters())
    trainable = _select(spec, model_map, params)
    changes = []
    for entry in model_map.entries:
        owned = [params[n] for n in entry.param_names]
        after = [params[n] for n in entry.param_names if n in trainable]
        changes.append(
            EntryChange(
                path=entry.path,
                kind=entry.kind,
                tensors=len(owned),
                params=sum(p.numel() for p in owned),
                trainable_tensors_before=sum(p.requires_grad for p in owned),
                trainable_params_before=sum(p.numel() for p in owned if p.requires_grad),
                trainable_tensors_after=len(after),
                trainable_params_after=sum(p.numel() for p in after),
                param_names=entry.param_names,
            )
        )
    held = _held_modules(model, model_map, trainable, spec.bn)
    return FreezePlan(spec=spec, trainable=frozenset(trainable), entries=tuple(changes), held_in_eval=held)


def freeze(
    model: nn.Module,
    spec: str | dict[str, Any] | FreezeSpec,
    model_map: ModelMap | None = None,
    example_batch: Batch | None = None,
) -> FreezePlan:
    """Make exactly the parameters that `spec` names trainable, and freeze every other one.

    This is the only function in frostline that changes `requires_grad`. Frozen entries of the map
    are also held in eval mode through later `model.train()` calls: dropout in them is off (frozen
    layers extract features; noise there only slows the step and blurs the features), and with
    `bn=eval` (the default) their BatchNorm statistics never move; frozen BatchNorm inside partly
    trainable entries is held the same way. With `bn=train` BatchNorm modules keep training mode.

    Args:
        model: the model to change in place.
        spec: a freeze spec (string, dict or `FreezeSpec`).
        model_map: the model's map; made with `inspect_model` when absent.
        example_batch: used to trace forward order when no map is given (else attribute order).

    Returns:
        The applied `FreezePlan`, with trainable counts per entry before and after.

    Raises:
        FreezeSpecError: the spec is invalid for this model; the model is left unchanged.
    """
    model_map = model_map or inspect_model(model, example_batch)
    plan = plan_freeze(model, spec, model_map)
    for name, param in model.named_parameters():
        param.requires_grad_(name in plan.trainable)
    for module in model.modules():
        _release_from_eval(module)
    hold = _hold_in_eval_bn_train if plan.spec.bn == "train" else _hold_in_eval
    for path in plan.held_in_eval:
        module = model.get_submodule(path)
        module.register_forward_pre_hook(hold)
        hold(module, (), force=True)
    return plan


def held_in_eval(model: nn.Module) -> dict[str, bool]:
    """Modules that `freeze` holds in eval mode, each with whether its BatchNorm keeps training (bn=train)."""
    held = {}
    for path, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if hook in _HOLDS:
                held[path] = hook is _hold_in_eval_bn_train
    return held


def is_held_in_eval(module: nn.Module) -> bool:
    """Whether `freeze` holds this module itself in eval mode."""
    return any(hook in _HOLDS for hook in module._forward_pre_hooks.values())


def _hold_in_eval(module: nn.Module, args: Any, force: bool = False) -> None:
    # model.train() flips every submodule back to train mode; undo it for frozen modules.
    if module.training or force:
        module.eval()


def _hold_in_eval_bn_train(module: nn.Module, args: Any, force: bool = False) -> None:
    if module.training or force:
        module.eval()
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.train()


_HOLDS = (_hold_in_eval, _hold_in_eval_bn_train)


def _release_from_eval(module: nn.Module) -> None:
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook in _HOLDS:
            del module._forward_pre_hooks[key]


def _held_modules(model: nn.Module, model_map: ModelMap, trainable: set[str], bn: BnPolicy) -> tuple[str, ...]:
    """Modules to keep in eval mode: fully frozen entries; parameter-free modules (dropout) that run
    before the first trainable entry, so the frozen part is a deterministic feature extractor; and
    (bn=eval) frozen BatchNorm anywhere else; (bn=fixed) every BatchNorm."""
    modules = dict(model.named_modules())
    held = [
        e.path
        for e in model_map.entries
        if e.path and e.path in modules and e.param_names and not any(n in trainable for n in e.param_names)
    ]
    first_trainable = next((e.path for e in model_map.entries if any(n in trainable for n in e.param_names)), None)
    order = list(model_map.call_order)
    if first_trainable in order:
        for path in order[: order.index(first_trainable)]:
            inside = any(path == h or path.startswith(h + ".") for h in held)
            if path and not inside and next(modules[path].parameters(), None) is None:
                held.append(path)
    if bn in ("eval", "fixed"):
        inside_held = tuple(h + "." for h in held)
        norms = (
            frozen_batchnorms(model, trainable)
            if bn == "eval"
            else tuple(p for p, m in modules.items() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        )
        held += [p for p in norms if p not in held and not p.startswith(inside_held)]
    return tuple(held)


def frozen_batchnorms(model: nn.Module, trainable: set[str] | frozenset[str] | None = None) -> tuple[str, ...]:
    """Paths of the BatchNorm modules whose parameters are all frozen (now, or under `trainable`)."""
    if trainable is None:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    held = []
    names = [n for n, _ in model.named_parameters()]
    for path, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        own = [f"{path}.{n}" if path else n for n, _ in module.named_parameters()]
        if not own:
            # BatchNorm without affine parameters: frozen when its parent's parameters are all frozen
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            own = [n for n in names if not parent or n.startswith(parent + ".")]
        if not any(n in trainable for n in own):
            held.append(path)
    return tuple(held)


def _select(spec: FreezeSpec, model_map: ModelMap, params: dict[str, nn.Parameter]) -> set[str]:
    entries = model_map.entries
    called = [e for e in entries if e.called]
    if spec.mode == "none":
        return set(params)
    if spec.mode == "head":
        return set(model_map.entry(model_map.head).param_names)
    if spec.mode == "bitfit":
        biases = {n for n in params if n.rsplit(".", 1)[-1] == "bias"}
        if not biases:
            raise FreezeSpecError(
                "bitfit trains biases, and this model has no parameter named '*.bias'; use head or last:N"
            )
        return biases | set(model_map.entry(model_map.head).param_names)
    if spec.mode == "last":
        blocks = model_map.blocks
        if spec.n > len(blocks):
            names = ", ".join(b.path for b in blocks) or "none"
            raise FreezeSpecError(
                f"last:{spec.n} asks for {spec.n} blocks, but the model has {len(blocks)} ({names}); "
                f"use last:{len(blocks)} to train every block, or none for full fine-tuning"
            )
        start = called.index(blocks[-spec.n]) if spec.n else _after_last_block(called)
        return {n for e in called[start:] for n in e.param_names}
    if spec.mode == "from":
        start = _start_of(spec.path, called, model_map)
        return {n for e in called[start:] for n in e.param_names}
    matched = _match_globs(spec.globs, model_map, params)
    return matched if spec.mode == "train" else set(params) - matched


def _after_last_block(called: list) -> int:
    positions = [i for i, e in enumerate(called) if e.kind == "block"]
    return positions[-1] + 1 if positions else 0


def _start_of(path: str, called: list, model_map: ModelMap) -> int:
    for i, entry in enumerate(called):
        if entry.path == path or entry.path.startswith(path + "."):
            return i
    paths = [e.path for e in model_map.entries]
    close = difflib.get_close_matches(path, paths, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}?" if close else "the entries are " + ", ".join(paths[:12])
    raise FreezeSpecError(f"from:{path} names no entry of the model map; {hint}")


def _match_globs(globs: tuple[str, ...], model_map: ModelMap, params: dict[str, nn.Parameter]) -> set[str]:
    matched: set[str] = set()
    unmatched = []
    for glob in globs:
        # a glob naming a module or block selects every parameter under it
        hits = {n for n in params if any(fnmatchcase(part, glob) for part in _prefixes(n))}
        if not hits:
            unmatched.append(glob)
        matched |= hits
    if unmatched:
        names = sorted(set(params) | {e.path for e in model_map.entries})
        lines = []
        for glob in unmatched:
            close = difflib.get_close_matches(glob, names, n=3, cutoff=0.4)
            hint = (
                f"closest names: {', '.join(close)}"
                if close
                else f"entries are {', '.join(e.path for e in model_map.entries[:10])}"
            )
            lines.append(f"pattern {glob!r} matches no parameter or block; {hint}")
        raise FreezeSpecError("\n".join(lines))
    return matched


def _prefixes(name: str) -> list[str]:
    """The name itself and every module path above it: a.b.weight -> a, a.b, a.b.weight."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
