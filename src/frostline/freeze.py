"""Freeze plans, and `freeze`: the one function in frostline that flips requires_grad (specs: freeze_spec.py).

Early blocks hold general features (edges, textures, syntax) and stay frozen; the last blocks and
the head learn the task. A spec names what trains; it is resolved on the model's `ModelMap` into a
`FreezePlan` before anything changes, so an invalid spec leaves the model untouched.

The spec forms (head, last:N, from:PATH, none, bitfit, train=/freeze= globs, lora:..., bn=...) are listed in freeze_spec.py.

`last:N` and `from:PATH` count in forward order, so they see only the entries the example forward pass
ran (an unused branch, a block skipped by this input): those have no place in that order and get no
gradient from it, so they stay frozen. `none` and `train=PATH` train them.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from frostline.adapters import check_adapters, is_adapter
from frostline.batches import Batch
from frostline.errors import FreezeSpecError
from frostline.freeze_spec import BnPolicy, FreezeSpec
from frostline.inspect import MapEntry, ModelMap, inspect_model, is_under


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
    adapter_tensors: int = 0
    """Trainable LoRA adapter tensors (counted in `trainable_tensors` too)."""
    adapter_params: int = 0

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
        adapters = (
            f"; of them LoRA adapters: {self.adapter_tensors:,d} tensors, {self.adapter_params:,d} parameters"
            if self.adapter_tensors
            else ""
        )
        return (
            f"freeze {self.spec}: {self.trainable_tensors:,d} of {self.tensors:,d} tensors train "
            f"({self.trainable_params:,d} of {self.params:,d} parameters, {share:.2%}){adapters}"
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
            "adapter_tensors": self.adapter_tensors,
            "adapter_params": self.adapter_params,
            "entries": [{k: v for k, v in asdict(e).items() if k != "param_names"} for e in self.entries],
        }


def plan_freeze(model: nn.Module, spec: str | dict[str, Any] | FreezeSpec, model_map: ModelMap) -> FreezePlan:
    """Resolve `spec` on `model` without changing anything.

    Raises:
        FreezeSpecError: the spec is malformed or names nothing in the model (with the closest names).
    """
    spec = FreezeSpec.parse(spec)
    params = dict(model.named_parameters())
    if spec.mode == "lora":
        check_adapters(model, spec)
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
    adapters = [params[n] for n in trainable if is_adapter(n)]
    return FreezePlan(
        spec=spec,
        trainable=frozenset(trainable),
        entries=tuple(changes),
        held_in_eval=held,
        adapter_tensors=len(adapters),
        adapter_params=sum(p.numel() for p in adapters),
    )


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
    ran = set(model_map.call_order)
    for path in plan.held_in_eval:
        module = model.get_submodule(path)
        hold = _Hold(module, bn_train=plan.spec.bn == "train")
        for target in _hook_targets(path, module, ran):
            target.register_forward_pre_hook(hold)
        hold.apply()
    return plan


@dataclass(eq=False)
class _Hold:
    """A forward pre-hook that puts a frozen module back in eval mode: model.train() flips every submodule
    to train mode, and frozen modules must not drop out or (bn=eval) update BatchNorm statistics."""

    module: nn.Module
    """The held module; the hook may sit on modules inside it (see `_hook_targets`)."""
    bn_train: bool
    """bn=train: BatchNorm inside the held module keeps training mode."""

    def __call__(self, hooked: nn.Module, args: Any) -> None:
        if self.module.training:
            self.apply()

    def apply(self) -> None:
        self.module.eval()
        if self.bn_train:
            for sub in self.module.modules():
                if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    sub.train()


def _hook_targets(path: str, module: nn.Module, ran: set[str]) -> list[nn.Module]:
    """Where a hold fires: the module itself when it runs, else the outermost modules inside it that do.

    A ModuleList never runs itself, and a module whose forward() is called directly (timm's HRNet
    downsamplers) fires no hook of its own: a hold hooked there alone would never fire.
    """
    if path in ran and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return [module]
    inside = [
        target
        for name, child in module.named_children()
        for target in _hook_targets(f"{path}.{name}" if path else name, child, ran)
    ]
    return inside or [module]


def _holds(module: nn.Module) -> list[_Hold]:
    """The holds hooked on `module`, for the modules they hold."""
    return [hook for hook in module._forward_pre_hooks.values() if isinstance(hook, _Hold)]


def held_in_eval(model: nn.Module) -> dict[str, bool]:
    """Modules that `freeze` holds in eval mode, each with whether its BatchNorm keeps training (bn=train)."""
    paths = {m: p for p, m in model.named_modules()}
    return {paths[h.module]: h.bn_train for m in model.modules() for h in _holds(m) if h.module in paths}


def is_held_in_eval(module: nn.Module) -> bool:
    """Whether `freeze` holds this module itself in eval mode."""
    return any(h.module is module for m in module.modules() for h in _holds(m))


def _release_from_eval(module: nn.Module) -> None:
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, _Hold):
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
    # the first module to run inside the entry: a ModuleList entry never runs itself, its children do
    boundary = next(
        (i for i, p in enumerate(order) if first_trainable is not None and is_under(p, first_trainable)), None
    )
    if boundary is not None:
        for path in order[:boundary]:
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
    if spec.mode == "lora":
        # the adapters and the new head; every weight an adapter adapts stays frozen
        return {n for n in params if is_adapter(n)} | set(model_map.entry(model_map.head).param_names)
    if spec.mode == "bitfit":
        biases = {n for n in params if n.rsplit(".", 1)[-1] == "bias"}
        if not biases:
            raise FreezeSpecError(
                "bitfit trains biases, and this model has no parameter named '*.bias'; use head or last:N"
            )
        return biases | set(model_map.entry(model_map.head).param_names)
    if spec.mode == "last":
        start = _start_of_last(spec.n, called, model_map)
        return {n for e in called[start:] for n in e.param_names}
    if spec.mode == "from":
        start = _start_of(spec.path, called, model_map)
        return {n for e in called[start:] for n in e.param_names}
    matched = _match_globs(spec.globs, model_map, params)
    return matched if spec.mode == "train" else set(params) - matched


def _start_of_last(n: int, called: list[MapEntry], model_map: ModelMap) -> int:
    """Index in `called` where last:N starts; only blocks that ran count."""
    positions = [i for i, e in enumerate(called) if e.kind == "block"]
    ran = [called[i].path for i in positions]
    never = [b.path for b in model_map.blocks if not b.called]
    skipped = (
        f"; {len(never):,d} more never ran in the example forward pass ({_listed(never)}) and are not counted: "
        "they have no place in forward order and get no gradient from it"
        if never
        else ""
    )
    if never and not ran:
        raise FreezeSpecError(
            f"last:{n} counts blocks from the head, but none of the model's {len(never):,d} blocks ran in the "
            f"example forward pass ({_listed(never)}); give an example batch that reaches them, or use head, "
            f"train=PATTERN or none"
        )
    if n > len(ran):
        raise FreezeSpecError(
            f"last:{n} asks for {n} blocks, but the model has {len(ran)} ({_listed(ran) or 'none'}){skipped}; "
            f"use last:{len(ran)} to train every block that runs, or none for full fine-tuning"
        )
    if n:
        return positions[-n]
    return positions[-1] + 1 if positions else 0


def _start_of(path: str, called: list[MapEntry], model_map: ModelMap) -> int:
    for i, entry in enumerate(called):
        if is_under(entry.path, path):
            return i
    never = [e.path for e in model_map.entries if not e.called and is_under(e.path, path)]
    if never:
        raise FreezeSpecError(
            f"from:{path} names {_listed(never)}, which never ran in the example forward pass, so it has no place "
            f"in forward order; start from an entry that runs, or train it by name with train={path},{model_map.head}"
        )
    paths = [e.path for e in model_map.entries]
    close = difflib.get_close_matches(path, paths, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}?" if close else "the entries are " + ", ".join(paths[:12])
    raise FreezeSpecError(f"from:{path} names no entry of the model map; {hint}")


def _listed(paths: list[str], limit: int = 12) -> str:
    """Paths for a message, the first `limit` of them and how many more."""
    more = f" and {len(paths) - limit:,d} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


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
