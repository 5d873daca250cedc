"""A frostline recipe inside `transformers.Trainer`: staged unfreezing, the setup lint, the freeze guard and the
overfitting monitor, every stage decision made by `frostline.recipe.Recipe`.

    callback = FrostlineCallback([StageConfig("head", "head", epochs=2, lr=1e-3),
                                  StageConfig("last2", "last:2", epochs=2, lr=1e-4)])
    trainer = Trainer(model, TrainingArguments(..., eval_strategy="epoch", num_train_epochs=callback.epochs),
                      train_dataset=train, eval_dataset=val, compute_metrics=callback.compute_metrics,
                      callbacks=[callback], optimizers=callback.optimizers())
    trainer.train()      # the model ends with the best epoch's weights; callback.history, .diagnosis, .stop_reason

How the optimizer works across stages. The Trainer builds (or takes) its optimizer and scheduler once, before
training, and wraps the optimizer for accelerate. `callback.optimizers()` hands it two thin objects that stay the
same for the whole run: `StageOptimizer` and `StageSchedule`. At each stage start the callback asks the recipe
(`Recipe.start`: freeze, then the stage's parameter groups with their rates), builds a fresh
`torch.optim.AdamW(stage.groups)` and `stage.schedule(...)` behind them, and lints them (`Stage.attach`). A stage
never inherits the previous stage's optimizer, exactly as in `frostline fit`: the AdamW of a stage holds only the
tensors that stage trains, with no moments from before, so no weight decay or momentum can move a frozen tensor,
even one that trained in an earlier stage (the lint checks it, and `Stage.finish`, the guard, proves it bit for bit
at each stage end). The Trainer's own calls go to the stage's AdamW and schedule: `step`, `zero_grad`,
`param_groups` (lr logging), accelerate's wrapping and gradient scaler, `state_dict`/`load_state_dict` for its
checkpoints. The optimizer's state also carries the recipe's place (stage, epoch records, best weights), so
`trainer.train(resume_from_checkpoint=...)` continues in the right stage with its trainable set and AdamW moments.
Steps per epoch come from the Trainer's train dataloader and `gradient_accumulation_steps`.

What the user passes:
- `optimizers=callback.optimizers()` and `callbacks=[callback]` to the Trainer. The Trainer's `learning_rate`,
  `weight_decay`, `lr_scheduler_type`, `warmup_*`, `optim` and `adam_*` arguments are not used: each stage's
  `StageConfig` sets its rates, decay and schedule; the optimizer is AdamW with torch's defaults.
- `TrainingArguments(eval_strategy="epoch", num_train_epochs=callback.epochs)`: stages advance at epoch
  boundaries (a stage is `StageConfig.epochs` epochs of the Trainer, fewer when the monitor ends it), and the
  monitor judges each epoch's evaluation. More epochs than the recipe are allowed: the run stops at its end.
- `compute_metrics` returning `accuracy`: the monitor reads the validation accuracy from the Trainer's
  `eval_accuracy` and the validation loss from `eval_loss`. `callback.compute_metrics` also gives it each example's
  loss and correctness, so every comparison between epochs is paired over the same examples and knows its noise;
  `compute_accuracy` gives the number of examples and the spread of their losses (wider, unpaired errors). The
  training loss of an epoch is the mean of the Trainer's logged `loss` over that epoch's steps (the callback asks the
  Trainer to log at every epoch end).
- several processes (`torchrun`, `accelerate launch`): the Trainer wraps the model in DistributedDataParallel once,
  before the first stage, and DDP registers the tensors that require grad at that moment. Every tensor a stage will
  train must be among them (the default: a loaded model trains everything), or it would train out of sync: the
  callback checks this when training begins and names any that are not. The Trainer's DDP then runs with
  `find_unused_parameters` (its default for transformers models without activation checkpointing), which lets each
  stage's frozen tensors go without a gradient: they keep none, and only their zeros are summed. Tensors that no
  stage trains can be kept out of DDP altogether by freezing them before `trainer.train()`. Every process records the
  same history, because the Trainer gathers the evaluation and averages the logged loss over the processes.
  Refused: DataParallel (one process over several GPUs), FSDP, DeepSpeed and `ddp_static_graph`. Tested: CPU, gloo,
  two processes.
- `example_batch` when the train dataset has no length (an `IterableDataset`); otherwise the callback collates a
  few training examples to map the model (`frostline.inspect.inspect_model`).

Frozen dropout and BatchNorm stay in eval mode under the Trainer's `model.train()` calls: `frostline.freeze` holds
them with forward pre-hooks, which fire inside the Trainer as anywhere else.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from frostline.batches import Batch, batch_to
from frostline.checkpoint import model_tensors
from frostline.config import StageConfig, load_config
from frostline.errors import ConfigError
from frostline.freeze import FreezePlan
from frostline.inspect import ModelMap, inspect_model
from frostline.optim import adamw, group_rates
from frostline.recipe import EpochRecord, Recipe, Stage, steps_per_epoch
from frostline.train.evidence import ValidationExamples, attach_examples, examples_from_logits, examples_tensors
from frostline.train.monitor import Diagnosis

logger = logging.getLogger(__name__)
_replicas = logging.getLogger(f"{__name__}.other_processes")
"""Where processes other than the first log: every process makes the same decisions, and the first says them."""
_replicas.setLevel(logging.ERROR)


def compute_accuracy(eval_pred: Any) -> dict[str, float]:
    """`compute_metrics` for the Trainer: the share of examples whose highest logit is the label, the number of
    examples and the spread of their losses (the monitor's measure of the validation set's noise)."""
    return _metrics(_examples(eval_pred))


def _metrics(examples: ValidationExamples) -> dict[str, float]:
    return {
        "accuracy": float(examples.correct.double().mean()),
        "examples": float(len(examples)),
        "loss_sd": examples.loss_sd,
    }


def _examples(eval_pred: Any) -> ValidationExamples:
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return examples_from_logits(np.asarray(logits), np.asarray(labels))


class StageOptimizer(torch.optim.Optimizer):
    """The optimizer the Trainer holds for the whole run: each stage's fresh AdamW behind one object.

    Like accelerate's `AcceleratedOptimizer`, it subclasses `torch.optim.Optimizer` without its constructor and
    passes everything to the optimizer inside: before the first stage it has no parameter groups.
    """

    def __init__(
        self,
        recipe_state: Callable[[], dict[str, Any] | None],
        make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] = adamw,
    ):
        self.make = make
        """Makes each stage's optimizer from its parameter groups."""
        self.current: torch.optim.Optimizer | None = None
        """The stage's AdamW (None before the first stage)."""
        self.schedule: LRScheduler | None = None
        """The stage's schedule, stepped by `StageSchedule`."""
        self.pending: dict[str, Any] | None = None
        """A state loaded from a Trainer checkpoint, applied when training begins."""
        self._recipe_state = recipe_state

    def begin(self, stage: Stage, per_epoch: int) -> torch.optim.Optimizer:
        """Put a fresh optimizer (AdamW by default) over the stage's groups, and its schedule, in place of the last
        stage's."""
        self.current = self.make(stage.groups)
        self.schedule = stage.schedule(self.current, per_epoch)
        return self.current

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.current.param_groups if self.current is not None else []

    @property
    def state(self) -> Any:
        return self.current.state if self.current is not None else {}

    @property
    def defaults(self) -> dict[str, Any]:
        return self.current.defaults if self.current is not None else {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise ConfigError(
            "StageOptimizer takes its parameter groups from the recipe's stages; change the recipe "
            "(StageConfig.freeze, lr, head_lr_mult, layer_decay) instead of adding groups"
        )

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if self.current is None:
            raise ConfigError(
                "the frostline optimizer has no stage yet: pass the callback to the Trainer as well, "
                "Trainer(..., callbacks=[callback], optimizers=callback.optimizers())"
            )
        return self.current.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.current is not None:
            self.current.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The stage's AdamW state (torch's layout) with the recipe's place under `frostline`."""
        state = self.current.state_dict() if self.current is not None else {"state": {}, "param_groups": []}
        recipe = self._recipe_state()
        if recipe is not None and self.schedule is not None and recipe["stage_open"]:
            recipe["schedule"] = self.schedule.state_dict()
        return {**state, "frostline": recipe}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the stage it belongs to starts when training begins (the Trainer loads checkpoints before that)
        self.pending = state_dict if state_dict.get("frostline") is not None else None


