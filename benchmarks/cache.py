"""Feature-cache benchmark: epoch time with and without the cache, and what the cache costs to make.

Run by hand (not in CI): `.venv/bin/python benchmarks/cache.py` (about 20 minutes on 2 cores), or
`--end-to-end` to also time `frostline fit` on the default with run.cache=auto and run.cache=off.
Every measurement comes from one process on the same model, data and thread count; each row reports
the median epoch time over --epochs epochs and the spread (min-max).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from frostline.config import DataConfig, FitConfig, RunConfig, StageConfig  # noqa: E402
from frostline.dataset import PreparedData, prepare_data  # noqa: E402
from frostline.sources import open_model  # noqa: E402
from frostline.sources.models import open_preprocess  # noqa: E402
from frostline.train.trainer import Trainer  # noqa: E402


def mnist_5k(size: int) -> PreparedData:
    """frostline's built-in MNIST-5k (uint8, scaled to EfficientNet-Lite's [-1, 1] per batch), 80/20 split."""
    return prepare_data(
        DataConfig(ref="mnist", image_size=size), None, seed=0, preprocess=open_preprocess("efficientnet-lite0")
    )


def measure(
    model_ref: str, data_ref: str, spec: str, cache: str, epochs: int, data: PreparedData | None, batch: int
) -> dict:
    stage = StageConfig(
        name=spec.replace(":", ""),
        freeze=spec,
        epochs=epochs,
        lr=1e-3 if spec == "head" else 5e-5,
        head_lr_mult=1 if spec == "head" else 10,
    )
    config = FitConfig(
        data=DataConfig(ref=data_ref, batch_size=batch, max_length=128),
        stages=[stage],
        run=RunConfig(cache=cache, patience=epochs + 1, precision="fp32"),
    )
    # seeded like the trainer seeds, so the runs with and without the cache start from the same head
    torch.manual_seed(0)
    source = open_model(model_ref, num_classes=len(data.label_names) if data is not None else 5)
    trainer = Trainer(config, source=source, data=data)
    result = trainer.fit(write=False)
    times = [r["train_seconds"] + r["eval_seconds"] for r in result.history]
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "cache_seconds": result.history[0]["cache_seconds"],
        "cached": result.history[0]["cache"],
        "val_accuracy": result.history[-1]["val_accuracy"],
    }


def row(task: str, spec: str, off: dict, on: dict) -> str:
    speedup = off["median"] / on["median"]
    pays_back = on["cache_seconds"] / max(off["median"] - on["median"], 1e-9)
    return (
        f"| {task} | {spec} | {off['median']:.2f} ({off['min']:.2f}-{off['max']:.2f}) | {on['cache_seconds']:.2f} | "
        f"{on['median']:.3f} ({on['min']:.3f}-{on['max']:.3f}) | {speedup:,.1f}x | {pays_back:.2f} | "
        f"{100 * off['val_accuracy']:.2f} / {100 * on['val_accuracy']:.2f} |"
    )


def end_to_end() -> list[str]:
    lines = [
        "",
        "| frostline fit (default recipe) | wall time (s) | best val acc (%) | stopped |",
        "|---|---:|---:|---|",
    ]
    walls = {}
    for cache in ("auto", "off"):
        start = time.perf_counter()
        result = Trainer(FitConfig(run=RunConfig(cache=cache))).fit(write=False)
        walls[cache] = time.perf_counter() - start
        lines.append(
            f"| run.cache={cache} | {walls[cache]:.0f} | {100 * result.best_val_accuracy:.2f} | {result.stop_reason} |"
        )
        print(lines[-1], flush=True)
    lines.append(f"\ncache=auto is {walls['off'] / walls['auto']:.1f}x faster end to end")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--only", choices=["minilm", "efficientnet"], help="run one task")
    parser.add_argument("--stages", nargs="+", default=["head", "last:2"], help="freeze specs to measure")
    parser.add_argument(
        "--end-to-end", action="store_true", help="also time frostline fit on the default, cache on and off"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, python {sys.version.split()[0]}"
    )
    lines = [
        "| task | stage | epoch, no cache (s) | caching (s) | epoch, cached (s) | speed-up | cache pays back after (epochs) | val acc off / on (%) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    tasks = []
    if args.only in (None, "minilm"):
        tasks.append(("MiniLM, BBC News (1,701 train, 128 tokens)", "hf:minilm", "bbcnews", None, 16))
    if args.only in (None, "efficientnet"):
        images = mnist_5k(args.image_size)
        tasks.append(
            (
                f"EfficientNet-Lite0, MNIST-5k (4,000 train, {args.image_size}px)",
                "efficientnet-lite0",
                "mnist-5k",
                images,
                32,
            )
        )
    for task, model, data_ref, data, batch in tasks:
        for spec in args.stages:
            off = measure(model, data_ref, spec, "off", args.epochs, data, batch)
            on = measure(model, data_ref, spec, "auto", args.epochs, data, batch)
            lines.append(row(task, spec, off, on))
            print(lines[-1], flush=True)
    if args.end_to_end:
        lines += end_to_end()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
