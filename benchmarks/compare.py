"""frostline next to a plain PyTorch loop, the Hugging Face Trainer and Lightning, on the same two tasks.

Run by hand (not in CI): `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compare.py` (over an hour on 2 cores;
`--task text` or `--task vision` runs one task, `--runs plain,cache-off` a subset). A smoke run of a few minutes:
`--task text --limit 96 --max-length 32`, then `--task vision --limit 200 --image-size 64`. The peers come with
`pip install -e '.[bench]'`; a peer that is missing gets a row saying so. `--seeds 0,1,2` repeats every run on the
split of each seed and adds a summary over the splits (median, min-max); `--reuse hf=earlier.md` takes a run's
figures from an earlier `--out` file of the same data instead of running it again.

Each (task, run) runs in a fresh process of this script, on data prepared once and shared, with the same model,
sequence length or image size and thread count; so peak memory is that run's own, and a run that crashes becomes
an error row. Wall time runs from loading the model to the end of the last validation; an epoch's time is its
training plus its validation. After the tables come the two targets: frostline's loop overhead against the plain
loop (same recipe, cache off), and frostline's default against the best peer. Run it on an idle machine: a run
during which other processes took CPU from its threads is flagged (from /proc/stat), as its timings mean little.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR  # noqa: E402

from frostline.batches import call_model, split_batch  # noqa: E402
from frostline.config import DataConfig, FitConfig, ModelConfig, RunConfig, StageConfig, default_stages  # noqa: E402
from frostline.dataset import PreparedData, prepare_data  # noqa: E402
from frostline.freeze import FreezeSpec  # noqa: E402
from frostline.sources import open_model  # noqa: E402
from frostline.sources.models import open_preprocess, open_tokenizer  # noqa: E402
from frostline.train.runtime import (  # noqa: E402
    Runtime,
    busy_cpu_seconds,
    cpu_info,
    seed_everything,
    select_runtime,
)
from frostline.train.trainer import SilentReporter, Trainer  # noqa: E402

RUN_NAMES = {
    "default": "frostline default",
    "plain": "plain loop",
    "hf": "HF Trainer",
    "lightning": "Lightning BackboneFinetuning",
    "cache-off": "frostline cache=off",
    "full-ft": "frostline full FT",
    "head": "frostline head stage",
}
# cache-off runs before the plain loop, which copies how many epochs of each stage it ran
RUN_ORDER = ("default", "head", "cache-off", "plain", "full-ft", "hf", "lightning")
NOT_INSTALLED = "not installed: pip install -e '.[bench]'"
LIGHTNING_HEAD_LR = 1e-3
"""The rate of Lightning's BackboneFinetuning example; the callback starts the backbone at 0.1x it."""
HF_BATCH_SIZE = 8
"""TrainingArguments' default per-device batch size, kept: the peer runs as its users run it."""
BUSY = 0.05
"""Share of the CPU that other processes may take from a run's cores before its timings are flagged."""


def full_ft_stages() -> list[StageConfig]:
    """Full fine-tuning as one frostline stage, at the rates transformers users start from."""
    return [
        StageConfig(name="full", freeze="none", epochs=3, lr=5e-5, head_lr_mult=10.0, schedule="cosine", warmup=0.1)
    ]


# ---- tasks and their data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where a model's parts sit, for the runs that split it by hand instead of through frostline's model map."""

    stem: tuple[str, ...]
    """Modules before the first block."""
    blocks: str
    """The ModuleList of blocks."""
    after: tuple[str, ...]
    """Modules between the last block and the head."""
    head: str
    """The new linear head (a top-level attribute)."""

    def units(self, model: nn.Module) -> list[str]:
        blocks = [f"{self.blocks}.{i}" for i in range(len(model.get_submodule(self.blocks)))]
        return [*self.stem, *blocks, *self.after, self.head]


@dataclass(frozen=True)
class Task:
    """A model on a data set, and the runs that apply to it."""

    name: str
    model_ref: str
    data_ref: str
    layout: Layout
    runs: tuple[str, ...]


TASKS = {
    "text": Task(
        "text",
        "hf:minilm",
        "bbcnews",
        Layout(("encoder.embeddings",), "encoder.encoder.layer", (), "classifier"),
        RUN_ORDER,
    ),
    "vision": Task(
        "vision",
        "efficientnet-lite0",
        "mnist",
        Layout(("_conv_stem", "_bn0"), "_blocks", ("_conv_head", "_bn1"), "_fc"),
        tuple(r for r in RUN_ORDER if r != "hf"),
    ),
}


def data_config(task: Task, args: argparse.Namespace, windows: int = 1) -> DataConfig:
    """frostline's data defaults (batch 16, validation 20%, no augmentation), with the benchmark's sizes and limit;
    texts read in `windows` windows of the benchmark's tokens (the shared data: one)."""
    image_size = args.image_size if task.name == "vision" else None
    return DataConfig(
        ref=task.data_ref,
        max_length=args.max_length,
        limit=args.limit,
        image_size=image_size,
        windows=windows if task.name == "text" else 1,
    )


