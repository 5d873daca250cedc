"""bf16 or fp32 on a CPU, decided by timing both on the run's own model and a batch of its data.

Whether bf16 pays on a CPU is not a matter of one flag: with native bf16 instructions (avx512_bf16, AMX) MiniLM's
forward ran 2x faster than fp32, on AVX2-only CPUs emulated bf16 ran it several times slower, and a model's shape
(convolutions, attention, a tiny MLP dominated by overheads) moves the ratio further. So `precision: auto` on a CPU
times a few forward and backward passes each way, alternating so that both see the same machine, and keeps bf16 only
when it is clearly faster. The figures are kept per machine and model in a small JSON file (data, read back with
`json`), so later runs do not pay for the measurement, and they are recorded with the run.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frostline.batches import batch_len
from frostline.checkpoint import atomic_write_text
from frostline.train.runtime import Runtime, cpu_info, eval_mode

SPEEDUP = 1.1
"""bf16 is kept only when a step runs at least this much faster than in fp32."""
STEPS = 3
"""Timed passes each way, after one warm-up pass each (fewer when the answer is plain)."""
CLEAR = 4.0
"""A warm-up pass this many times slower one way decides without timed passes."""
CACHE_ENV = "FROSTLINE_CACHE_DIR"
"""A folder for frostline's measurements (default: $XDG_CACHE_HOME/frostline, else ~/.cache/frostline)."""


@dataclass(frozen=True)
class Timing:
    """What was measured, and what it decided."""

    fp32_seconds: float
    """Median seconds of a forward and backward pass in fp32."""
    bf16_seconds: float
    """The same under bf16 autocast."""
    steps: int
    examples: int
    """Examples in the timed batch."""
    measured_at: str
    """When (UTC, ISO 8601)."""

    @property
    def precision(self) -> str:
        return "bf16" if self.fp32_seconds >= SPEEDUP * self.bf16_seconds else "fp32"

    def reason(self, cached: bool) -> str:
        ratio = self.fp32_seconds / self.bf16_seconds if self.bf16_seconds > 0 else float("inf")
        when = f"measured {self.measured_at[:10]}, cached" if cached else "measured now"
        return (
            f"{self.precision}: a forward and backward pass of {self.examples} examples took {self.fp32_seconds:.3f} s "
            f"in fp32 and {self.bf16_seconds:.3f} s in bf16 on this CPU (median of {self.steps}; bf16 {ratio:.2f}x "
            f"as fast, kept only from {SPEEDUP}x; {when})"
        )


def cache_file() -> Path:
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        folder = str(Path(base) / "frostline")
    return Path(folder) / "precision.json"


def machine_key(model: nn.Module, batch: Any) -> str:
    """What the timing depends on: the CPU and its bf16-related flags, torch and its threads, the model's shape and
    the batch's."""
    cpu, present = cpu_info()
    flags = ",".join(sorted(present & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
    shapes = _shapes(batch)
    params = sum(p.numel() for p in model.parameters())
    text = f"{cpu}|{flags}|torch {torch.__version__}|{torch.get_num_threads()} threads|{type(model).__name__}|{params}|{shapes}"
    return hashlib.sha256(text.encode()).hexdigest()[:16] + " " + text


def _shapes(batch: Any) -> str:
    if isinstance(batch, dict):
        return ",".join(f"{k}={tuple(v.shape)}" for k, v in sorted(batch.items()))
    return str(tuple(batch.shape))


def time_passes(forward: Callable[[Any], torch.Tensor], model: nn.Module, batch: Any, device: torch.device) -> Timing:
    """Median seconds of a forward and backward pass each way, alternating fp32 and bf16, after a warm-up pass each;
    the model's weights, gradients, buffers and the random streams are as they were before. It stops early when
    the answer is plain: one way `CLEAR`x slower already in the warm-up (emulated bf16 on an AVX2 CPU), or after a
    timed pair beyond 2x."""
    grads = {p: p.grad for p in model.parameters()}
    for p in model.parameters():
        p.grad = None  # backward would add into them
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with torch.random.fork_rng(devices=[]), eval_mode(model):
        warm = {precision: _pass(forward, model, batch, device, precision) for precision in ("fp32", "bf16")}
        if max(warm.values()) > CLEAR * min(warm.values()):
            times = {k: [v] for k, v in warm.items()}
        else:
            for _ in range(STEPS):
                for precision in ("fp32", "bf16"):
                    times[precision].append(_pass(forward, model, batch, device, precision))
                ratio = statistics.median(times["fp32"]) / statistics.median(times["bf16"])
                if not 0.5 < ratio < 2:
                    break
    for p, grad in grads.items():
        p.grad = grad
    examples = batch_len(batch)
    return Timing(
        statistics.median(times["fp32"]),
        statistics.median(times["bf16"]),
        len(times["fp32"]),
        examples,
        datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )


def _pass(
    forward: Callable[[Any], torch.Tensor], model: nn.Module, batch: Any, device: torch.device, precision: str
) -> float:
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    start = time.perf_counter()
    with autocast:
        out = forward(batch).float().sum()
    out.backward()
    seconds = time.perf_counter() - start
    for p in model.parameters():
        p.grad = None
    return seconds


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def choose_precision(
    runtime: Runtime,
    forward: Callable[[Any], torch.Tensor],
    model: nn.Module,
    batch: Any,
    announce: Callable[[str], None] | None = None,
    measure: bool = True,
    not_timed: str = "other work was using the CPU, and timings would mislead",
) -> tuple[Runtime, dict[str, Any]]:
    """The runtime with the precision that timing chose (from the cache when this machine measured this model
    before), and the record of it for the run folder; `announce` hears a line before a measurement starts. With
    `measure` False (a busy machine, where timings mislead) only a cached timing decides; else the first guess
    stays, saying so."""
    path = cache_file()
    key = machine_key(model, batch)
    entries = _read_cache(path)
    timing = None
    if isinstance(entries.get(key), dict):
        with contextlib.suppress(TypeError, ValueError):
            timing = Timing(**entries[key])
    cached = timing is not None
    if timing is None and not measure:
        reason = f"{runtime.reason} (not timed: {not_timed})"
        return Runtime(runtime.device, runtime.precision, reason), {"precision": runtime.precision, "reason": reason}
    if timing is None:
        if announce is not None:
            announce(f"timing fp32 and bf16 on this model (once for this machine and model; cached in {path})")
        timing = time_passes(forward, model, batch, runtime.device)
        entries[key] = asdict(timing)
        # a cache that cannot be written costs the next run a measurement, nothing more
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(entries, indent=1))
    reason = timing.reason(cached)
    record = {"precision": timing.precision, "reason": reason, "key": key, **asdict(timing)}
    return Runtime(runtime.device, timing.precision, reason), record
