"""What a model is made of: its blocks in forward order, and its head.

`inspect_model` runs one example batch through the model with hooks, so the map follows the
order in which modules really run, not the order in which they were assigned as attributes.
Every parameter tensor belongs to exactly one entry of the map, so a freeze spec resolved on
the map accounts for every tensor.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from frostline.batches import Batch, call_model, logits_of

Kind = Literal["embedding", "stem", "block", "norm", "head", "other"]

# Attribute names under which well-known libraries keep their classification head.
_LIBRARY_HEADS: dict[str, tuple[str, ...]] = {
    "transformers.": ("classifier", "score"),
    "torchvision.": ("fc", "classifier", "heads"),
    "efficientnet_lite_pytorch.": ("_fc",),
}

# Names under which models of any origin usually keep their head; used when tracing cannot tell.
_COMMON_HEADS = ("classifier", "fc", "head", "heads", "score", "_fc")


@dataclass(frozen=True)
class MapEntry:
    """One unit of the model a person would call "a layer", with its parameter counts."""

    path: str
    """Dotted path of the module (or of a parameter held directly by a container)."""
    kind: Kind
    """embedding, stem, block, norm, head or other."""
    module_type: str
    """Class name of the module, or "Parameter"."""
    tensors: int
    """Number of parameter tensors it owns."""
    params: int
    """Number of scalar parameters it owns."""
    trainable_tensors: int
    """Parameter tensors with requires_grad=True when the map was made."""
    trainable_params: int
    """Scalar parameters with requires_grad=True when the map was made."""
    param_names: tuple[str, ...]
    """Full names (as in `model.named_parameters()`) of the tensors it owns."""
    called: bool = True
    """Whether the module, or any module inside it, ran during the example forward pass."""


@dataclass(frozen=True)
class ModelMap:
    """A model's entries in forward order, with the head identified."""

    entries: tuple[MapEntry, ...]
    """Every entry, in the order the forward pass first reached it (entries never run come last)."""
    head: str
    """Path of the head entry."""
    head_found_by: str
    """How the head was identified, for people reading the map."""
    call_order: tuple[str, ...] = ()
    """Every module path in the order the forward pass first reached it (modules never run left out)."""

    @property
    def blocks(self) -> tuple[MapEntry, ...]:
        """The repeated units (transformer layers, ResNet blocks, ...), in forward order."""
        return tuple(e for e in self.entries if e.kind == "block")

    @property
    def tensors(self) -> int:
        return sum(e.tensors for e in self.entries)

    @property
    def params(self) -> int:
        return sum(e.params for e in self.entries)

    @property
    def trainable_tensors(self) -> int:
        return sum(e.trainable_tensors for e in self.entries)

    @property
    def trainable_params(self) -> int:
        return sum(e.trainable_params for e in self.entries)

    def entry(self, path: str) -> MapEntry:
        """The entry at `path`; raises KeyError when there is none."""
        for e in self.entries:
            if e.path == path:
                return e
        raise KeyError(path)

    def index(self, path: str) -> int:
        """Position of the entry at `path` in forward order."""
        return [e.path for e in self.entries].index(path)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (parameter names left out for brevity)."""
        entries = []
        for e in self.entries:
            d = asdict(e)
            d.pop("param_names")
            entries.append(d)
        return {
            "head": self.head,
            "head_found_by": self.head_found_by,
            "blocks": len(self.blocks),
            "tensors": self.tensors,
            "params": self.params,
            "trainable_tensors": self.trainable_tensors,
            "trainable_params": self.trainable_params,
            "entries": entries,
        }


@dataclass
class _Trace:
    """What one hooked forward pass saw."""

    first_call: dict[nn.Module, int]
    finished: list[nn.Module]
    last_output: dict[nn.Module, Any]
    output: Any


def inspect_model(model: nn.Module, example_batch: Batch | None, head: str | None = None) -> ModelMap:
    """Map `model` into entries in forward order and find its head.

    The model runs once on `example_batch` in eval mode under `torch.no_grad()`; its training
    flags and buffers (BatchNorm statistics) are left as they were. Without an example batch the
    map falls back to attribute order, which is right for most models but not guaranteed.

    Args:
        model: any `nn.Module`.
        example_batch: a tensor or a mapping of keyword tensors the model accepts, or None.
        head: path of the head, when the caller knows it better than the heuristics.

    Returns:
        The `ModelMap`.

    Raises:
        KeyError: `head` names no module of the model.
    """
    trace = _trace(model, example_batch) if example_batch is not None else _attribute_order(model)
    modules = dict(model.named_modules())
    if head is not None:
        if head not in modules:
            raise KeyError(f"head {head!r} is not a module of {type(model).__name__}")
        head_found_by = "given"
    else:
        head, head_found_by = _find_head(model, modules, trace)
    block_paths = _find_blocks(model, head)
    units = _units(model, set(block_paths), head)
    if not block_paths:
        # Nothing repeats: every top-level unit other than the head counts as a block.
        block_paths = [u for u in units if u != head and u in modules and u != ""]
    return _build_map(model, modules, units, set(block_paths), head, head_found_by, trace)


def _trace(model: nn.Module, example_batch: Batch) -> _Trace:
    first_call: dict[nn.Module, int] = {}
    finished: list[nn.Module] = []
    last_output: dict[nn.Module, Any] = {}

    def before(module: nn.Module, args: Any) -> None:
        first_call.setdefault(module, len(first_call))

    def after(module: nn.Module, args: Any, output: Any) -> None:
        finished.append(module)
        last_output[module] = output

    training = {m: m.training for m in model.modules()}
    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(before))
        handles.append(m.register_forward_hook(after))
    try:
        # eval mode so that tracing never updates BatchNorm statistics
        model.eval()
        with torch.no_grad():
            output = call_model(model, example_batch)
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag
    return _Trace(first_call, finished, last_output, output)


def _attribute_order(model: nn.Module) -> _Trace:
    """A stand-in trace when no example batch is given: modules in registration order."""
    modules = list(model.modules())
    return _Trace({m: i for i, m in enumerate(modules)}, modules, {}, None)


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _climb(path: str, modules: dict[str, nn.Module]) -> str:
    """Go up while the parent holds no parameters beyond this module's (Sequential(Dropout, Linear))."""
    while path:
        parent = _parent(path)
        if parent == "" or _n_params(modules[parent]) != _n_params(modules[path]):
            break
        path = parent
    return path


