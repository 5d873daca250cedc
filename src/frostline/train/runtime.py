"""Where and how a run executes: device, precision, seeds, and which process writes files."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from frostline.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    """The device and numeric precision a run uses, with the reason for people."""

    device: torch.device
    precision: str
    """bf16 or fp32."""
    reason: str
    measurable: bool = False
    """The precision is a first guess that timing on the run's model may change (`precision: auto` on a CPU:
    `frostline.train.precision`)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when the run uses it; otherwise nothing."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """This CPU's model name and feature flags, from /proc/cpuinfo (a generic name and no flags elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return name or platform.machine(), frozenset(flags)


def _cpu_has_native_bf16() -> bool:
    return bool(cpu_info()[1] & {"avx512_bf16", "amx_bf16"})


def select_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Pick the device (cuda, then mps, then cpu) and precision (bf16 where the hardware runs it natively)."""
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    dev = _available(device)
    if precision != "auto":
        return Runtime(dev, precision, f"precision {precision} as configured")
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return Runtime(dev, "bf16", "bf16 autocast: this GPU supports bf16")
    if dev.type == "cpu" and _cpu_has_native_bf16():
        return Runtime(dev, "bf16", "bf16 autocast: this CPU has native bf16 instructions", measurable=True)
    if dev.type == "cpu":
        return Runtime(
            dev, "fp32", "fp32: this CPU has no native bf16 (emulated bf16 ran MiniLM 6x slower)", measurable=True
        )
    return Runtime(dev, "fp32", f"fp32: bf16 is not used on {dev.type}")


def _available(device: str) -> torch.device:
    """The torch device `device` names, or a `ConfigError` when this machine does not have it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(
            f"run.device {device!r} is not a device torch knows; use auto, cpu, cuda, cuda:N or mps"
        ) from err
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"run.device={device}, but torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                "use run.device=auto (it picks the GPU when there is one) or cpu"
            )
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"run.device={device}, but this machine has {count} CUDA GPU(s): cuda:0 to cuda:{count - 1}"
            )
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ConfigError(f"run.device={device}, but Apple's MPS is not available here; use run.device=auto or cpu")
    return dev


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (not idle or waiting on I/O) since boot; None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    """Where the machine's and this process's CPU counters stood at one moment."""

    busy: float | None
    own: float
    at: float

    @classmethod
    def now(cls) -> CpuSample:
        return cls(busy_cpu_seconds(), time.process_time(), time.perf_counter())


def other_cpu_cores(seconds: float = 0.3, since: CpuSample | None = None) -> float | None:
    """How many cores' worth of CPU other processes used since `since` (a fresh sample when None), over at least
    `seconds` (it sleeps only what is left); None off Linux."""
    since = since or CpuSample.now()
    if since.busy is None:
        return None
    time.sleep(max(seconds - (time.perf_counter() - since.at), 0.0))
    end = CpuSample.now()
    wall = end.at - since.at
    return max((end.busy - since.busy - (end.own - since.own)) / wall, 0.0)


def contention_note(others: float | None, threads: int, cores: int) -> str | None:
    """A warning when other processes leave fewer free cores than torch has threads, with the fix."""
    if others is None or others < 0.5:
        return None
    free = max(cores - others, 0.0)
    if threads <= free + 0.25:
        return None
    fewer = max(int(free + 0.25), 1)
    return (
        f"warning: the machine is busy: other processes use {others:.1f} of its {cores} cores, and torch runs "
        f"{threads} threads; threads that wait for a core slow every step (on 2 cores, 5-30x was measured). "
        f"Set run.threads={fewer} (--set run.threads={fewer}), or wait for the other work to finish."
    )


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
