"""What to train, side by side through `frostline fit`: the head, the last two blocks, LoRA r=8, everything.

Run by hand on an idle machine (not in CI): `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/freeze_modes.py
--seeds 0,1,2 --out benchmarks/results/freeze-modes.md` (about an hour on 2 cores). A smoke run of a minute:
`--seeds 0 --limit 150 --max-length 32 --out /tmp/smoke.md`. `--processes 1,2` runs each mode in 1 and in 2
processes (`frostline fit --nproc 2`: torch.distributed, batch 16 per process, so 32 per step with 2).

Every mode is a recipe of `frostline fit`, run in its own process on the split of each seed (MiniLM on BBC News,
128 tokens, batch 16): the head first (cached, up to 8 epochs), then, except for `head`, a second stage with the
mode's freeze spec that always runs (`when: always`), so the modes differ only in what the second stage trains.
Reported per mode: the kept (best) epoch's validation accuracy, median (min-max) over the seeds; the parameters the
second stage trains; the median seconds of an epoch (training + validation) in each stage; wall time of the whole
`frostline fit` process; its peak memory (RSS, from wait4: with several processes, the largest one's).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HEAD = {"name": "head", "freeze": "head", "epochs": 8, "lr": 1.0e-2, "schedule": "cosine"}
SECOND = {"epochs": 3, "schedule": "cosine", "warmup": 0.1, "when": "always"}
MODES = {
    "head": [],
    # frostline's default second stage (examples/bbcnews-minilm.yaml), run always
    "last:2": [
        SECOND | {"name": "last2", "freeze": "last:2;bn=fixed", "lr": 5e-5, "head_lr_mult": 10, "layer_decay": 0.8}
    ],
    # LoRA's usual rates are 10x those of full fine-tuning; the head keeps the same rate as in last:2 and full
    "lora:r=8": [SECOND | {"name": "lora", "freeze": "lora:r=8,alpha=16,dropout=0.05", "lr": 5e-4, "head_lr_mult": 1}],
    "full": [SECOND | {"name": "full", "freeze": "none", "lr": 5e-5, "head_lr_mult": 10, "layer_decay": 0.8}],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds: one split each")
    parser.add_argument("--modes", default=",".join(MODES), help=f"a subset of {', '.join(MODES)}")
    parser.add_argument("--processes", default="1", help="comma-separated process counts (frostline fit --nproc)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--limit", type=int, help="use only this many examples (smoke runs)")
    parser.add_argument("--out", required=True, help="the Markdown file to write (rows appended as runs end)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    modes = args.modes.split(",")
    counts = [int(n) for n in args.processes.split(",")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; the modes are {', '.join(MODES)}")
    out = Path(args.out)
    if out.exists():
        parser.error(f"{out} exists; name a new file")
    out.parent.mkdir(parents=True, exist_ok=True)
    header = [
        f"# Freeze modes through frostline fit: MiniLM on BBC News, {args.max_length} tokens, seeds {args.seeds}",
        "",
        f"CPU: {_cpu()}; {os.cpu_count()} cores; torch threads: frostline's default.",
        f"Command: `{' '.join(shlex.quote(a) for a in sys.argv)}`",
        "",
        "| mode | processes | seed | kept epoch (stage) | val accuracy | stage 2's best | trainable params (last stage) | "
        "epochs run | epoch s (head / stage 2) | wall s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    out.write_text("\n".join(header) + "\n")
    rows = []
    with tempfile.TemporaryDirectory(prefix="freeze-modes-") as work:
        for seed in seeds:
            for mode, processes in [(m, n) for m in modes for n in counts]:
                row = _run(Path(work), mode, seed, processes, args)
                rows.append(row)
                with out.open("a") as handle:
                    handle.write(_row(row) + "\n")
                print(_row(row), flush=True)
    with out.open("a") as handle:
        handle.write("\n" + _summary(rows, modes, counts) + "\n")
    print(_summary(rows, modes, counts))
    return 0


def _run(work: Path, mode: str, seed: int, processes: int, args: argparse.Namespace) -> dict:
    data = {"ref": "bbcnews", "max_length": args.max_length, "batch_size": 16}
    if args.limit:
        data["limit"] = args.limit
    config = {
        "model": {"ref": "hf:minilm"},
        "data": data,
        "stages": [HEAD, *MODES[mode]],
        "run": {"seed": seed, "patience": 2, "tensorboard": False},
    }
    name = f"{mode.replace(':', '').replace('=', '')}-{processes}-{seed}"
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    run_dir = work / name
    command = [sys.executable, "-m", "frostline", "fit", str(path), "--output", str(run_dir)]
    if processes > 1:
        command += ["--nproc", str(processes)]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    error = process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        last = error.strip().splitlines()[-1] if error.strip() else "failed"
        return {"mode": mode, "processes": processes, "seed": seed, "error": last}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    kept = [r for r in records if r["best"]][-1]
    second = [r for r in records if r["stage_index"] == 1]
    epoch_seconds = [
        statistics.median(r["train_seconds"] + r["eval_seconds"] for r in records if r["stage_index"] == stage)
        for stage in sorted({r["stage_index"] for r in records})
    ]
    return {
        "mode": mode,
        "processes": processes,
        "seed": seed,
        "epoch_seconds": epoch_seconds,
        "kept": f"{kept['epoch']} ({kept['stage']})",
        "accuracy": kept["val_accuracy"],
        "second": max(r["val_accuracy"] for r in second) if second else None,
        "count": kept["val_count"],
        "trainable": second[0]["trainable_params"] if second else records[0]["trainable_params"],
        "epochs": f"{len(records) - len(second)} + {len(second)}" if second else str(len(records)),
        "wall": wall,
        "rss": usage.ru_maxrss / 1024,
    }


def _row(row: dict) -> str:
    if "error" in row:
        return f"| {row['mode']} | {row['processes']} | {row['seed']} | error: {row['error']} | | | | | | | |"
    epochs = " / ".join(f"{s:.1f}" for s in row["epoch_seconds"])
    second = f"{row['second']:.2%}" if row["second"] is not None else "-"
    return (
        f"| {row['mode']} | {row['processes']} | {row['seed']} | {row['kept']} | {row['accuracy']:.2%} | {second} | "
        f"{row['trainable']:,d} | {row['epochs']} | {epochs} | {row['wall']:.1f} | {row['rss']:,.0f} |"
    )


def _summary(rows: list[dict], modes: list[str], counts: list[int]) -> str:
    lines = [
        "| mode | processes | val accuracy, median (min-max) | trainable params (last stage) | "
        "epoch s, median (head / stage 2) | wall s, median (min-max) | peak RSS MiB, median |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, processes in [(m, n) for m in modes for n in counts]:
        done = [r for r in rows if r["mode"] == mode and r["processes"] == processes and "error" not in r]
        if not done:
            lines.append(f"| {mode} | {processes} | no run finished | | | | |")
            continue
        stages = len(done[0]["epoch_seconds"])
        epochs = " / ".join(f"{statistics.median(r['epoch_seconds'][i] for r in done):.1f}" for i in range(stages))
        acc = [r["accuracy"] for r in done]
        wall = [r["wall"] for r in done]
        lines.append(
            f"| {mode} | {processes} | {statistics.median(acc):.2%} ({min(acc):.2%}-{max(acc):.2%}) | "
            f"{done[0]['trainable']:,d} | {epochs} | {statistics.median(wall):.1f} ({min(wall):.1f}-{max(wall):.1f}) | "
            f"{statistics.median(r['rss'] for r in done):,.0f} |"
        )
    return "\n".join(lines)


def _cpu() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from frostline.train.runtime import cpu_info

    name, flags = cpu_info()
    wide = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    return f"{name}, flags {' '.join(wide) or 'none of avx2/avx512/amx'}"


if __name__ == "__main__":
    sys.exit(main())
