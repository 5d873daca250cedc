"""The Lightning and Hugging Face examples in one process and in two (their frameworks' DDP), side by side.

    python benchmarks/integrations_processes.py --repeats 2 --out benchmarks/results/integrations-processes.md

Each run is its own command, alternating one and two processes, so a change in the machine's load hits both:
`examples/hf_trainer_minilm.py` (MiniLM on BBC News, the default recipe) alone or under `torchrun --nproc-per-node 2`,
and `examples/lightning_efficientnet_mnist.py` (EfficientNet-Lite0 on MNIST) with `--devices 1` or `--devices 2`
(Lightning starts the second process). The batch size is per process, so two processes train on a global batch
twice as large, in half as many steps per epoch: the accuracy is of another run, not of the same one faster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUNS = {
    "hf": (["examples/hf_trainer_minilm.py", "--limit", "400", "--max-length", "64", "--epochs", "2,1"], "torchrun"),
    "lightning": (
        ["examples/lightning_efficientnet_mnist.py", "--limit", "600", "--image-size", "32", "--epochs", "2,1"],
        "devices",
    ),
}


def _command(name: str, processes: int) -> list[str]:
    script, how = RUNS[name]
    if processes == 1:
        return [sys.executable, *script] + (["--devices", "1"] if how == "devices" else [])
    if how == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *script]
    return [sys.executable, *script, "--devices", str(processes)]


def _run(name: str, processes: int) -> dict:
    start = time.perf_counter()
    done = subprocess.run(
        _command(name, processes), cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    wall = time.perf_counter() - start
    summary = next((json.loads(line) for line in reversed(done.stdout.splitlines()) if line.startswith("{")), None)
    if done.returncode != 0 or summary is None:
        raise SystemExit(f"{name} with {processes} process(es) failed:\n{done.stderr[-2000:]}")
    return {"wall": wall, "fit": summary["seconds"], "accuracy": summary["val_accuracy"], "epochs": summary["epochs"]}


def _spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=sorted(RUNS), help="one of the two examples")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    results: dict[tuple[str, int], list[dict]] = {}
    for name in [args.only] if args.only else sorted(RUNS):
        for repeat in range(args.repeats):
            for processes in (1, 2) if repeat % 2 == 0 else (2, 1):
                row = _run(name, processes)
                results.setdefault((name, processes), []).append(row)
                print(f"{name} x{processes}: {row}", flush=True)
    lines = [
        f"CPU: {cpu}, {os.cpu_count()} cores; {args.repeats} runs each, alternating; median (min-max)",
        "",
        "| example | processes | trainer's fit s | wall s | accuracy of the kept weights | epochs |",
        "|---|---|---|---|---|---|",
    ]
    for (name, processes), rows in results.items():
        lines.append(
            f"| {name} | {processes} | {_spread([r['fit'] for r in rows])} | {_spread([r['wall'] for r in rows])} | "
            f"{_spread([100 * r['accuracy'] for r in rows], 2)}% | {', '.join(str(r['epochs']) for r in rows)} |"
        )
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
