"""Run-folder files written so that a crash never leaves a half-written one.

Every file is written to a temporary name and renamed into place; a checkpoint is a folder written
whole as `checkpoint.new/` and swapped in, so `checkpoint/` is always a complete earlier state.
Tensors go to safetensors; everything else to JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from frostline.errors import FrostlineError


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors to a safetensors file via a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer, detached copies on the CPU (tied weights stored twice)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a safetensors file written by frostline into `model` (all keys must match)."""
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FrostlineError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    schedule: Any,
    rng: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> None:
    """Write a complete checkpoint into `folder/checkpoint/`, replacing the previous one only once whole."""
    new, current, old = folder / "checkpoint.new", folder / "checkpoint", folder / "checkpoint.old"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    tensors = {f"model.{k}": v for k, v in model_tensors(model).items()}
    tensors |= {f"rng.{k}": v for k, v in rng.items()}
    meta: dict[str, Any] = {"trainer": state}
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        tensors |= opt_tensors
    if schedule is not None:
        meta["schedule"] = schedule.state_dict()
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(new / "tensors.safetensors"))
    (new / "state.json").write_text(json.dumps(meta, indent=1, default=float))
    if current.exists():
        shutil.rmtree(old, ignore_errors=True)
        current.rename(old)
    new.rename(current)
    shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """The latest complete checkpoint of a run folder: model, rng, optimizer and schedule state, trainer state."""
    for name in ("checkpoint", "checkpoint.old"):
        path = folder / name
        if (path / "state.json").is_file() and (path / "tensors.safetensors").is_file():
            meta = json.loads((path / "state.json").read_text())
            tensors = load_file(str(path / "tensors.safetensors"))
            return {
                "model": {k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
                "rng": {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")},
                "optimizer": _unflatten_optimizer(tensors, meta["optimizer"]) if "optimizer" in meta else None,
                "schedule": meta.get("schedule"),
                "trainer": meta["trainer"],
            }
    raise FrostlineError(f"{folder} holds no complete checkpoint to resume from (looked for {folder}/checkpoint/)")
