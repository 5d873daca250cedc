"""Where and how a run executes: device, precision, seeds, and which process writes files."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Runtime:
    """The device and numeric precision a run uses, with the reason for people."""

    device: torch.device
    precision: str
    """bf16 or fp32."""
    reason: str

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when the run uses it; otherwise nothing."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def select_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Pick the device (cuda, then mps, then cpu) and precision (bf16 where the hardware runs it natively)."""
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    dev = torch.device(device)
    if precision != "auto":
        return Runtime(dev, precision, f"precision {precision} as configured")
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return Runtime(dev, "bf16", "bf16 autocast: this GPU supports bf16")
    if dev.type == "cpu" and _cpu_has_native_bf16():
        return Runtime(dev, "bf16", "bf16 autocast: this CPU has native bf16 instructions")
    why = (
        "this CPU has no native bf16 (emulated bf16 ran MiniLM 6x slower than fp32)"
        if dev.type == "cpu"
        else f"bf16 is not used on {dev.type}"
    )
    return Runtime(dev, "fp32", f"fp32: {why}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_main_process() -> bool:
    """True on the process that writes files: rank 0 under torchrun, or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Every submodule of `modules` in eval mode inside the block; each one's own flag restored after."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
