"""Run-folder files written so that a crash never leaves a half-written one, and read back only as data.

Every file is written to a temporary name, flushed to disk (fsync) and renamed into place; a checkpoint
is a folder written whole as `checkpoint.new/` and swapped in, so `checkpoint/` is always a complete
earlier state. Tensors go to safetensors, everything else to JSON: nothing read back is unpickled.
Each tensor file's SHA-256 is returned when written and checked when read, so a file that changed
since frostline wrote it is refused, by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from frostline.errors import FrostlineError


class WeightFileError(FrostlineError):
    """A weight or checkpoint file is missing, damaged, or not the file frostline wrote."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_folder(folder: Path) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def write_durably(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file, fsync it, rename it over `path`, and fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    _fsync_folder(path.parent)


def tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Tensors as the bytes of a safetensors file. Serialising copies them, so no copy is made first; tensors that
    share memory (tied weights) must arrive as separate copies, as `model_tensors` gives them."""
    return save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file, fsync and a rename."""
    write_durably(path, text.encode("utf-8"))


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save tensors to a safetensors file via a temporary file, fsync and a rename; returns the file's SHA-256."""
    data = tensor_bytes(tensors, metadata)
    write_durably(path, data)
    return sha256(data)


def read_tensors(path: Path, expected_sha256: str | None, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, after checking its SHA-256 against the one recorded when it was written.

    Args:
        path: the file.
        expected_sha256: its recorded SHA-256 (None: not checked).
        data: the file's bytes when already read.

    Raises:
        WeightFileError: the file is missing, changed since it was written, or not a safetensors file.
    """
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise WeightFileError(f"{path} cannot be read: {err.strerror or err}") from err
    if expected_sha256 is not None and sha256(data) != expected_sha256:
        raise WeightFileError(
            f"{path} has changed since frostline wrote it (SHA-256 {sha256(data)[:12]}..., recorded "
            f"{expected_sha256[:12]}...): it is damaged or was replaced, so its weights are not the run's; "
            "restore the original file, or train again"
        )
    try:
        return load_safetensors(data)
    except Exception as err:  # safetensors raises its own error types for any malformed file
        raise WeightFileError(
            f"{path} is not a safetensors file frostline can read ({type(err).__name__}: {err}); "
            "frostline reads weights only as safetensors, never by unpickling"
        ) from err


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer, detached copies on the CPU (tied weights stored twice)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load tensors read from `path` into `model` (all keys and shapes must match).

    Raises:
        WeightFileError: the tensors do not fit the model.
    """
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise WeightFileError(f"{path} does not fit the model: {str(err).splitlines()[-1].strip()}") from err
    if missing or unexpected:
        raise WeightFileError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


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
    examples: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a complete checkpoint into `folder/checkpoint/`, replacing the previous one only once whole; `examples`
    are the validation examples' results per epoch (for the monitor after a resume)."""
    new, current, old = folder / "checkpoint.new", folder / "checkpoint", folder / "checkpoint.old"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    tensors = {f"model.{k}": v for k, v in model_tensors(model).items()}
    tensors |= {f"rng.{k}": v for k, v in rng.items()}
    tensors |= {f"examples.{k}": v for k, v in (examples or {}).items()}
    meta: dict[str, Any] = {"trainer": state}
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        tensors |= opt_tensors
    if schedule is not None:
        meta["schedule"] = schedule.state_dict()
    meta["sha256"] = atomic_save_tensors(new / "tensors.safetensors", tensors)
    atomic_write_text(new / "state.json", json.dumps(meta, indent=1, default=float))
    if current.exists():
        shutil.rmtree(old, ignore_errors=True)
        current.rename(old)
    new.rename(current)
    _fsync_folder(folder)
    shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """The latest complete checkpoint of a run folder: model, rng, optimizer and schedule state, trainer state.

    Raises:
        WeightFileError: no complete checkpoint, or one whose files are damaged or changed.
    """
    for name in ("checkpoint", "checkpoint.old"):
        path = folder / name
        if (path / "state.json").is_file() and (path / "tensors.safetensors").is_file():
            try:
                meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
                position = meta["trainer"]["position"]
                int(position["stage"]), int(position["epoch"])
                list(meta["trainer"]["history"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise WeightFileError(
                    f"{path / 'state.json'} is damaged ({type(err).__name__}: {err}); the run cannot resume from it"
                ) from err
            tensors = read_tensors(path / "tensors.safetensors", meta.get("sha256"))
            try:
                optimizer = _unflatten_optimizer(tensors, meta["optimizer"]) if "optimizer" in meta else None
            except (KeyError, ValueError, TypeError) as err:
                raise WeightFileError(f"{path} holds an optimizer state that does not read back ({err})") from err
            return {
                "model": {k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
                "rng": {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")},
                "examples": {k[9:]: v for k, v in tensors.items() if k.startswith("examples.")},
                "optimizer": optimizer,
                "schedule": meta.get("schedule"),
                "trainer": meta["trainer"],
            }
    raise WeightFileError(f"{folder} holds no complete checkpoint to resume from (looked for {folder}/checkpoint/)")
