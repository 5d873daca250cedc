"""The run folder: choosing one that destroys nothing, and its record (run.json).

`run.json` marks a folder as frostline's and records what the folder alone cannot prove: the SHA-256 of
each weight file as it was written (checked before the file is used again) and every setting changed
when the run was resumed. A folder that holds other files is never written into without `--overwrite`;
a start that failed before its first checkpoint leaves nothing behind, or a folder the same command reuses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from frostline.checkpoint import atomic_write_text, read_tensors, sha256, tensor_bytes, write_durably
from frostline.config import FitConfig, code_refs, config_from_dict
from frostline.errors import ConfigError

RECORD = "run.json"
FORMAT = "frostline run"
STARTED_FILES = (
    "config.json",
    "head.json",
    "data.json",
    "metrics.jsonl",
    "best.safetensors",
    ".best.safetensors.pending",
    "report.png",
    RECORD,
)
"""What a run writes before its first checkpoint; removed again when that start fails."""


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text.split("/")[-1].split(":")[-1]).strip("-").lower() or "run"


def has_checkpoint(folder: Path) -> bool:
    return (folder / "checkpoint").is_dir() or (folder / "checkpoint.old").is_dir()


def is_run(folder: Path) -> bool:
    """Whether frostline made this folder (its record, or the files of a run from before records were kept)."""
    return (folder / RECORD).is_file() or ((folder / "metrics.jsonl").is_file() and (folder / "config.json").is_file())


def is_failed_start(folder: Path) -> bool:
    """A run folder whose start ended before its first epoch did: nothing in it is worth keeping."""
    if not is_run(folder) or has_checkpoint(folder):
        return False
    metrics = folder / "metrics.jsonl"
    return not metrics.is_file() or metrics.stat().st_size == 0


def _check_writable(folder: Path, option: str) -> None:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{option} {folder}: {probe} is a file, so no folder can be made there; choose another")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {folder}: {probe} is not writable by this user; choose another folder")


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")


def choose_run_dir(config: FitConfig, overwrite: bool = False) -> Path:
    """The folder a new run writes to, checked before any work starts; nothing is created yet.

    `run.output` when set, else runs/<name> with -2, -3, ... added rather than touch an earlier run. A folder
    left by a start that failed before its first epoch is reused.

    Raises:
        ConfigError: the output folder holds a run (resume it) or files that are not a run (unless `overwrite`),
            or cannot be written.
    """
    if config.run.output:
        folder = Path(config.run.output).expanduser()
        _check_writable(folder, "run.output")
        if not folder.exists() or is_failed_start(folder):
            return folder
        if not folder.is_dir():
            raise ConfigError(f"run.output {folder} is a file, not a folder; choose another output")
        if not any(folder.iterdir()):
            return folder
        if is_run(folder) and not overwrite:
            raise ConfigError(
                f"run.output {folder} already holds a run; resume it with --resume {folder}, or choose another output"
            )
        if not overwrite:
            raise ConfigError(
                f"run.output {folder} is not empty and is not a frostline run: it holds {_listing(folder)}; choose "
                "another output, or pass --overwrite to write into it (files with a run file's name are replaced)"
            )
        return folder
    name = config.run.name or f"{_slug(config.model.ref)}-{_slug(config.data.ref)}"
    root = Path("runs")
    _check_writable(root / name, "run.name")
    folder, n = root / name, 2
    while folder.exists() and not is_failed_start(folder):
        folder = root / f"{name}-{n}"
        n += 1
    return folder


def resume_dir(resume: str | Path) -> Path:
    """The folder of a run to resume.

    Raises:
        ConfigError: it is not a run folder, or holds no checkpoint.
    """
    folder = Path(resume).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--resume {folder}: no config.json there, so this is not a frostline run folder")
    if not has_checkpoint(folder):
        raise ConfigError(
            f"--resume {folder}: no checkpoint/ in that folder (the run ended before its first epoch), so there is "
            f"nothing to resume; start it again with --output {folder}"
        )
    _check_writable(folder, "--resume")
    return folder


def start(folder: Path, runtime: dict[str, Any] | None = None) -> None:
    """Create the folder of a new run and write a fresh record (with how the precision was chosen, `runtime`, so
    that a resume computes as the run did). What a failed start left is cleared; so is an earlier run in the folder
    (only reached with --overwrite), so that none of its state can pass for this run's."""
    if is_failed_start(folder):
        clear_failed_start(folder)
    elif is_run(folder):
        for name in STARTED_FILES:
            (folder / name).unlink(missing_ok=True)
        for name in ("checkpoint", "checkpoint.old", "checkpoint.new"):
            shutil.rmtree(folder / name, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    record = _new_record()
    if runtime is not None:
        record["runtime"] = runtime
    write_record(folder, record)


def clear_failed_start(folder: Path) -> None:
    """Remove what a start that never finished an epoch wrote (the feature cache stays: it is keyed by content);
    the folder itself goes when nothing else is left in it."""
    if has_checkpoint(folder):
        return
    for name in STARTED_FILES:
        for path in (folder / name, folder / f".{name}.tmp"):
            path.unlink(missing_ok=True)
    shutil.rmtree(folder / "checkpoint.new", ignore_errors=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def read_record(folder: Path) -> dict[str, Any] | None:
    """The folder's run.json; None for a run written before records were kept.

    Raises:
        ConfigError: run.json is damaged.
    """
    path = folder / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is damaged ({err}); without it the run's weight files cannot be verified") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("weights"), dict):
        raise ConfigError(f"{path} is not a frostline run record; without it the run's weight files cannot be verified")
    return record


def _new_record() -> dict[str, Any]:
    return {"format": FORMAT, "version": 1, "weights": {}, "resumed": []}


def write_record(folder: Path, record: dict[str, Any]) -> None:
    atomic_write_text(folder / RECORD, json.dumps(record, indent=2))


def save_weights(folder: Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a weight file into the folder with its SHA-256 in run.json, so that a crash at any point leaves a
    file that verifies: the bytes go to `.NAME.pending` first, then the record, then the rename into place."""
    data = tensor_bytes(tensors, metadata)
    pending = folder / f".{name}.pending"
    write_durably(pending, data)
    record = read_record(folder) or _new_record()
    record["weights"][name] = sha256(data)
    write_record(folder, record)
    pending.replace(folder / name)


def read_weights(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """A weight file of the run, verified against the SHA-256 run.json records, with a note when it cannot be.

    A file whose write was cut short between the record and the rename is completed from `.NAME.pending`.

    Raises:
        ConfigError: the run keeps records but none for this file (it was not written by this run).
        WeightFileError: the file changed since the run wrote it, or is not a safetensors file.
    """
    path = folder / name
    record = read_record(folder)
    if record is None:
        note = f"{path} is not verified: the run was written before frostline recorded SHA-256 sums"
        return read_tensors(path, None), note
    digest = record["weights"].get(name)
    if not isinstance(digest, str):
        raise ConfigError(
            f"{path} was not written by this run (its run.json records no SHA-256 for it); "
            "frostline uses only weight files it wrote and can verify"
        )
    pending = folder / f".{name}.pending"
    if pending.is_file():
        data = pending.read_bytes()
        if sha256(data) == digest:
            pending.replace(path)
            return read_tensors(path, digest, data), None
    return read_tensors(path, digest), None


def read_run_config(folder: Path, trust_code: bool) -> FitConfig:
    """The config a run folder recorded, refusing references to code unless the user trusts the folder.

    A run folder is data: it may come from anyone. A `py:` reference in it would import and run that module,
    so it is only followed when the user says so.

    Raises:
        ConfigError: config.json is missing or damaged, or names code and `trust_code` is False.
    """
    path = folder / "config.json"
    try:
        config = config_from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as err:
        raise ConfigError(f"{folder} is not a frostline run folder: config.json is missing") from err
    except (OSError, ValueError) as err:
        problems = err.problems if isinstance(err, ConfigError) else [str(err)]
        raise ConfigError([f"{path} is damaged: {problems[0]}", *problems[1:]]) from err
    named = code_refs(config)
    if named and not trust_code:
        raise ConfigError(
            f"{path} names code to run ({'; '.join(named)}). A run folder is data and may come from anyone, so "
            "frostline does not import code it names; if you trust this folder and that module, pass --trust-code"
        )
    return config


def record_resumed(folder: Path, at: str, changes: list[tuple[str, Any, Any]]) -> None:
    """Add the settings changed when resuming to the folder's record."""
    record = read_record(folder) or _new_record()
    record.setdefault("resumed", []).append({"at": at, "changes": [list(c) for c in changes]})
    write_record(folder, record)