def _find_head(model: nn.Module, modules: dict[str, nn.Module], trace: _Trace) -> tuple[str, str]:
    names = {m: p for p, m in modules.items()}

    def usable(path: str) -> bool:
        module = modules.get(path)
        return module is not None and path != "" and _has_params(module) and module in trace.first_call

    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("classifier"):
        hinted = cfg["classifier"]
        hinted = hinted if isinstance(hinted, str) else hinted[0]
        if usable(hinted):
            return hinted, "timm pretrained_cfg['classifier']"
    origin = type(model).__module__
    for prefix, attrs in _LIBRARY_HEADS.items():
        if origin.startswith(prefix):
            for attr in attrs:
                if usable(attr):
                    return attr, f"{prefix.rstrip('.')} attribute '{attr}'"

    try:
        final = logits_of(trace.output)
    except TypeError:
        final = None
    producers = []
    for module, out in trace.last_output.items():
        try:
            produced = logits_of(out)
        except (TypeError, StopIteration):
            continue
        path = names[module]
        if final is not None and produced is final and path != "" and _has_params(module):
            producers.append(path)
    if producers:
        deepest = max(producers, key=lambda p: p.count(".") + 1)
        return _climb(deepest, modules), "the module whose output is the model's output"

    for attr in _COMMON_HEADS:
        if usable(attr):
            return attr, f"the conventional head name '{attr}'"

    for module in reversed(trace.finished):
        path = names[module]
        if path and next(module.parameters(recurse=False), None) is not None:
            how = (
                "the last module with parameters to run"
                if trace.last_output
                else "the last module with parameters, in attribute order (no example batch)"
            )
            return _climb(path, modules), how
    return "", "the whole model (it has no parameterised submodule)"


