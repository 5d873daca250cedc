"""Freeze specs: what to train, as one serialisable value, parsed from a string or a dict.

Spec strings (clauses separated by ";" or spaces):
    head             the head only (linear probe)
    last:N           the last N blocks and everything after them (final norm, pooler, head)
    from:PATH        the entry PATH and everything after it in forward order
    none             everything (full fine-tuning)
    bitfit           every bias, and the head
    train=GLOB,...   only the parameters (or entries) matching a glob
    freeze=GLOB,...  everything but the parameters (or entries) matching a glob
    lora[:OPTIONS]   LoRA adapters (through peft) and the head; the weights they adapt stay frozen. OPTIONS:
                     r=8, alpha=16 (default 2r), dropout=0.05, targets=GLOB,GLOB,... (module paths or
                     names, e.g. targets=query,value; default: the architecture's attention projections),
                     targets last: every item after it is another pattern
    bn=eval|train    frozen BatchNorm keeps its running statistics (eval, the default) or updates them
    bn=fixed         every BatchNorm, trainable ones too, normalises with its running statistics (its
                     scale and shift still train): batch statistics of small fine-tuning batches are noisy

`last:N` and `from:PATH` count in forward order, so they see only the entries the example forward pass
ran (an unused branch, a block skipped by this input): those have no place in that order and get no
gradient from it, so they stay frozen. `none` and `train=PATH` train them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import Any, Literal

from frostline.errors import FreezeSpecError

Mode = Literal["head", "last", "from", "none", "bitfit", "train", "freeze", "lora"]
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
    "lora:r=8,alpha=16,dropout=0.05,targets=GLOB,...",
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
    """For `train` / `freeze`: parameter-name or entry-path patterns (fnmatch); for `lora`: the modules to adapt
    (paths or names; empty: the architecture's default targets)."""
    r: int | None = None
    """For `lora`: the adapters' rank (default 8)."""
    alpha: float | None = None
    """For `lora`: the adapters' scale numerator, scaling = alpha / r (default 2r)."""
    dropout: float | None = None
    """For `lora`: dropout on the adapters' input (default 0.05)."""
    bn: BnPolicy = "eval"
    """Frozen BatchNorm: `eval` keeps running statistics fixed, even after model.train(); `train` lets them update;
    `fixed`: every BatchNorm, trainable or not, keeps its running statistics (its affine parameters still train)."""

    def __post_init__(self) -> None:
        problems = []
        if self.mode == "lora":
            problems += self._lora_problems()
        elif (self.r, self.alpha, self.dropout) != (None, None, None):
            problems.append(
                f"r, alpha and dropout are options of lora:...; mode {self.mode!r} takes none, "
                f"got r={self.r!r}, alpha={self.alpha!r}, dropout={self.dropout!r}"
            )
        if self.mode not in ("head", "last", "from", "none", "bitfit", "train", "freeze", "lora"):
            problems.append(f"unknown freeze mode {self.mode!r}; use one of {', '.join(_FORMS)}")
        if self.mode == "last" and (not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 0):
            problems.append(f"last:N needs a whole number N >= 0, got {self.n!r}")
        if self.mode != "last" and self.n is not None:
            problems.append(f"n is the N of last:N; mode {self.mode!r} takes none, got n={self.n!r}")
        if self.mode == "from" and not (isinstance(self.path, str) and self.path):
            problems.append(f"from:PATH needs the path of a block, for example from:encoder.layer.4; got {self.path!r}")
        elif self.mode == "from" and _breaks_clause(self.path, "="):
            problems.append(f"from:PATH needs a path without spaces, ';' or '=', got {self.path!r}")
        if self.mode != "from" and self.path is not None:
            problems.append(f"path is the PATH of from:PATH; mode {self.mode!r} takes none, got path={self.path!r}")
        if self.mode in ("train", "freeze"):
            if not isinstance(self.globs, tuple) or not self.globs:
                problems.append(
                    f"{self.mode}=GLOB,... needs at least one pattern, for example {self.mode}=classifier.*; "
                    f"got {self.globs!r}"
                )
            elif not all(isinstance(g, str) and g and not _breaks_clause(g, ",") for g in self.globs):
                problems.append(
                    f"{self.mode}=GLOB,... needs patterns without spaces, ';' or ',', got {self.globs!r}; "
                    f"give several patterns as a list, for example {self.mode}=head.*,norm"
                )
        elif self.globs != () and self.mode != "lora":
            problems.append(
                f"globs are the patterns of train= and freeze=; mode {self.mode!r} takes none, got {self.globs!r}"
            )
        if self.bn not in ("eval", "train", "fixed"):
            problems.append(f"bn={self.bn} is not a BatchNorm policy; use bn=eval, bn=train or bn=fixed")
        if problems:
            raise FreezeSpecError("\n".join(problems))

    def _lora_problems(self) -> list[str]:
        """Check lora's options, filling in the defaults of those not given."""
        if self.r is None:
            object.__setattr__(self, "r", 8)
        if self.alpha is None and isinstance(self.r, int) and self.r >= 1:
            object.__setattr__(self, "alpha", float(2 * self.r))
        if self.dropout is None:
            object.__setattr__(self, "dropout", 0.05)
        problems = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or not 1 <= self.r <= _MAX_RANK:
            problems.append(f"lora: r is the adapters' rank, a whole number from 1 to {_MAX_RANK}; got {self.r!r}")
        if self.alpha is None:
            pass  # r is invalid, so alpha has no default to take
        elif not _is_number(self.alpha) or not 0 < self.alpha < float("inf"):
            problems.append(
                f"lora: alpha must be a number > 0 (the scale is alpha / r; 2r is usual), got {self.alpha!r}"
            )
        else:
            object.__setattr__(self, "alpha", float(self.alpha))
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            problems.append(f"lora: dropout must be a number in [0, 1), got {self.dropout!r}")
        else:
            object.__setattr__(self, "dropout", float(self.dropout))
        if not isinstance(self.globs, tuple) or not all(
            isinstance(g, str) and g and not _breaks_clause(g, ",") for g in self.globs
        ):
            problems.append(
                f"lora: targets are module paths or names without spaces, ';' or ',', got {self.globs!r}; "
                "give several as targets=query,value"
            )
        return problems

    def __str__(self) -> str:
        selection = {
            "last": f"last:{self.n}",
            "from": f"from:{self.path}",
            "train": "train=" + ",".join(self.globs),
            "freeze": "freeze=" + ",".join(self.globs),
        }.get(self.mode, self.mode)
        if self.mode == "lora":
            selection = self._lora_string()
        return selection if self.bn == "eval" else f"{selection};bn={self.bn}"

    def _lora_string(self) -> str:
        options = f"lora:r={self.r},alpha={self.alpha:g},dropout={self.dropout:g}"
        return options + (",targets=" + ",".join(self.globs) if self.globs else "")

    @classmethod
    def parse(cls, spec: str | dict[str, Any] | FreezeSpec) -> FreezeSpec:
        """Read a spec string (see the module docstring), a dict of this class's fields, or a spec."""
        if isinstance(spec, FreezeSpec):
            return spec
        if isinstance(spec, dict):
            known = {f.name for f in fields(cls)} | {"targets"}
            unknown = sorted(set(spec) - known, key=str)
            if unknown:
                raise FreezeSpecError(f"unknown freeze spec keys {unknown}; the keys are {sorted(known)}")
            values = dict(spec)
            if "targets" in values and "globs" not in values:
                values["globs"] = values.pop("targets")
            if isinstance(values.get("globs"), str):
                values["globs"] = (values["globs"],)
            elif isinstance(values.get("globs"), list):
                values["globs"] = tuple(values["globs"])
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
            if "bn" in values:
                raise FreezeSpecError(f"freeze spec {text!r} sets bn twice (bn={values['bn']} and {clause}); give one")
            values["bn"] = arg
            continue
        if "mode" in values:
            raise FreezeSpecError(f"freeze spec {text!r} has two selections ({values['mode']} and {key}); give one")
        if (clause == "lora" or clause.startswith("lora:")) and "mode" not in values:
            values.update(mode="lora", **_lora_options(clause.removeprefix("lora").removeprefix(":"), text))
            continue
        if key in _PLAIN_MODES and not sep:
            values["mode"] = key
        elif key == "last" and sep == ":":
            # ASCII digits only: int() rejects some Unicode digits (superscripts) that isdigit() accepts
            if not (arg.isascii() and arg.isdigit()):
                raise FreezeSpecError(f"last:N needs a whole number N >= 0, got {arg!r} in {text!r}")
            if len(arg) > _MAX_DIGITS:
                raise FreezeSpecError(f"last:N counts blocks; a {len(arg):,d}-digit N is no block count")
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


_LORA_OPTIONS = ("r", "alpha", "dropout", "targets")
_MAX_RANK = 4096


def _lora_options(text: str, spec: str) -> dict[str, Any]:
    """`r=8,alpha=16,dropout=0.05,targets=a,b` -> field values; every item after targets= is another target."""
    values: dict[str, Any] = {}
    targets: list[str] | None = None
    for item in (i for i in text.split(",") if i):
        key, sep, arg = item.partition("=")
        if not sep and targets is not None:
            targets.append(item)
            continue
        if key not in _LORA_OPTIONS or not sep:
            close = difflib.get_close_matches(key, _LORA_OPTIONS, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}=?)" if close else ""
            raise FreezeSpecError(
                f"lora option {item!r} in {spec!r} is unknown{hint}; the options are r=8, alpha=16, dropout=0.05, "
                "targets=GLOB,... (targets last)"
            )
        if key in values or (key == "targets" and targets is not None):
            raise FreezeSpecError(f"lora option {key} is given twice in {spec!r}; give it once")
        if key == "targets":
            targets = [arg] if arg else []
        elif key == "r":
            if not (arg.isascii() and arg.isdigit() and len(arg) < 8):
                raise FreezeSpecError(f"lora: r is a whole number (the adapters' rank), got {arg!r} in {spec!r}")
            values["r"] = int(arg)
        else:
            try:
                values[key] = float(arg)
            except ValueError:
                raise FreezeSpecError(f"lora: {key} must be a number, got {arg!r} in {spec!r}") from None
    if targets is not None:
        if not targets:
            raise FreezeSpecError(f"lora: targets= names no module in {spec!r}; e.g. targets=query,value")
        values["globs"] = tuple(targets)
    return values


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Python refuses to read or print integers longer than this (sys.get_int_max_str_digits)
_MAX_DIGITS = 4300


def _breaks_clause(text: str, separator: str) -> bool:
    """Whether `text` would split when its spec string is read back (whitespace, ';' or `separator`)."""
    return any(c.isspace() or c in (";", separator) for c in text)
