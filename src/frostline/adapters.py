"""LoRA adapters through peft: which modules to adapt, adding the adapters, checking them, merging them for export.

A `lora:...` freeze spec (freeze_spec.py) trains low-rank adapters beside frozen weights, and the new head in full.
The adapters are a structural change, so they are added once, before the model is mapped (`adapt_and_map`): the map,
every stage's freeze plan, the guard and the cache key then see the adapted model, whose base weights carry peft's
names (`...query.base_layer.weight`). `freeze` stays the one place that decides what trains.

peft does the work (`inject_adapter_in_model`, each layer's `merge`); frostline chooses the targets, records them in
the run folder so a run is rebuilt with the same adapters, and never adapts the head (peft issue #310: a head left
out of what is saved is lost; here the head trains in full and is saved with everything else).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from frostline.batches import Batch
from frostline.errors import ConfigError, FreezeSpecError
from frostline.freeze_spec import FreezeSpec
from frostline.inspect import ModelMap, inspect_model, is_under

_ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
"""Layer types peft's LoRA adapts (and transformers' GPT-2 style `Conv1D`, recognised by name)."""

_ATTENTION_NAMES = (("query", "value"), ("q_proj", "v_proj"), ("qkv",), ("c_attn",), ("Wqkv",), ("q", "v"))
"""Attention projections of common architectures when peft has no mapping for the model type."""


@dataclass(frozen=True)
class Adapters:
    """The LoRA adapters a model carries."""

    spec: FreezeSpec
    """The settings, with `globs` the exact paths of the adapted modules."""
    tensors: int
    params: int
    chosen_by: str
    """How the targets were chosen, for people."""

    @property
    def modules(self) -> tuple[str, ...]:
        return self.spec.globs

    def record(self) -> str:
        """The spec string that rebuilds these adapters on the same model (head.json)."""
        return str(self.spec)

    def describe(self) -> str:
        names = sorted({path.rsplit(".", 1)[-1] for path in self.modules})
        return (
            f"LoRA (peft): r={self.spec.r}, alpha={self.spec.alpha:g}, dropout={self.spec.dropout:g} on "
            f"{len(self.modules):,d} modules ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}; "
            f"{self.chosen_by}): {self.tensors:,d} adapter tensors, {self.params:,d} parameters"
        )


def is_adapter(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA adapter (peft's `lora_A`, `lora_B`, `lora_embedding_A`, ...)."""
    return any(part.startswith("lora_") for part in name.split("."))


def adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of `model` that carry LoRA adapters, by path."""
    return {
        path: module
        for path, module in model.named_modules()
        if hasattr(module, "base_layer") and (hasattr(module, "lora_A") or hasattr(module, "lora_embedding_A"))
    }


def recipe_lora(stages: Sequence[Any]) -> FreezeSpec | None:
    """The one set of LoRA adapters a recipe asks for (its stages' `lora:...` specs), or None.

    Raises:
        ConfigError: two stages ask for different adapters (a model carries one set through the whole run).
    """
    asked = [(stage.name, FreezeSpec.parse(stage.freeze)) for stage in stages]
    lora = [(name, spec) for name, spec in asked if spec.mode == "lora"]
    if not lora:
        return None
    first_name, first = lora[0]
    for name, spec in lora[1:]:
        if _settings(spec) != _settings(first):
            raise ConfigError(
                f"stages {first_name!r} and {name!r} ask for different LoRA adapters ({_settings(first)} and "
                f"{_settings(spec)}); the model carries one set through the run: give both stages the same options"
            )
    return first


def _settings(spec: FreezeSpec) -> str:
    """The adapter part of a lora spec (without bn=)."""
    return str(dataclasses.replace(spec, bn="eval"))


def adapt_and_map(
    model: nn.Module, example_batch: Batch | None, stages: Sequence[Any] = (), spec: str | FreezeSpec | None = None
) -> tuple[ModelMap, Adapters | None]:
    """Map the model, first adding the LoRA adapters that `spec` or the recipe's `stages` ask for, if any.

    Raises:
        ConfigError: the stages ask for different adapters, or peft is not installed.
        FreezeSpecError: the targets name nothing adaptable.
    """
    lora = FreezeSpec.parse(spec) if spec is not None else recipe_lora(stages)
    model_map = inspect_model(model, example_batch)
    if lora is None or lora.mode != "lora":
        return model_map, None
    adapters = add_lora(model, lora, model_map)
    return inspect_model(model, example_batch), adapters


def add_lora(
    model: nn.Module, spec: str | FreezeSpec, model_map: ModelMap | None = None, example_batch: Batch | None = None
) -> Adapters:
    """Add LoRA adapters to `model` in place through peft (`inject_adapter_in_model`); the head is never adapted.

    Parameters that existed keep their `requires_grad`: what trains is decided by `freeze(model, "lora...")`.

    Raises:
        ConfigError: peft is not installed, or the model carries adapters already.
        FreezeSpecError: the spec is not `lora`, or its targets name nothing adaptable (with the closest names).
    """
    spec = FreezeSpec.parse(spec)
    if spec.mode != "lora":
        raise FreezeSpecError(f"add_lora takes a lora:... spec, got {spec}")
    if adapted_modules(model):
        raise ConfigError("the model carries LoRA adapters already; add them once (frostline fit does it for you)")
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:
        raise ConfigError(f"freeze {spec} trains LoRA adapters through peft: pip install 'frostline[lora]'") from err
    model_map = model_map or inspect_model(model, example_batch)
    targets, chosen_by = _targets(model, model_map, spec.globs)
    was = {name: p.requires_grad for name, p in model.named_parameters()}
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(targets))
    inject_adapter_in_model(config, model)
    adapters = {name: p for name, p in model.named_parameters() if is_adapter(name)}
    for name, param in model.named_parameters():
        if name not in adapters:
            param.requires_grad_(was[_base_name(name)])
    exact = FreezeSpec(mode="lora", r=spec.r, alpha=spec.alpha, dropout=spec.dropout, globs=tuple(targets))
    return Adapters(exact, len(adapters), sum(p.numel() for p in adapters.values()), chosen_by)


def _base_name(name: str) -> str:
    """A base weight's name before peft wrapped its layer: a.query.base_layer.weight -> a.query.weight."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, _ADAPTABLE) or type(module).__name__ == "Conv1D"


def _targets(model: nn.Module, model_map: ModelMap, globs: tuple[str, ...]) -> tuple[list[str], str]:
    """The paths of the modules to adapt, and how they were chosen."""
    head = model_map.head
    modules = {p: m for p, m in model.named_modules() if p and _adaptable(m)}
    outside_head = {p: m for p, m in modules.items() if not is_under(p, head)}
    if globs:
        return _named_targets(model, modules, head, globs), "targets=" + ",".join(globs)
    blocks = [b.path for b in model_map.blocks]
    inside = {p: m for p, m in outside_head.items() if any(is_under(p, b) for b in blocks)} or outside_head
    where = f"in {len(blocks)} blocks" if blocks else "outside the head"
    model_type = _model_type(model)
    namings = []
    known = _peft_targets().get(model_type) if model_type else None
    if known:
        namings.append((tuple(known), f"peft's targets for {model_type}, {where}"))
    namings += [(names, f"the attention projections {where}") for names in _ATTENTION_NAMES]
    for names, why in namings:
        hits = [p for p, m in inside.items() if p.rsplit(".", 1)[-1] in names and not isinstance(m, nn.Embedding)]
        if hits:
            return hits, why
    linear = [p for p, m in inside.items() if isinstance(m, nn.Linear)]
    if linear:
        return linear, f"every Linear layer {where} (no attention projections known for this architecture)"
    convs = [p for p, m in inside.items() if isinstance(m, nn.Conv2d) and m.groups == 1]
    if convs:
        return convs, f"every ungrouped Conv2d {where} (the model has no Linear layers there)"
    raise FreezeSpecError(
        f"lora: no layer peft can adapt (Linear, Conv, Embedding) outside the head {head}; "
        "this model cannot take LoRA adapters: use head, last:N or none"
    )


def _named_targets(model: nn.Module, modules: dict[str, nn.Module], head: str, globs: tuple[str, ...]) -> list[str]:
    """The adaptable modules each pattern names: by path or by name, or inside a module the pattern names."""
    chosen: dict[str, None] = {}
    problems = []
    all_paths = [p for p, _ in model.named_modules() if p]
    for glob in globs:
        named = [p for p in all_paths if _names(glob, p)]
        hits = [p for p in modules if any(is_under(p, n) for n in named)]
        if not hits:
            close = difflib.get_close_matches(glob, sorted({p.rsplit(".", 1)[-1] for p in modules}) + all_paths, n=3)
            hint = f"closest: {', '.join(close)}" if close else f"adaptable layers: {', '.join(list(modules)[:8])}"
            problems.append(f"lora: targets={glob} names no layer peft can adapt (Linear, Conv, Embedding); {hint}")
        chosen.update(dict.fromkeys(hits))
    in_head = [p for p in chosen if is_under(p, head)]
    if in_head:
        problems.append(
            f"lora: targets name the head ({', '.join(in_head[:3])}), which trains in full beside the adapters; "
            "leave it out of targets"
        )
    if problems:
        raise FreezeSpecError("\n".join(problems))
    return list(chosen)


def _names(glob: str, path: str) -> bool:
    """Whether a targets pattern names the module at `path`: its whole path, or its path's end (query, layer.5.*)."""
    return fnmatchcase(path, glob) or fnmatchcase(path, "*." + glob)


def _model_type(model: nn.Module) -> str | None:
    """The transformers `model_type` of the model or the first submodule that has a config (an encoder inside)."""
    for module in model.modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(model_type, str):
            return model_type
    return None


def _peft_targets() -> dict[str, list[str]]:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING


def check_adapters(model: nn.Module, spec: FreezeSpec) -> None:
    """Check that the model carries the adapters a `lora` spec trains.

    Raises:
        FreezeSpecError: no adapters (with how to add them), or adapters with other settings than the spec's.
    """
    carried = adapted_modules(model)
    if not carried:
        raise FreezeSpecError(
            f"freeze {spec} trains LoRA adapters, and this model carries none; add them first with "
            f"frostline.add_lora(model, {str(spec).split(';')[0]!r}) (frostline fit does it for you)"
        )
    problems = []
    for path, module in carried.items():
        name = next(iter(module.r))
        dropout = module.lora_dropout[name]
        have = (module.r[name], float(module.lora_alpha[name]), float(getattr(dropout, "p", 0.0)))
        if have != (spec.r, spec.alpha, spec.dropout):
            problems.append(
                f"{path} carries adapters with r={have[0]}, alpha={have[1]:g}, dropout={have[2]:g}, and the spec "
                f"asks r={spec.r}, alpha={spec.alpha:g}, dropout={spec.dropout:g}"
            )
            break
    paths = [p for p, _ in model.named_modules() if p]
    # a pattern may name a module whose layers carry the adapters (targets=attention)
    missed = [g for g in spec.globs if not any(is_under(c, p) for p in paths if _names(g, p) for c in carried)]
    if missed:
        problems.append(f"targets {', '.join(missed)} match none of the modules that carry adapters")
    if problems:
        raise FreezeSpecError("; ".join(problems) + "; a model carries one set of adapters: give the same options")


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into the weight it adapts (peft's `merge`, checked for NaN) and put the plain layer
    back, so the model runs without peft; returns how many layers were merged."""
    carried = adapted_modules(model)
    for path, module in carried.items():
        module.merge(safe_merge=True)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, module.get_base_layer())
    if carried and hasattr(model, "peft_config"):
        del model.peft_config
    return len(carried)