def _find_blocks(model: nn.Module, head: str) -> list[str]:
    """Children of a ModuleList/Sequential that repeat one type are blocks; outermost repetition wins."""
    blocks: list[str] = []

    def holds_head(path: str) -> bool:
        return path == head or head.startswith(path + ".") or path == ""

    def visit(prefix: str, module: nn.Module) -> None:
        children = [(f"{prefix}.{n}" if prefix else n, c) for n, c in module.named_children()]
        repeated: set[type] = set()
        if isinstance(module, (nn.Sequential, nn.ModuleList)):
            by_type: dict[type, int] = defaultdict(int)
            for path, child in children:
                if _has_params(child) and not holds_head(path):
                    by_type[type(child)] += 1
            repeated = {t for t, n in by_type.items() if n >= 2}
        for path, child in children:
            if path == head:
                continue
            if type(child) in repeated and _has_params(child) and not holds_head(path):
                blocks.append(path)
            else:
                visit(path, child)

    visit("", model)
    return blocks


def _units(model: nn.Module, blocks: set[str], head: str) -> list[str]:
    """Blocks, the head, and the largest block-free subtrees around them (and loose parameters)."""
    special = blocks | {head}
    units: list[str] = []

    def holds_special(path: str) -> bool:
        return path == "" or any(s == path or s.startswith(path + ".") for s in special)

    def visit(prefix: str, module: nn.Module) -> None:
        if prefix in special or not holds_special(prefix):
            if _has_params(module) or prefix in special:
                units.append(prefix)
            return
        for name, _ in module.named_parameters(recurse=False):
            units.append(f"{prefix}.{name}" if prefix else name)
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    if head == "":
        return [""]
    visit("", model)
    return units


def is_under(path: str, prefix: str) -> bool:
    """Whether the module path `path` is `prefix` or a module inside it."""
    return path == prefix or path.startswith(prefix + ".")


def is_norm_module(module: nn.Module | None) -> bool:
    """Whether `module` is a normalisation layer (LayerNorm, BatchNorm, GroupNorm, RMSNorm, or named *Norm*)."""
    if module is None:
        return False
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)
    return isinstance(module, norms) or "Norm" in type(module).__name__


def _build_map(
    model: nn.Module,
    modules: dict[str, nn.Module],
    units: list[str],
    blocks: set[str],
    head: str,
    head_found_by: str,
    trace: _Trace,
) -> ModelMap:
    owned: dict[str, list[tuple[str, nn.Parameter]]] = {u: [] for u in units}
    by_length = sorted(units, key=len, reverse=True)
    for name, param in model.named_parameters():
        owner = next(u for u in by_length if u == "" or name == u or name.startswith(u + "."))
        owned[owner].append((name, param))

    def position(unit: str) -> float:
        module = modules[unit] if unit in modules else modules[_parent(unit)]
        # A unit runs when anything inside it runs: a ModuleList is never called itself, and a module
        # whose forward() is called directly (timm's HRNet downsamplers) fires no hook of its own.
        return min((trace.first_call[m] for m in module.modules() if m in trace.first_call), default=float("inf"))

    ordered = sorted(units, key=position)
    block_positions = [position(u) for u in ordered if u in blocks]
    first_block = min(block_positions, default=float("inf"))
    last_block = max(block_positions, default=float("-inf"))

    entries = []
    for unit in ordered:
        module = modules.get(unit)
        pos = position(unit)
        if unit == head:
            kind: Kind = "head"
        elif unit in blocks:
            kind = "block"
        elif pos == float("inf"):
            kind = "other"
        elif pos < first_block:
            has_embedding = module is None or any(
                isinstance(m, nn.Embedding) or "Embed" in type(m).__name__ for m in module.modules()
            )
            kind = "embedding" if has_embedding else "stem"
        elif pos > last_block and is_norm_module(module):
            kind = "norm"
        else:
            kind = "other"
        params = owned[unit]
        entries.append(
            MapEntry(
                path=unit,
                kind=kind,
                module_type=type(module).__name__ if module is not None else "Parameter",
                tensors=len(params),
                params=sum(p.numel() for _, p in params),
                trainable_tensors=sum(p.requires_grad for _, p in params),
                trainable_params=sum(p.numel() for _, p in params if p.requires_grad),
                param_names=tuple(n for n, _ in params),
                called=pos != float("inf"),
            )
        )
    names = {m: p for p, m in modules.items()}
    call_order = tuple(names[m] for m in sorted(trace.first_call, key=trace.first_call.get) if m in names)
    return ModelMap(entries=tuple(entries), head=head, head_found_by=head_found_by, call_order=call_order)