class StageSchedule(LRScheduler):
    """The scheduler the Trainer holds: steps the current stage's schedule (its state is saved with the optimizer)."""

    def __init__(self, optimizer: StageOptimizer):
        self.optimizer = optimizer

    @property
    def last_epoch(self) -> int:
        return self.optimizer.schedule.last_epoch if self.optimizer.schedule is not None else 0

    def step(self, epoch: int | None = None) -> None:
        if self.optimizer.schedule is not None:
            self.optimizer.schedule.step()

    def get_last_lr(self) -> list[float]:
        if self.optimizer.schedule is not None:
            return self.optimizer.schedule.get_last_lr()
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        return self.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class FrostlineCallback(TrainerCallback):
    """Runs a frostline recipe inside `transformers.Trainer` (see the module docstring for what to pass).

    Args:
        recipe: a `Recipe`, a list of `StageConfig`, or the path of a frostline YAML config (its `stages`, with
            `run.patience` and `run.min_delta`; the rest of the file is for `frostline fit`).
        example_batch: a batch the model accepts, to map it; default a few collated training examples.
        patience: with a list of stages, epochs without a better validation result before a stage ends.
        min_delta: with a list of stages, the smallest rise in validation accuracy that counts as better.
        optimizer: makes each stage's optimizer from its parameter groups; default `frostline.optim.adamw` (AdamW,
            fused where supported), as `frostline fit`.
    """

    def __init__(
        self,
        recipe: Recipe | Sequence[StageConfig] | str | Path,
        example_batch: Batch | None = None,
        patience: int = 2,
        min_delta: float = 0.0,
        optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] = adamw,
    ):
        if isinstance(recipe, Recipe):
            self.recipe = recipe
        elif isinstance(recipe, (str, Path)):
            self.recipe = Recipe.from_config(load_config(recipe))
        else:
            self.recipe = Recipe(list(recipe), patience=patience, min_delta=min_delta)
        self.example_batch = example_batch
        self.optimizer = StageOptimizer(self._recipe_state, optimizer)
        self.schedule = StageSchedule(self.optimizer)
        self.history: list[EpochRecord] = []
        """One record per epoch, as `frostline fit` writes them to metrics.jsonl."""
        self.diagnosis: Diagnosis | None = None
        """The monitor's verdict after the last epoch."""
        self.stop_reason: str | None = None
        """Why the run ended, for people (set when training ends)."""
        self.stage: Stage | None = None
        """The stage in progress, or the last one."""
        self.stage_plans: dict[str, dict[str, Any]] = {}
        """Each started stage's freeze plan (`FreezePlan.to_dict()`), by stage name."""
        self.best_state: dict[str, torch.Tensor] | None = None
        """A CPU copy of the best epoch's weights, restored into the model when training ends."""
        self.model_map: ModelMap | None = None
        self._model: nn.Module | None = None
        self._per_epoch = 0
        self._next: int | None = None
        self._open = False
        self._epoch_over = False
        self._epoch_start = 0.0
        self._train_seconds = 0.0
        self._trace: dict[str, list[float]] = {}
        self._examples: ValidationExamples | None = None
        self._log = logger

    @property
    def epochs(self) -> int:
        """Epochs the whole recipe may run: `TrainingArguments(num_train_epochs=callback.epochs)`."""
        return self.recipe.epochs

    def optimizers(self) -> tuple[StageOptimizer, StageSchedule]:
        """The optimizer and scheduler for `Trainer(optimizers=...)`: each stage's fresh AdamW and schedule."""
        return self.optimizer, self.schedule

    def compute_metrics(self, eval_pred: Any) -> dict[str, float]:
        """`compute_accuracy` that also hands the callback each validation example's loss and correctness, so the
        monitor compares epochs paired over the same examples: `Trainer(..., compute_metrics=callback.compute_metrics)`."""
        self._examples = _examples(eval_pred)
        return _metrics(self._examples)

    # ---- checks -------------------------------------------------------------------------------
    def _check_args(self, args: TrainingArguments, model: nn.Module | None = None) -> None:
        problems = []
        strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
        if strategy != "epoch":
            problems.append(
                f"eval_strategy must be 'epoch' for FrostlineCallback (the monitor judges every epoch), got "
                f"{strategy!r}; pass TrainingArguments(eval_strategy='epoch')"
            )
        elif args.eval_delay:
            problems.append(
                f"eval_delay must be 0 for FrostlineCallback (every epoch is judged), got {args.eval_delay}"
            )
        if args.max_steps <= 0 and math.ceil(args.num_train_epochs) < self.epochs:
            listing = ", ".join(f"{s.name} {s.epochs}" for s in self.recipe.stages)
            problems.append(
                f"num_train_epochs={args.num_train_epochs} does not cover the recipe's {self.epochs} epochs "
                f"({listing}); pass TrainingArguments(num_train_epochs=callback.epochs)"
            )
        if args.n_gpu > 1:
            problems.append(
                f"FrostlineCallback runs one device per process, got n_gpu={args.n_gpu} (DataParallel): start one "
                "process per GPU with torchrun --nproc-per-node N, or run on one (CUDA_VISIBLE_DEVICES=0)"
            )
        sharded = [name for name in ("fsdp", "deepspeed", "parallelism_config") if getattr(args, name, None)]
        if sharded:
            problems.append(
                f"{', '.join(sharded)}: the callback runs under DistributedDataParallel only; sharded training fixes "
                "the trainable tensors when it wraps the model, and stages change them"
            )
        if args.world_size > 1:
            # the Trainer builds its DDP without find_unused_parameters when either the arguments or the model turn
            # activation checkpointing on
            checkpointing = any(
                getattr(args, name, False) for name in ("activation_checkpointing", "gradient_checkpointing")
            ) or any(
                getattr(model, name, False) for name in ("is_activation_checkpointing", "is_gradient_checkpointing")
            )
            if args.ddp_find_unused_parameters is False or (args.ddp_find_unused_parameters is None and checkpointing):
                problems.append(
                    f"ddp_find_unused_parameters={args.ddp_find_unused_parameters}"
                    f"{' with activation checkpointing' if checkpointing else ''}: each stage leaves the tensors it "
                    "freezes without a gradient, and DDP (built once, before the first stage) must be allowed to "
                    "find them; pass TrainingArguments(ddp_find_unused_parameters=True)"
                )
            if args.ddp_static_graph:
                problems.append(
                    "ddp_static_graph=True: the set of tensors that train changes at every stage; leave it unset"
                )
        if problems:
            raise ConfigError(problems)

    def _check_optimizer(self, optimizer: Any) -> None:
        while optimizer is not self.optimizer and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        if optimizer is not self.optimizer:
            raise ConfigError(
                f"the Trainer trains with {type(optimizer).__name__}, not the callback's optimizer, so stages would "
                "not get their groups and rates; pass Trainer(..., optimizers=callback.optimizers())"
            )

    # ---- events -------------------------------------------------------------------------------
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._check_args(args, kwargs.get("model"))
        self._check_optimizer(kwargs.get("optimizer"))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._check_args(args, kwargs.get("model"))
        self._check_optimizer(kwargs.get("optimizer"))
        loader = kwargs["train_dataloader"]
        self._per_epoch = steps_per_epoch(len(loader), args.gradient_accumulation_steps)
        if state.max_steps < self.epochs * self._per_epoch:
            raise ConfigError(
                f"max_steps={state.max_steps:,d} does not cover the recipe's {self.epochs} epochs of "
                f"{self._per_epoch:,d} steps; leave max_steps unset and pass num_train_epochs=callback.epochs"
            )
        self._model = model = kwargs["model"]
        self._log = logger if state.is_world_process_zero else _replicas
        batch = self.example_batch if self.example_batch is not None else _example_batch(loader, args)
        device = next(model.parameters()).device
        self.model_map = inspect_model(model, batch_to(batch, device))
        plans = self.recipe.check(model, self.model_map)
        if args.world_size > 1:
            _check_registered(model, plans, self._log)
        pending, self.optimizer.pending = self.optimizer.pending, None
        if state.global_step > 0:
            self._resume(pending, state)
            return
        self.history, self.best_state, self.diagnosis, self.stop_reason = [], None, None, None
        self._start(0)

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._next is not None:
            self._start(self._next)
        self._epoch_start = time.perf_counter()
        self._trace = {}

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        # each group's rate at up to 20 evenly spaced steps of the epoch, as frostline fit traces it
        step = state.global_step - len(self.history) * self._per_epoch
        if step % max(1, self._per_epoch // 20) == 0:
            for name, rate in group_rates(self.optimizer).items():
                self._trace.setdefault(name, []).append(rate)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._train_seconds = time.perf_counter() - self._epoch_start
        self._epoch_over = True
        # the epoch's training loss is read from the log, so the log must close at the epoch's end
        control.should_log = True

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics: dict, **kwargs: Any
    ):
        # only the evaluation that closes an epoch is judged (not eval_on_start, nor trainer.evaluate() after)
        if not (self._epoch_over and self._open):
            return
        self._epoch_over = False
        stage = self.stage
        missing = [key for key in ("eval_loss", "eval_accuracy") if key not in metrics]
        if missing:
            raise ConfigError(
                f"the Trainer's evaluation gave no {' or '.join(missing)} (it gave {', '.join(sorted(metrics))}); "
                "pass Trainer(..., compute_metrics=compute_accuracy) from frostline.integrations.transformers, "
                "or a compute_metrics that returns 'accuracy', and one eval_dataset"
            )
        examples, self._examples = self._examples, None
        noise = {"val_count": int(metrics.get("eval_examples", 0)), "val_loss_sd": metrics.get("eval_loss_sd")}
        record = stage.record(
            self.history,
            self._train_loss(state),
            float(metrics["eval_loss"]),
            float(metrics["eval_accuracy"]),
            examples,
            **({} if examples is not None else noise),
            lr=group_rates(self.optimizer),
            lr_trace=self._trace,
            steps=state.global_step - len(self.history) * self._per_epoch,
            train_seconds=round(self._train_seconds, 3),
            eval_seconds=round(float(metrics.get("eval_runtime", 0.0)), 3),
        )
        self.history.append(record)
        decision = self.recipe.decide(self.history, stage)
        self.diagnosis = decision.diagnosis
        self._log.info(
            "epoch %d (%s): %s",
            record.epoch,
            stage.config.name,
            decision.diagnosis.message or decision.diagnosis.verdict,
        )
        if decision.note:
            self._log.info("%s", decision.note)
        if decision.best:
            self.best_state = model_tensors(self._model)
        if decision.end_stage:
            self._finish()
            self._next = None if decision.end_run else stage.index + 1
        if decision.end_run:
            self.stop_reason = decision.stop_reason or self.recipe.finished(self.history)
            control.should_training_stop = True
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._open:
            # stopped by something other than the recipe (another callback, max_steps)
            self._finish()
            if self.stop_reason is None:
                self.stop_reason = f"the Trainer stopped at step {state.global_step:,d}; " + self.recipe.finished(
                    self.history
                )
        if self.best_state is not None:
            self._model.load_state_dict(self.best_state)
            best = self.history[self.recipe.monitor.best_index(self.history)]
            self._log.info("restored the best weights: epoch %d (%s)", best.epoch, best.stage)

    # ---- stages -------------------------------------------------------------------------------
    def _start(self, index: int, resumed: dict[str, Any] | None = None) -> None:
        """Freeze for stage `index` and put its fresh AdamW and schedule behind the Trainer's optimizer."""
        stage = self.recipe.start(index, self._model, self.model_map, self.history)
        optimizer = self.optimizer.begin(stage, self._per_epoch)
        findings = stage.attach(optimizer)
        if resumed is not None:
            optimizer.load_state_dict({k: v for k, v in resumed.items() if k != "frostline"})
            self.optimizer.schedule.load_state_dict(resumed["frostline"]["schedule"])
        self.stage_plans[stage.config.name] = stage.plan.to_dict()
        self.stage, self._open, self._next = stage, True, None
        self._log.info("stage %d %r: %s", index + 1, stage.config.name, stage.plan.summary())
        for finding in findings:
            self._log.warning("%s", finding)

    def _finish(self) -> None:
        report = self.stage.finish()
        self._open = False
        self._log.info("stage %r: %s", self.stage.config.name, report.summary())

    def _train_loss(self, state: TrainerState) -> float:
        """The mean of the Trainer's logged loss over the epoch's steps (each log covers the steps since the last)."""
        start, end = len(self.history) * self._per_epoch, state.global_step
        total, steps, last = 0.0, 0, 0
        for entry in state.log_history:
            if "loss" not in entry:
                continue
            if start < entry["step"] <= end:
                covered = entry["step"] - max(last, start)
                total += entry["loss"] * covered
                steps += covered
            last = entry["step"]
        return total / steps if steps else math.nan

    # ---- checkpoints --------------------------------------------------------------------------
    def _recipe_state(self) -> dict[str, Any] | None:
        """The recipe's place, saved with the optimizer in the Trainer's checkpoints."""
        if self.stage is None:
            return None
        return {
            "stage": self.stage.index,
            "stage_open": self._open,
            "stop_reason": self.stop_reason if not self._open and self._next is None else None,
            "history": [r.to_dict() for r in self.history],
            "examples": examples_tensors(self.history),
            "best": self.best_state,
        }

    def _resume(self, pending: dict[str, Any] | None, state: TrainerState) -> None:
        if pending is None:
            raise ConfigError(
                f"resuming at step {state.global_step:,d}, but the checkpoint holds no frostline stage (no optimizer.pt: "
                "save_only_model?); resume from a checkpoint saved with its optimizer, or start the run over"
            )
        place = pending["frostline"]
        if place["stop_reason"]:
            raise ConfigError(f"this checkpoint's recipe had already ended ({place['stop_reason']}); nothing to resume")
        self.history = [EpochRecord.from_dict(r) for r in place["history"]]
        attach_examples(self.history, place.get("examples", {}))
        self.best_state = {k: v.cpu() for k, v in place["best"].items()} if place["best"] is not None else None
        self.diagnosis, self.stop_reason = None, None
        if place["stage_open"]:
            self._start(place["stage"], resumed=pending)
        else:
            self._next = place["stage"] + 1
        self._log.info("resumed at epoch %d, stage %d", len(self.history) + 1, self._next or place["stage"] + 1)