def task_data(task: Task, args: argparse.Namespace, windows: int = 1) -> PreparedData:
    """The task's data as frostline prepares it: tokenized texts, or uint8 images with per-batch transforms."""
    tokenizer, preprocess = open_tokenizer(task.model_ref), open_preprocess(task.model_ref)
    return prepare_data(data_config(task, args, windows), tokenizer, args.seed, preprocess=preprocess)


def save_data(data: PreparedData, path: Path) -> None:
    torch.save({f.name: getattr(data, f.name) for f in dataclasses.fields(data)}, path)


def load_data(path: Path) -> PreparedData:
    return PreparedData(**torch.load(path, weights_only=False))


def describe_task(task: Task, data: PreparedData, args: argparse.Namespace) -> str:
    shape = f"{args.max_length} tokens" if task.name == "text" else f"{args.image_size}px"
    return (
        f"{task.name}: {task.model_ref} on {data.describe()}, {shape}, torch threads {args.threads}, seed {args.seed}"
    )


# ---- timing -----------------------------------------------------------------------------------------------------
class EpochClock:
    """Each epoch's wall time, from the start of its training to the end of its validation, with a progress line."""

    def __init__(self, label: str):
        self.label = label
        self.epochs: list[dict[str, Any]] = []
        self._start = 0.0

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self, stage: str, accuracy: float) -> None:
        seconds = time.perf_counter() - self._start
        self.epochs.append({"stage": stage, "seconds": round(seconds, 4), "val_accuracy": float(accuracy)})
        print(
            f"    {self.label} epoch {len(self.epochs)} ({stage}): {seconds:.2f}s, val acc {100 * accuracy:.2f}%",
            flush=True,
        )


class ClockReporter(SilentReporter):
    """Times frostline's epochs from its reporter's epoch_start to epoch_end, so its bookkeeping counts too."""

    def __init__(self, clock: EpochClock):
        self.clock = clock

    def epoch_start(self, stage: StageConfig, epoch: int, batches: int) -> None:
        self.clock.start()

    def epoch_end(self, record: Any, diagnosis: Any) -> None:
        self.clock.stop(record.stage, record.val_accuracy)


def outcome(clock: EpochClock, started: float, accuracy: float, **extra: Any) -> dict[str, Any]:
    """A run's figures; `val_accuracy` is that of the model the run hands back."""
    wall = time.perf_counter() - started
    return {"wall_seconds": round(wall, 3), "epochs": clock.epochs, "val_accuracy": float(accuracy), **extra}


class NotInstalled(Exception):
    """A peer library is missing."""


# ---- frostline --------------------------------------------------------------------------------------------------
def run_frostline(
    task: Task, data: PreparedData, args: argparse.Namespace, stages: list[StageConfig], cache: str, windows: int = 1
) -> dict[str, Any]:
    if windows > 1 and task.name == "text":
        # the same split, read in more windows per text: tokenizing is data preparation, before the clock starts
        data = task_data(task, args, windows)
    started = time.perf_counter()
    # seeded before the model is built, so every run starts from the same head
    seed_everything(args.seed)
    source = open_model(task.model_ref, num_classes=len(data.label_names))
    config = FitConfig(
        model=ModelConfig(ref=task.model_ref),
        data=data_config(task, args, windows),
        stages=stages,
        run=RunConfig(seed=args.seed, cache=cache, threads=args.threads),
    )
    clock = EpochClock(RUN_NAMES[args.one[1]])
    trainer = Trainer(config, reporter=ClockReporter(clock), source=source, data=data)
    result = trainer.fit(write=False)
    return outcome(
        clock,
        started,
        result.best_val_accuracy,
        precision=trainer.runtime.precision,
        precision_reason=trainer.runtime.reason,
        stop_reason=result.stop_reason,
        windows=config.data.windows,
        cache_seconds=sum(r.cache_seconds for r in result.history),
        cached=sorted({r.cache for r in result.history if r.cache}),
        loop_seconds=[r.train_seconds + r.eval_seconds for r in result.history],
    )


# ---- the plain loop ---------------------------------------------------------------------------------------------
def trained_units(model: nn.Module, layout: Layout, freeze: str) -> dict[str, int]:
    """The modules a freeze spec (head, last:N or none; `;bn=fixed` allowed) trains, each with its depth below the
    head for layer decay."""
    spec = FreezeSpec.parse(freeze)
    blocks = layout.units(model)[len(layout.stem) : -1 - len(layout.after)]
    if spec.mode == "head":
        return {layout.head: 0}
    if spec.mode not in ("none", "last"):
        raise ValueError(f"the plain loop knows the freeze specs head, last:N and none, got {freeze!r}")
    n = len(blocks) if spec.mode == "none" else spec.n
    trained = {path: len(blocks) - i for i, path in enumerate(blocks) if i >= len(blocks) - n}
    trained.update({path: 0 for path in (*layout.after, layout.head)})
    if spec.mode == "none":
        trained.update({path: len(blocks) + 1 for path in layout.stem})
    return trained


