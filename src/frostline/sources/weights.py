"""Weight files read as data: safetensors, or `torch.load(weights_only=True)`; nothing in them runs.

Used for every weights file frostline did not write itself (torch hub's and the Hugging Face cache). A file
that is there but cannot be used is an error naming it, what is wrong, and the fix.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from frostline.errors import ModelRefError


def check_hash_prefix(path: Path, fix: str) -> None:
    """Refuse a torch hub checkpoint whose SHA-256 does not begin with the hex digits in its name, as torch.hub does.

    torchvision names its files `<model>-<first hex digits of the SHA-256>.pth`; a name without them passes.

    Raises:
        ModelRefError: the digest does not match, with `fix` as the way out.
    """
    match = torch.hub.HASH_REGEX.search(path.name)
    if match is None:
        return
    expected = match.group(1)
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    found = digest.hexdigest()[: len(expected)]
    if found != expected:
        raise bad_file(
            path, f"its SHA-256 begins {found}, not {expected} as its name says, so it is not the published file", fix
        )


def read_cached_weights(path: Path, fix: str) -> dict[str, torch.Tensor]:
    """Read a weights file as data: safetensors, or `torch.load(weights_only=True)`; nothing in it runs.

    Args:
        path: the file (`.safetensors`, or a file written by `torch.save`).
        fix: what to do about a bad file; it ends the error message.

    Returns:
        The file's tensors by name, on the CPU.

    Raises:
        ModelRefError: the file holds anything but named tensors, or cannot be read.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            with warnings.catch_warnings():
                # the weights-only unpickler warns about the pickle protocol of files it then refuses
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # the weights-only unpickler names the callable a file asks for: that is the code it would run
        wanted = re.search(r"GLOBAL (\S+)", str(err))
        if wanted is None:
            raise bad_file(
                path, "it is not a readable weights file (torch.load with weights_only=True refused it)", fix
            ) from err
        what = (
            f"it holds pickled objects besides tensors (it asks for {wanted.group(1)}), and loading them could run code"
        )
        raise bad_file(path, what, fix) from err
    except Exception as err:
        raise bad_file(path, f"it is not a readable weights file ({one_line(err)})", fix) from err
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise bad_file(path, f"it holds a {type(state).__name__} that is not a dict of named tensors", fix)
    # returned as read: torch keeps the modules' format versions in the dict, and load_state_dict uses them
    return state


def load_tensors(model: nn.Module, state: dict[str, torch.Tensor], path: Path, fix: str) -> None:
    """Load `state` into `model`, every tensor or none: a tensor missing, left over or of the wrong shape is an error.

    Raises:
        ModelRefError: names the tensors that do not fit, a few of each kind.
    """
    expected = model.state_dict()
    misshapen = [
        f"{k} {tuple(state[k].shape)} for {tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if misshapen:
        raise bad_file(path, f"its tensors do not fit {type(model).__name__} (wrong shape: {_some(misshapen)})", fix)
    # strict=False so that the keys are counted rather than listed in full; torch still fills in what
    # older formats left out (BatchNorm's num_batches_tracked) before it counts
    try:
        result = model.load_state_dict(state, strict=False)
    except (RuntimeError, ValueError) as err:
        raise bad_file(path, f"its tensors do not fit {type(model).__name__} ({one_line(err)})", fix) from err
    problems = [
        f"{what}: {_some(keys)}"
        for what, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys))
        if keys
    ]
    if problems:
        raise bad_file(path, f"its tensors do not fit {type(model).__name__} ({'; '.join(problems)})", fix)


def _some(names: list[str]) -> str:
    more = f" and {len(names) - 3:,d} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def bad_file(path: Path, what: str, fix: str) -> ModelRefError:
    return ModelRefError(f"cannot use the weights file {path}: {what}; {fix}")


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    # torch's messages run on with advice; the first sentence says what happened
    first = text.split(". ")[0]
    return f"{type(err).__name__}: {first if len(first) <= 300 else first[:300] + ' ...'}"
