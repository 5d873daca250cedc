"""frostline's recipe through its three consumers, side by side on one machine: `frostline fit`, the Hugging Face
Trainer callback (MiniLM, BBC News) and the Lightning callback (EfficientNet-Lite0, MNIST-5k).

Each run is its own process, one after another, on the same split and recipe; the table gives the best validation
accuracy, the epochs run and the wall time of the training (model and data loading excluded where the run reports
its own time). Run by hand on an idle machine:

    .venv/bin/python benchmarks/integrations.py --out benchmarks/results/integrations.md
    .venv/bin/python benchmarks/integrations.py --only vision --image-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FIT = """
import json, sys, time
from frostline import load_config, FitConfig
from frostline.config import apply_overrides
from frostline.train.trainer import Trainer
config = load_config(sys.argv[1]) if sys.argv[1] != "-" else FitConfig()
config = apply_overrides(config, sys.argv[3:] + [f"run.output={sys.argv[2]}"])
result = Trainer(config).fit()
best = result.history[result.best_epoch - 1]
print(json.dumps({"val_accuracy": best.val_accuracy, "best_epoch": result.best_epoch, "best_stage": result.best_stage,
                  "epochs": len(result.history), "seconds": round(result.seconds, 1), "stop_reason": result.stop_reason}))
"""


def run(argv: list[str]) -> dict:
    """Run a command that ends by printing one JSON line; return it with the process's wall time."""
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "wall": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["text", "vision"], default=None)
    parser.add_argument("--image-size", type=int, default=64, help="MNIST image size for both vision runs")
    parser.add_argument("--out", default=None, help="write the table (markdown) and the JSON here")
    args = parser.parse_args()
    python = sys.executable
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        if args.only in (None, "text"):
            rows.append(("MiniLM, BBC News", "frostline fit", run([python, "-c", FIT, "-", f"{folder}/text"])))
            rows.append(("MiniLM, BBC News", "HF Trainer + FrostlineCallback", run([python, "examples/hf_trainer_minilm.py"])))
        if args.only in (None, "vision"):
            size = [f"data.image_size={args.image_size}"]
            config = "examples/mnist-efficientnet.yaml"
            rows.append(
                (f"EfficientNet-Lite0, MNIST-5k, {args.image_size} px", "frostline fit",
                 run([python, "-c", FIT, config, f"{folder}/vision", *size]))
            )
            rows.append(
                (f"EfficientNet-Lite0, MNIST-5k, {args.image_size} px", "Lightning + FrostlineRecipe",
                 run([python, "examples/lightning_efficientnet_mnist.py", "--image-size", str(args.image_size)]))
            )
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = "avx512_bf16" if "avx512_bf16" in Path("/proc/cpuinfo").read_text() else "no avx512_bf16"
    lines = [
        f"{cpu} ({flags}), {os.cpu_count()} cores; one process at a time, same split and recipe",
        "",
        "| task | run | best validation accuracy | best epoch (stage) | epochs run | training time (s) | process wall (s) | stopped |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    for task, name, r in rows:
        lines.append(
            f"| {task} | {name} | {100 * r['val_accuracy']:.2f}% | {r['best_epoch']} ({r['best_stage']}) | {r['epochs']} "
            f"| {r['seconds']} | {r['wall']} | {r['stop_reason']} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n\n```json\n" + json.dumps(rows, indent=1) + "\n```\n")


if __name__ == "__main__":
    main()