def plain_groups(model: nn.Module, layout: Layout, stage: StageConfig, trained: dict[str, int]) -> list[dict]:
    """AdamW groups by hand: the head at lr x head_lr_mult, a module k blocks down at lr x layer_decay**k;
    no weight decay on 1-D tensors (biases and norm weights)."""
    groups = []
    for path, depth in trained.items():
        lr = stage.lr * (stage.head_lr_mult if path == layout.head else stage.layer_decay**depth)
        params = list(model.get_submodule(path).parameters())
        groups.append({"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": stage.weight_decay})
        groups.append({"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def warmup_cosine(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LRScheduler:
    cosine = CosineAnnealingLR(optimizer, T_max=total - warmup)
    if warmup == 0:
        return cosine
    rise = LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
    return SequentialLR(optimizer, [rise, cosine], milestones=[warmup])


def set_modes(model: nn.Module, layout: Layout, trained: dict[str, int], bn_fixed: bool) -> None:
    """Train mode, with frozen modules back in eval (no dropout, fixed BatchNorm); a linear probe runs all in eval;
    with bn_fixed every BatchNorm, trainable ones too, stays on its running statistics."""
    if list(trained) == [layout.head]:
        model.eval()
        return
    model.train()
    for path in layout.units(model):
        if path not in trained:
            model.get_submodule(path).eval()
    for module in model.modules():
        if bn_fixed and isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def take(inputs: Any, index: Any) -> Any:
    return {k: v[index] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[index]


def forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def plain_epoch(
    model: nn.Module,
    data: PreparedData,
    batch_size: int,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    runtime: Runtime,
) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    order = torch.randperm(len(data.train_labels), generator=generator)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        inputs = take(data.train_inputs, index)
        if data.train_transform is not None:
            inputs = data.train_transform(inputs, generator)
        with runtime.autocast():
            loss = F.cross_entropy(forward(model, inputs).float(), data.train_labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()


@torch.inference_mode()
def plain_accuracy(model: nn.Module, data: PreparedData, batch_size: int, runtime: Runtime) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data.val_labels), batch_size):
        index = slice(start, start + batch_size)
        inputs = take(data.val_inputs, index)
        if data.val_transform is not None:
            inputs = data.val_transform(inputs, None)
        with runtime.autocast():
            logits = forward(model, inputs)
        correct += (logits.argmax(dim=-1) == data.val_labels[index]).sum().item()
    return correct / len(data.val_labels)


def run_plain(task: Task, data: PreparedData, args: argparse.Namespace) -> dict[str, Any]:
    """frostline's default recipe by hand, no cache, for as many epochs per stage as frostline cache=off ran."""
    stages = default_stages()
    epochs_run = args.stage_epochs or [s.epochs for s in stages]
    config = data_config(task, args)
    # frostline's precision choice, so both loops do the same arithmetic
    runtime = select_runtime()
    started = time.perf_counter()
    seed_everything(args.seed)
    model = open_model(task.model_ref, num_classes=len(data.label_names)).model
    clock = EpochClock(RUN_NAMES["plain"])
    for index, (stage, epochs) in enumerate(zip(stages, epochs_run, strict=True)):
        trained = trained_units(model, task.layout, stage.freeze)
        model.requires_grad_(False)
        for path in trained:
            model.get_submodule(path).requires_grad_(True)
        optimizer = torch.optim.AdamW(plain_groups(model, task.layout, stage, trained), fused=True)
        # the schedule spans the stage's planned epochs, as frostline's does when it stops a stage early
        total = math.ceil(len(data.train_labels) / config.batch_size) * stage.epochs
        schedule = warmup_cosine(optimizer, total, int(stage.warmup * total))
        generator = torch.Generator().manual_seed(args.seed + index)
        for _ in range(epochs):
            clock.start()
            set_modes(model, task.layout, trained, FreezeSpec.parse(stage.freeze).bn == "fixed")
            plain_epoch(model, data, config.batch_size, generator, optimizer, schedule, runtime)
            clock.stop(stage.name, plain_accuracy(model, data, config.eval_batch_size, runtime))
    final = clock.epochs[-1]["val_accuracy"] if clock.epochs else math.nan
    return outcome(clock, started, final, stage_epochs=epochs_run, copied_epochs=bool(args.stage_epochs))


# ---- peers ------------------------------------------------------------------------------------------------------
class Examples(torch.utils.data.Dataset):
    """Tensors as a map-style data set: dicts with `labels` for token inputs (as HF Trainer collates), else (x, y)."""

    def __init__(self, inputs: Any, labels: torch.Tensor):
        self.inputs = inputs
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Any:
        if isinstance(self.inputs, dict):
            return {**{k: v[i] for k, v in self.inputs.items()}, "labels": self.labels[i]}
        return self.inputs[i], self.labels[i]


def collate(transform: Any, generator: torch.Generator | None) -> Any:
    """Batches as the default collate makes them, then frostline's per-batch image transform (when there is one)."""
    if transform is None:
        return torch.utils.data.default_collate

    def batch(items: list) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = torch.utils.data.default_collate(items)
        return transform(inputs, generator), labels

    return batch


def run_hf(task: Task, data: PreparedData, args: argparse.Namespace) -> dict[str, Any]:
    """transformers' Trainer as its users start: full fine-tuning, TrainingArguments defaults, eval each epoch."""
    if importlib.util.find_spec("accelerate") is None:
        raise NotInstalled
    from transformers import BertForSequenceClassification, PrinterCallback, TrainerCallback, TrainingArguments
    from transformers import Trainer as HFTrainer

    from frostline.sources.text import resolve_folder

    clock = EpochClock(RUN_NAMES["hf"])

    class Clock(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            clock.stop("full", metrics["eval_accuracy"])

    def accuracy(prediction) -> dict[str, float]:
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    started = time.perf_counter()
    seed_everything(args.seed)
    folder = resolve_folder(task.model_ref.removeprefix("hf:"))
    model = BertForSequenceClassification.from_pretrained(folder, num_labels=len(data.label_names))
    with tempfile.TemporaryDirectory() as output:
        hf_args = TrainingArguments(
            output_dir=output,
            per_device_train_batch_size=HF_BATCH_SIZE,
            eval_strategy="epoch",
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=args.seed,
            disable_tqdm=True,
        )
        trainer = HFTrainer(
            model=model,
            args=hf_args,
            train_dataset=Examples(data.train_inputs, data.train_labels),
            eval_dataset=Examples(data.val_inputs, data.val_labels),
            compute_metrics=accuracy,
            callbacks=[Clock()],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    settings = {k: str(getattr(hf_args, k)) for k in ("learning_rate", "lr_scheduler_type", "num_train_epochs")}
    return outcome(clock, started, clock.epochs[-1]["val_accuracy"], settings=settings)


def lightning_classifier(lightning: Any) -> type:
    class Classifier(lightning.LightningModule):
        """`backbone` + `head`: BackboneFinetuning freezes the backbone, then unfreezes it at a set epoch."""

        def __init__(self, backbone: nn.Module, head: nn.Module, lr: float):
            super().__init__()
            self.backbone = backbone
            self.head = head
            self.lr = lr
            self.val_accuracy = math.nan
            self.correct, self.seen = 0, 0

        def forward(self, inputs: Any) -> torch.Tensor:
            return self.head(call_model(self.backbone, inputs))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, labels = split_batch(batch)
            return F.cross_entropy(self(inputs), labels)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            inputs, labels = split_batch(batch)
            self.correct += (self(inputs).argmax(dim=-1) == labels).sum().item()
            self.seen += len(labels)

        def on_validation_epoch_end(self) -> None:
            if not self.trainer.sanity_checking:
                self.val_accuracy = self.correct / max(self.seen, 1)
            self.correct, self.seen = 0, 0

        def configure_optimizers(self) -> torch.optim.Optimizer:
            # only what BackboneFinetuning left trainable; it adds the backbone as a new group when it unfreezes it
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    return Classifier


def run_lightning(task: Task, data: PreparedData, args: argparse.Namespace) -> dict[str, Any]:
    """Lightning's BackboneFinetuning, its defaults, as long as frostline's recipe: the head's epochs, then the rest."""
    try:
        import lightning
        from lightning.pytorch.callbacks import BackboneFinetuning, Callback
    except ImportError as err:
        raise NotInstalled from err
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    stages = default_stages()
    unfreeze_at, max_epochs = stages[0].epochs, sum(s.epochs for s in stages)
    clock = EpochClock(RUN_NAMES["lightning"])

    class Clock(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            clock.start()

        def on_train_epoch_end(self, trainer, pl_module):
            clock.stop("head" if trainer.current_epoch < unfreeze_at else "backbone", pl_module.val_accuracy)

    config = data_config(task, args)
    started = time.perf_counter()
    seed_everything(args.seed)
    backbone = open_model(task.model_ref, num_classes=len(data.label_names)).model
    head = backbone.get_submodule(task.layout.head)
    setattr(backbone, task.layout.head, nn.Identity())
    module = lightning_classifier(lightning)(backbone, head, LIGHTNING_HEAD_LR)
    generator = torch.Generator().manual_seed(args.seed)
    train = torch.utils.data.DataLoader(
        Examples(data.train_inputs, data.train_labels),
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=collate(data.train_transform, generator),
    )
    val = torch.utils.data.DataLoader(
        Examples(data.val_inputs, data.val_labels),
        batch_size=config.eval_batch_size,
        collate_fn=collate(data.val_transform, None),
    )
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Clock(), BackboneFinetuning(unfreeze_backbone_at_epoch=unfreeze_at)],
    )
    trainer.fit(module, train, val)
    return outcome(clock, started, module.val_accuracy, unfreeze_at=unfreeze_at, max_epochs=max_epochs)


RUNNERS = {
    "default": lambda task, data, args: run_frostline(task, data, args, default_stages(), "auto", args.windows),
    "cache-off": lambda task, data, args: run_frostline(task, data, args, default_stages(), "off"),
    "full-ft": lambda task, data, args: run_frostline(task, data, args, full_ft_stages(), "off"),
    "head": lambda task, data, args: run_frostline(task, data, args, default_stages()[:1], "auto", args.windows),
    "plain": run_plain,
    "hf": run_hf,
    "lightning": run_lightning,
}


def run_one(args: argparse.Namespace) -> int:
    """The child process: one run on the shared data; its figures go to --result as JSON."""
    torch.set_num_threads(args.threads)
    task, run = TASKS[args.one[0]], args.one[1]
    try:
        result = RUNNERS[run](task, load_data(args.data), args)
    except NotInstalled:
        result = {"error": NOT_INSTALLED}
    Path(args.result).write_text(json.dumps(result))
    return 0


# ---- the parent: spawn, collect, report -------------------------------------------------------------------------
def last_lines(path: Path, n: int) -> list[str]:
    return [line for line in path.read_text(errors="replace").splitlines() if line.strip()][-n:]


def spawn(
    task: Task, run: str, data_file: Path, folder: Path, args: argparse.Namespace, copied_epochs: list[int] | None
) -> dict:
    """Run one (task, run) in a fresh process; its peak RSS comes from wait4, so a crash still reports it."""
    stem = f"{task.name}-{args.seed}-{run}"
    result_file, log_file = folder / f"{stem}.json", folder / f"{stem}.log"
    command = [
        sys.executable,
        __file__,
        "--one",
        task.name,
        run,
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
    ]
    command += ["--data", str(data_file), "--result", str(result_file), "--max-length", str(args.max_length)]
    command += ["--windows", str(args.windows)]
    command += ["--limit", str(args.limit)] if args.limit else []
    command += ["--stage-epochs", ",".join(map(str, copied_epochs))] if copied_epochs else []
    print(f"[{task.name}] {RUN_NAMES[run]}: started", flush=True)
    busy, started = busy_cpu_seconds(), time.perf_counter()
    with log_file.open("w") as log:
        child = subprocess.Popen(command, stderr=log)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    others = other_cpu_share(busy, usage, time.perf_counter() - started)
    if result_file.is_file():
        result = json.loads(result_file.read_text())
    else:
        tail = last_lines(log_file, 20)
        print("\n".join(f"    | {line}" for line in tail), flush=True)
        result = {"error": f"error (exit {child.returncode}): {tail[-1] if tail else 'no output'}"[:160]}
    result["peak_mib"] = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    result["returncode"] = child.returncode
    result["other_cpu_share"] = others
    print(f"[{task.name}] {RUN_NAMES[run]}: {summary(result)}", flush=True)
    if crowded(others, args.threads):
        print(f"[{task.name}] warning: other processes used {others:.0%} of the CPU during this run", flush=True)
    return result


def crowded(other_share: float | None, threads: int) -> bool:
    """Whether other processes took CPU from the cores a run's threads needed."""
    cores = os.cpu_count() or 1
    return other_share is not None and other_share * cores + min(threads, cores) > cores * (1 + BUSY)


def other_cpu_share(busy_before: float | None, usage: Any, seconds: float) -> float | None:
    """The share of the machine's CPU that processes other than the run used while it ran.

    Busy neighbours wreck CPU timings: with torch's threads on both cores of a 2-core machine and one other
    busy process, an EfficientNet forward ran 30x slower than on one thread (its threads wait on each other).
    """
    if busy_before is None or seconds <= 0:
        return None
    others = busy_cpu_seconds() - busy_before - (usage.ru_utime + usage.ru_stime)
    return max(others, 0.0) / (seconds * (os.cpu_count() or 1))


def ok(result: dict | None) -> bool:
    return result is not None and "error" not in result and bool(result["epochs"])


def epoch_seconds(result: dict) -> list[float]:
    return [e["seconds"] for e in result["epochs"]]


def best_accuracy(result: dict) -> float:
    return max(e["val_accuracy"] for e in result["epochs"])


def stage_epochs(result: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for epoch in result["epochs"]:
        counts[epoch["stage"]] = counts.get(epoch["stage"], 0) + 1
    return counts


def summary(result: dict) -> str:
    if not ok(result):
        return result.get("error", "no epochs ran")
    return f"done in {result['wall_seconds']:.1f}s, val acc {100 * result['val_accuracy']:.2f}%"


def row(name: str, result: dict) -> str:
    if not ok(result):
        peak = "" if result.get("error") == NOT_INSTALLED else f"{result['peak_mib']:,.0f}"
        return f"| {name} | {result.get('error', 'no epochs ran')} | | | {peak} | |"
    seconds = epoch_seconds(result)
    counts = stage_epochs(result)
    epochs = f"{len(seconds)} ({'+'.join(map(str, counts.values()))})" if len(counts) > 1 else str(len(seconds))
    accuracy = f"{100 * result['val_accuracy']:.2f}"
    if best_accuracy(result) > result["val_accuracy"]:
        accuracy += f" (best {100 * best_accuracy(result):.2f})"
    return (
        f"| {name} | {result['wall_seconds']:,.1f} | {statistics.median(seconds):.2f} "
        f"({min(seconds):.2f}-{max(seconds):.2f}) | {epochs} | {result['peak_mib']:,.0f} | {accuracy} |"
    )


def describe_stages(stages: list[StageConfig]) -> str:
    return "; ".join(
        f"{s.name}: {s.freeze}, {s.epochs} epochs, lr {s.lr:g} {s.schedule}, head x{s.head_lr_mult:g}"
        + (f", layer decay {s.layer_decay:g}" if s.layer_decay != 1 else "")
        + (f", warm-up {s.warmup:g}" if s.warmup else "")
        + (f", only when {s.when}" if s.when != "always" else "")
        for s in stages
    )


def notes(task: Task, results: dict[str, dict], threads: int) -> list[str]:
    """What each run did, in words, from the configs (nothing here is a measured figure)."""
    stages = default_stages()
    windows = results.get("default", {}).get("windows", 1)
    head_windows = results.get("head", {}).get("windows", 1)
    plain = results.get("plain", {})
    copied = "as frostline cache=off ran" if plain.get("copied_epochs") else "the full recipe (cache=off did not run)"
    said = {
        "default": f"{describe_stages(stages)}; run.cache=auto"
        + (f"; each text read in up to {results['default']['windows']} windows" if windows > 1 else ""),
        "plain": f"the same recipe by hand, no cache; epochs per stage {plain.get('stage_epochs')}, {copied}; "
        "AdamW(fused, as frostline), head and layer-decay groups, no decay on 1-D tensors, warm-up + cosine, "
        "clip 1.0, frozen modules in eval, index-sliced batches (images: frostline's per-batch transform)",
        "hf": "BertForSequenceClassification ([CLS] pooler) from the bundled MiniLM folder, full fine-tuning, "
        f"TrainingArguments defaults (lr 5e-5 linear, 3 epochs, no warm-up, weight decay 0), batch {HF_BATCH_SIZE} "
        "(its default; frostline uses 16), eval each epoch",
        "lightning": f"BackboneFinetuning(unfreeze_backbone_at_epoch={stages[0].epochs}), its other defaults (the "
        "whole backbone at 0.1x the head's rate, x1.5 per epoch up to it); head AdamW lr "
        f"{LIGHTNING_HEAD_LR:g} constant; {sum(s.epochs for s in stages)} epochs = frostline's "
        f"{'+'.join(str(s.epochs) for s in stages)}; backbone = {task.model_ref} without {task.layout.head}",
        "cache-off": "the default recipe with run.cache=off",
        "full-ft": f"{describe_stages(full_ft_stages())}; run.cache=off",
        "head": f"the default's first stage alone ({describe_stages(stages[:1])}); run.cache=auto"
        + (f"; each text read in up to {results['head']['windows']} windows" if head_windows > 1 else ""),
    }
    lines = [
        f"- {RUN_NAMES[run]}: {said[run]}"
        + (f" (figures reused from {results[run]['reused_from']})" if "reused_from" in results[run] else "")
        for run in RUN_NAMES
        if run in results
    ]
    shares = {run: r.get("other_cpu_share") for run, r in results.items()}
    busy = [f"{RUN_NAMES[run]} {share:.0%}" for run, share in shares.items() if crowded(share, threads)]
    if busy:
        lines.append(
            f"- WARNING: other processes used the CPU during {', '.join(busy)}; those timings are not comparable, "
            "rerun on an idle machine (or with --threads below the free cores)"
        )
    lines.append(
        "- wall time: model load to the last validation, in a fresh process (data prepared once, shared); epoch: "
        "its training + validation (frostline: reporter epoch_start to epoch_end); peak memory: the process's max "
        "RSS (imports and data included); accuracy: the model the run hands back (frostline keeps its best epoch)"
    )
    return lines


def stage_ratios(slow: dict, fast: dict) -> str:
    """Median epoch time of each stage in `slow` over the same stage's in `fast`."""

    def medians(result: dict) -> dict[str, float]:
        return {
            name: statistics.median(e["seconds"] for e in result["epochs"] if e["stage"] == name)
            for name in stage_epochs(result)
        }

    ours, theirs = medians(slow), medians(fast)
    return ", ".join(f"{name} {ours[name] / theirs[name]:.3f}" for name in ours if name in theirs) or "no common stage"


def target_checks(task: Task, results: dict[str, dict]) -> list[str]:
    lines = []
    off, plain = results.get("cache-off"), results.get("plain")
    if ok(off) and ok(plain):
        ratio = statistics.median(epoch_seconds(off)) / statistics.median(epoch_seconds(plain))
        total = sum(epoch_seconds(off)) / sum(epoch_seconds(plain))
        verdict = "met" if ratio <= 1.03 else "NOT met"
        lines.append(
            f"- (a) {task.name}: frostline cache=off median epoch / plain loop's = {ratio:.3f} "
            f"(target <= 1.03: {verdict}); all epochs summed: {total:.3f}; per stage: {stage_ratios(off, plain)}"
        )
    else:
        lines.append(f"- (a) {task.name}: not measured (needs cache-off and plain, both without error)")
    default = results.get("default")
    peers = [run for run in ("hf", "lightning") if ok(results.get(run))]
    if ok(default) and peers:
        peer = max(peers, key=lambda run: best_accuracy(results[run]))
        speed = results[peer]["wall_seconds"] / default["wall_seconds"]
        ours, theirs = 100 * default["val_accuracy"], 100 * best_accuracy(results[peer])
        gap = ours - theirs
        lines.append(
            f"- (b) {task.name}: wall time frostline default {default['wall_seconds']:,.0f}s, {RUN_NAMES[peer]} (the "
            f"peer with the best accuracy) {results[peer]['wall_seconds']:,.0f}s: the peer takes {speed:.2f}x as long; "
            f"accuracy {ours:.2f}% vs the peer's best epoch {theirs:.2f}%, "
            f"{gap:+.2f} points (target: at most 0.5 below: {'met' if gap >= -0.5 else 'NOT met'})"
        )
    else:
        lines.append(f"- (b) {task.name}: not measured (needs default and a peer, without error)")
    return lines


def spread(values: list[float], form: str) -> str:
    """Median and min-max of `values`, each written with `form`."""
    median = format(statistics.median(values), form)
    return median if len(values) == 1 else f"{median} ({format(min(values), form)}-{format(max(values), form)})"


def across_seeds(task: Task, by_seed: dict[int, dict[str, dict]]) -> list[str]:
    """Accuracy and wall time of each run as median (min-max) over the seeds' splits, and target (b) per seed.

    A validation set of a few hundred examples moves in steps of one example (0.23 points for 426 articles);
    one split cannot tell a 0.5-point gap from chance, a few splits show how far it moves.
    """
    seeds = sorted(by_seed)
    runs = [run for run in RUN_NAMES if all(ok(by_seed[seed].get(run)) for seed in seeds)]
    lines = [
        f"### {task.name}: over {len(seeds)} splits (seeds {', '.join(map(str, seeds))}), median (min-max)",
        "",
        "| run | wall time (s) | validation accuracy (%) | best epoch's accuracy (%) |",
        "|---|---:|---:|---:|",
    ]
    for run in runs:
        results = [by_seed[seed][run] for seed in seeds]
        lines.append(
            f"| {RUN_NAMES[run]} | {spread([r['wall_seconds'] for r in results], ',.1f')} "
            f"| {spread([100 * r['val_accuracy'] for r in results], '.2f')} "
            f"| {spread([100 * best_accuracy(r) for r in results], '.2f')} |"
        )
    peers = [run for run in ("hf", "lightning") if run in runs]
    if "default" in runs and peers:
        # the best peer is the one with the best median accuracy over the splits
        peer = max(peers, key=lambda run: statistics.median(best_accuracy(by_seed[s][run]) for s in seeds))
        gaps = [100 * (by_seed[s]["default"]["val_accuracy"] - best_accuracy(by_seed[s][peer])) for s in seeds]
        speeds = [by_seed[s][peer]["wall_seconds"] / by_seed[s]["default"]["wall_seconds"] for s in seeds]
        met = sum(gap >= -0.5 and speed >= 2 for gap, speed in zip(gaps, speeds, strict=True))
        verdict = "met" if statistics.median(gaps) >= -0.5 and statistics.median(speeds) >= 2 else "NOT met"
        lines += [
            "",
            f"- (b) {task.name} over the splits: frostline default minus {RUN_NAMES[peer]}'s best epoch, per seed "
            f"{', '.join(f'{g:+.2f}' for g in gaps)} points (median {statistics.median(gaps):+.2f}); the peer takes "
            f"{', '.join(f'{v:.2f}x' for v in speeds)} as long (median {statistics.median(speeds):.2f}x); "
            f"target (within 0.5 points, at most half the time) met on {met} of {len(seeds)} splits, "
            f"on the medians: {verdict}",
        ]
    return [*lines, ""]


def machine(args: argparse.Namespace) -> str:
    cpu, flags = cpu_info()
    # the flags that decide how fast bf16 and wide vectors run; "none of them" is as telling
    vector = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"})
    versions = []
    for package in ("torch", "transformers", "lightning", "accelerate"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    return (
        f"Machine: {cpu} (flags: {', '.join(vector) or 'none of avx2/avx512/amx'}), {os.cpu_count()} cores, torch "
        f"threads {args.threads}; {', '.join(versions)}; python {sys.version.split()[0]}; frostline's precision: "
        f"timed per run (see each frostline run's precision_reason); the flags alone would say "
        f"{select_runtime().precision}\n"
        f"Command: python {shlex.join(sys.argv)}"
    )


def reused(path: Path, task: Task, seed: int, run: str, title: str) -> dict:
    """A run's figures from an earlier --out file, for the same task, seed and data (its title must match)."""
    text = path.read_text()
    if "```json\n" not in text:
        sys.exit(f"--reuse: {path} has no JSON block; it must be a file written by --out")
    raw = json.loads(text.split("```json\n", 1)[1].rsplit("\n```", 1)[0])
    earlier = raw["tasks"].get(task.name, {}).get(str(seed))
    if earlier is None or run not in earlier["runs"]:
        sys.exit(f"--reuse: {path} has no {run!r} run of task {task.name!r} at seed {seed}")
    if earlier["title"] != title:
        sys.exit(f"--reuse: {path} measured other data: {earlier['title']!r}, not {title!r}")
    return {**earlier["runs"][run], "reused_from": str(path)}


def run_task(task: Task, runs: list[str], args: argparse.Namespace, folder: Path) -> tuple[list[str], dict]:
    """Every run of the task on the split of `args.seed` (a fresh split per seed)."""
    print(f"[{task.name}] seed {args.seed}: preparing data", flush=True)
    start = time.perf_counter()
    data = task_data(task, args)
    data_file = folder / f"{task.name}-{args.seed}.pt"
    save_data(data, data_file)
    title = describe_task(task, data, args)
    print(f"[{task.name}] {title} ({time.perf_counter() - start:.1f}s)", flush=True)
    del data
    results: dict[str, dict] = {}
    for run in (r for r in RUN_ORDER if r in runs and r not in task.runs):
        print(f"[{task.name}] {RUN_NAMES[run]}: skipped, it does not apply to this task", flush=True)
    for run in (r for r in RUN_ORDER if r in runs and r in task.runs):
        if run in args.reuse:
            results[run] = reused(args.reuse[run], task, args.seed, run, title)
            print(f"[{task.name}] {RUN_NAMES[run]}: reused from {args.reuse[run]}: {summary(results[run])}", flush=True)
            continue
        off = results.get("cache-off")
        copied = [stage_epochs(off).get(s.name, 0) for s in default_stages()] if run == "plain" and ok(off) else None
        results[run] = spawn(task, run, data_file, folder, args, copied)
    lines = [
        f"### {title}",
        "",
        "| run | wall time (s) | time per epoch (s), median (min-max) | epochs | "
        "peak memory (MiB) | validation accuracy (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [row(RUN_NAMES[run], results[run]) for run in RUN_NAMES if run in results]
    lines += ["", *notes(task, results, args.threads), "", "Targets:", *target_checks(task, results), ""]
    return lines, {"title": title, "runs": results}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["text", "vision", "all"], default="all")
    parser.add_argument("--runs", help=f"comma list of runs (default all): {', '.join(RUN_NAMES)}")
    parser.add_argument("--limit", type=int, help="use N examples before the train/validation split (quick runs)")
    parser.add_argument("--max-length", type=int, default=DataConfig.max_length, help="tokens per text")
    parser.add_argument(
        "--windows",
        type=int,
        default=DataConfig.windows,
        help="windows of --max-length tokens frostline's default and head runs read per text (data.windows; the "
        "other runs read one)",
    )
    parser.add_argument("--image-size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument(
        "--seeds",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[0],
        help="comma list of seeds: each is its own train/validation split and run seed; with more than one, a "
        "summary over the splits follows the tables (default 0)",
    )
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="RUN=FILE",
        help="take RUN's figures from an earlier --out FILE (same task, seeds and data) instead of running it again, "
        "e.g. --reuse hf=text.md when only frostline changed",
    )
    parser.add_argument("--out", type=Path, help="also write the tables and a JSON of every figure here")
    parser.add_argument("--one", nargs=2, metavar=("TASK", "RUN"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stage-epochs", type=lambda s: [int(n) for n in s.split(",")], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.run_list = args.runs.split(",") if args.runs else list(RUN_NAMES)
    pairs = [item.partition("=") for item in args.reuse]
    args.reuse = {run: Path(path) for run, _, path in pairs}
    if any(not sep or run not in RUN_NAMES or not Path(path).is_file() for run, sep, path in pairs):
        parser.error(f"--reuse takes RUN=FILE with a run of {', '.join(RUN_NAMES)} and an existing file")
    unknown = [r for r in args.run_list if r not in RUN_NAMES]
    if unknown:
        parser.error(f"--runs: unknown {', '.join(unknown)}; the runs are {', '.join(RUN_NAMES)}")
    return args


def main() -> int:
    args = parse_args()
    if args.one:
        return run_one(args)
    tasks = list(TASKS) if args.task == "all" else [args.task]
    report: list[str] = []
    raw: dict[str, Any] = {"command": sys.argv, "threads": args.threads, "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="frostline-compare-") as folder:
        for name in tasks:
            by_seed = {}
            for seed in args.seeds:
                seeded = argparse.Namespace(**{**vars(args), "seed": seed})
                lines, figures = run_task(TASKS[name], args.run_list, seeded, Path(folder))
                raw["tasks"].setdefault(name, {})[seed] = figures
                by_seed[seed] = figures["runs"]
                report += lines
            if len(args.seeds) > 1:
                report += across_seeds(TASKS[name], by_seed)
    report.append(machine(args))
    text = "\n".join(report)
    print("\n" + text, flush=True)
    if args.out:
        args.out.write_text(f"{text}\n\n```json\n{json.dumps(raw, indent=2)}\n```\n")
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
