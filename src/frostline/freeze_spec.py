"""Freeze specs: what to train, as one serialisable value, parsed from a string or a dict.

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

`last:N` and `from:PATH` count in forward order, so they see only the entries the example forward pass
ran (an unused branch, a block skipped by this input): those have no place in that order and get no
gradient from it, so they stay frozen. `none` and `train=PATH` train them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import Any, Literal

from frostline.errors import FreezeSpecError

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
        elif self.globs != ():
            problems.append(
                f"globs are the patterns of train= and freeze=; mode {self.mode!r} takes none, got {self.globs!r}"
            )
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
            unknown = sorted(set(spec) - known, key=str)
            if unknown:
                raise FreezeSpecError(f"unknown freeze spec keys {unknown}; the keys are {sorted(known)}")
            values = dict(spec)
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


# Python refuses to read or print integers longer than this (sys.get_int_max_str_digits)
_MAX_DIGITS = 4300


def _breaks_clause(text: str, separator: str) -> bool:
    """Whether `text` would split when its spec string is read back (whitespace, ';' or `separator`)."""
    return any(c.isspace() or c in (";", separator) for c in text)