def _check_registered(model: nn.Module, plans: Sequence[FreezePlan], log: logging.Logger) -> None:
    """Several processes: every tensor a stage trains must require grad when training begins, when the Trainer's DDP
    registered the tensors it syncs; a tensor it left out would train out of sync in each process.

    Raises:
        ConfigError: naming the tensors a stage trains that DDP does not sync.
    """
    trains = set().union(*(plan.trainable for plan in plans))
    missing = [name for name, param in model.named_parameters() if name in trains and not param.requires_grad]
    if missing:
        raise ConfigError(
            f"{len(missing)} tensors a stage trains ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}) "
            "did not require grad when the Trainer wrapped the model in DistributedDataParallel, so their gradients "
            "would never be synced across the processes; leave every tensor the recipe trains trainable before "
            "trainer.train() (frostline freezes each stage itself)"
        )
    frozen_throughout = sum(1 for name, param in model.named_parameters() if param.requires_grad and name not in trains)
    if frozen_throughout:
        log.info(
            "%d tensors no stage trains are registered with DistributedDataParallel: they get no gradient, and DDP "
            "sums their zeros at every step; freezing them before trainer.train() keeps them out of it",
            frozen_throughout,
        )


def _example_batch(loader: Any, args: TrainingArguments) -> Batch:
    """A few training examples, collated as the Trainer collates them, without the labels."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise ConfigError(
            "the train dataset has no length to draw an example batch from; pass "
            "FrostlineCallback(..., example_batch=...) with a batch the model accepts"
        )
    size = min(len(dataset), args.per_device_train_batch_size, 8)
    batch = loader.collate_fn([dataset[i] for i in range(size)])
    labels = set(args.label_names or ("labels", "label", "label_ids"))
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in labels and isinstance(v, torch.Tensor)}
    return batch
