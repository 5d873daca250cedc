"""`frostline fit [CONFIG]`: fine-tune; with no argument, the embedded default (MiniLM on BBC News)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from frostline import run_folder
from frostline.cli.console import make_console
from frostline.config import FitConfig, StageConfig, apply_overrides, load_config
from frostline.errors import ConfigError, FrostlineError
from frostline.freeze import FreezePlan
from frostline.guard import Finding
from frostline.recipe import EpochRecord
from frostline.report import plot_training, summary_table
from frostline.train.evidence import binomial_se, count_of, within_noise_of_best
from frostline.train.monitor import Diagnosis
from frostline.train.runtime import is_main_process
from frostline.train.trainer import FitResult, Trainer


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fit",
        help="fine-tune a model (no argument: MiniLM on BBC News topics)",
        description="Fine-tune a pretrained model with a recipe of stages. With no config, fine-tunes the embedded "
        "default: the MiniLM sentence encoder on BBC News topics (head first, then the last two blocks).",
    )
    parser.add_argument("config", nargs="?", help="a YAML config (sections model, data, stages, run)")
    parser.add_argument("--model", help="model reference (overrides model.ref)")
    parser.add_argument("--data", help="data reference (overrides data.ref)")
    parser.add_argument("--output", help="run folder (overrides run.output)")
    parser.add_argument("--name", help="run name under runs/ (overrides run.name)")
    parser.add_argument("--seed", type=int, help="seed (overrides run.seed)")
    parser.add_argument(
        "--resume",
        metavar="RUN",
        help="continue a killed run from its last checkpoint (settings of stages not begun yet may change)",
    )
    parser.add_argument(
        "--trust-code",
        action="store_true",
        help="with --resume: import the py: references that the run folder's config names (a run folder is data; "
        "without this flag its code is never run)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty output folder that is not a frostline run, or replace the run there",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="run N processes under torch.distributed (DDP; data.batch_size is per process): the same as "
        "torchrun --standalone --nproc-per-node N -m frostline fit ...",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any setting, e.g. --set data.max_length=256 --set stages.1.epochs=2",
    )
    parser.set_defaults(run=run)


class RichReporter:
    """Progress bars and lines in the terminal."""

    def __init__(self, console: Console):
        self.console = console
        self.progress: Progress | None = None
        self.task: Any = None

    def note(self, message: str) -> None:
        color = "yellow" if "RANDOM" in message or message.startswith("warning") else "dim"
        self.console.print(f"[{color}]{message}[/]", highlight=False)

    def stage_start(self, index: int, stage: StageConfig, plan: FreezePlan, findings: list[Finding]) -> None:
        self.console.rule(f"stage {index + 1}: {stage.name}", style="cyan")
        self.console.print(plan.summary(), highlight=False)
        rates = f"lr {stage.lr:g}, head x{stage.head_lr_mult:g}, layer decay {stage.layer_decay:g}, {stage.schedule}"
        self.console.print(f"[dim]{rates}, up to {stage.epochs} epochs[/]", highlight=False)
        for finding in findings:
            self.console.print(f"[yellow]{finding}[/]", highlight=False)

    def progress_start(self, label: str, total: int) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if total:
            self._bar(label, total)

    def epoch_start(self, stage: StageConfig, epoch: int, batches: int) -> None:
        self._bar(f"epoch {epoch} [cyan]{stage.name}[/]", batches)

    def _bar(self, label: str, total: int) -> None:
        if not self.console.is_terminal:
            # logs and pipes get the per-epoch lines only
            self.progress = None
            return
        self.progress = Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("work", total=total, info="")

    def step(self, done: int, total: int, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, info=f"loss {loss:.4f}" if loss == loss else "")

    def epoch_end(self, record: EpochRecord, diagnosis: Diagnosis) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        best = " [bold green]best[/]" if record.best else ""
        seconds = record.train_seconds + record.eval_seconds
        self.console.print(
            f"epoch {record.epoch:>2} [cyan]{record.stage}[/]  train loss {record.train_loss:.4f}  "
            f"val loss {record.val_loss:.4f}  val acc {100 * record.val_accuracy:.2f}%  {seconds:.1f}s{best}",
            highlight=False,
        )
        if diagnosis.verdict == "overfitting" and diagnosis.should_stop:
            self.console.print(f"[bold red]{diagnosis.message}[/]", highlight=False)
            for line in diagnosis.advice:
                self.console.print(f"[red]  - {line}[/]", highlight=False)
        elif diagnosis.verdict != "improving":
            self.console.print(f"[yellow]{diagnosis.message}[/]", highlight=False)


def build_config(args: argparse.Namespace, base: FitConfig | None = None) -> FitConfig:
    """The config a command line asks for: its file (else `base`, else the default), then flags and --set."""
    config = load_config(args.config) if args.config else (base or FitConfig())
    overrides = list(args.overrides)
    for flag, key in (
        ("model", "model.ref"),
        ("data", "data.ref"),
        ("output", "run.output"),
        ("name", "run.name"),
        ("seed", "run.seed"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    return apply_overrides(config, overrides) if overrides else config


def run(args: argparse.Namespace) -> int:
    if args.nproc is not None:
        return _torchrun(args)
    console = make_console()
    if args.resume:
        if args.output or args.name:
            raise ConfigError(f"--resume continues in {args.resume}; --output and --name cannot be combined with it")
        saved = run_folder.read_run_config(run_folder.resume_dir(args.resume), args.trust_code)
        config = build_config(args, base=saved)
    else:
        config = build_config(args)
    if not args.config and not args.resume and not args.model and not args.data:
        console.print(
            "[bold]frostline fit: no config given, so fine-tuning the embedded default: the MiniLM sentence encoder "
            "(all-MiniLM-L6-v2) on BBC News topics[/]",
            highlight=False,
        )
    trainer = Trainer(config, RichReporter(console))
    try:
        result = trainer.fit(resume=args.resume, overwrite=args.overwrite)
    except FrostlineError:
        if trainer.history and trainer.run_dir is not None and trainer.run_dir.is_dir() and is_main_process():
            plot_training(
                trainer.history,
                trainer.run_dir / "report.png",
                title=str(trainer.run_dir),
                stop_reason="stopped by an error",
            )
        raise
    if is_main_process():
        report(console, result)
    return 0


def _torchrun(args: argparse.Namespace) -> int:
    """`--nproc N`: the same command in N processes under torchrun (torch.distributed.run), on this machine."""
    if args.nproc < 1:
        raise ConfigError(f"--nproc is a number of processes >= 1, got {args.nproc}")
    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--nproc starts the processes itself; under torchrun leave it out")
    rest, skip = [], False
    for arg in args.argv:
        name, equals, _ = arg.partition("=")
        # --nproc, or an abbreviation argparse accepted (--npro)
        ours = len(name) >= 4 and "--nproc".startswith(name)
        if skip:
            skip = False
        elif ours and not equals:
            skip = True
        elif not ours:
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
    return subprocess.call([*command, "-m", "frostline", *rest])


def _uncertainty(result: FitResult) -> str:
    """' ± 0.61 (426 examples; epochs 2, 3 as good within noise)', as far as the record tells."""
    history, best = result.history, result.best_epoch - 1
    n = count_of(history[best], history)
    if not n:
        return ""
    tied = within_noise_of_best(history, best)
    if not tied:
        others = "every other epoch worse beyond noise"
    elif len(tied) <= 6:
        others = f"epoch{'s' if len(tied) > 1 else ''} {', '.join(map(str, tied))} as good within noise"
    else:
        others = f"{len(tied)} other epochs as good within noise"
    return f" ± {100 * binomial_se(result.best_val_accuracy, n):.2f} ({n:,d} examples; {others})"


def report(console: Console, result: FitResult) -> None:
    console.rule("done", style="green")
    console.print(summary_table(result))
    best = result.history[result.best_epoch - 1] if result.best_epoch else None
    if best is not None:
        console.print(
            f"best weights: epoch {result.best_epoch} (stage {result.best_stage}), validation accuracy "
            f"[bold]{100 * result.best_val_accuracy:.2f}%[/]{_uncertainty(result)}, validation loss "
            f"{result.best_val_loss:.4f}"
            + (f", macro-F1 {100 * best.val_macro_f1:.2f}%" if best.val_macro_f1 is not None else ""),
            highlight=False,
        )
    console.print(f"stopped: {result.stop_reason}", highlight=False)
    if result.diagnosis is not None and result.diagnosis.verdict == "overfitting":
        console.print(f"[red]{result.diagnosis.message}[/]", highlight=False)
    console.print(f"time: {result.seconds:.1f}s", highlight=False)
    if result.run_dir is not None:
        plot_training(
            result.history,
            result.run_dir / "report.png",
            best_epoch=result.best_epoch,
            overfit_began=result.overfit_began,
            stop_reason=f"stopped: {result.stop_reason}",
            title=str(result.run_dir),
        )
        console.print(
            f"run folder: {result.run_dir}  (best.safetensors, head.json, metrics.jsonl, report.png, checkpoint/)",
            highlight=False,
        )
