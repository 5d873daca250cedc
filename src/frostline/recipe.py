"""The stage engine: what each stage of a recipe trains and at which rates, and what follows each epoch.

A recipe is a list of stages (`StageConfig`). Every trainer that runs one (frostline's own `Trainer`, the
Lightning and Hugging Face callbacks, a loop you write) asks this module, so each decision is made in one place:

    recipe = Recipe(config.stages, patience=2)
    recipe.check(model, model_map)                      # every stage's spec names something in this model
    for index in range(len(recipe.stages)):
        stage = recipe.start(index, model, model_map, history)   # freeze, fresh groups with their rates
        optimizer = torch.optim.AdamW(stage.groups)
        schedule = stage.schedule(optimizer, steps_per_epoch)
        findings = stage.attach(optimizer)              # the setup lint; frozen tensors fingerprinted
        for epoch in range(stage.config.epochs):
            ...                                         # train and evaluate one epoch
            history.append(stage.record(history, train_loss, val_loss, val_accuracy))
            decision = recipe.decide(history, stage)    # verdict, best weights?, stage or run over?
            if decision.best: keep a copy of the weights
            if decision.end_stage: break
        stage.finish()                                  # raises if a frozen tensor moved
        if decision.end_run: break
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from frostline.config import FitConfig, StageConfig
from frostline.errors import ConfigError, FreezeSpecError
from frostline.freeze import FreezePlan, freeze, plan_freeze
from frostline.guard import Finding, FreezeGuard, GuardReport, check_setup
from frostline.inspect import ModelMap
from frostline.metrics import macro_f1
from frostline.optim import build_schedule, param_groups
from frostline.train.evidence import ValidationExamples
from frostline.train.monitor import Diagnosis, OverfitMonitor
from frostline.train.stage_gate import gate

MONITORED = {"accuracy": "val_accuracy", "macro_f1": "val_macro_f1"}
"""The metrics a recipe can choose its best epoch by (`run.monitor`), with the record field each reads."""


@dataclass
class EpochRecord:
    """One epoch's numbers: a line of metrics.jsonl, and what the monitor and the report read."""

    epoch: int
    """1-based, counted across stages."""
    stage: str
    stage_index: int
    stage_epoch: int
    """1-based within the stage."""
    freeze: str
    """The stage's freeze spec."""
    train_loss: float
    val_loss: float
    val_accuracy: float
    train_accuracy: float | None = None
    val_macro_f1: float | None = None
    """Macro-F1 on validation, where each example's predicted class and label were recorded."""
    lr: dict[str, float] = field(default_factory=dict)
    """Each group's rate at the epoch's end."""
    lr_trace: dict[str, list[float]] = field(default_factory=dict)
    """Each group's rate through the epoch."""
    trainable_tensors: int = 0
    trainable_params: int = 0
    steps: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    best: bool = False
    """These are the best weights so far."""
    verdict: str | None = None
    """The monitor's verdict after this epoch."""
    cache: str | None = None
    """What the epoch trained from the feature cache, if anything."""
    cache_seconds: float = 0.0
    val_count: int = 0
    """Validation examples the epoch was judged on (0: not recorded)."""
    val_loss_sd: float | None = None
    """Spread (standard deviation) of the validation examples' losses: the validation loss's noise."""
    examples: ValidationExamples | None = field(default=None, repr=False, compare=False)
    """Each validation example's loss and correctness (kept with checkpoints, not in metrics.jsonl)."""

    def to_dict(self) -> dict[str, Any]:
        """The record as a metrics.jsonl line (without the per-example results)."""
        values = dataclasses.asdict(dataclasses.replace(self, examples=None))
        del values["examples"]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EpochRecord:
        """A record from a metrics.jsonl line or a checkpoint (keys it does not know are left out)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class Decision:
    """What follows an epoch."""

    diagnosis: Diagnosis
    best: bool
    """This epoch's weights are the best so far: keep them."""
    end_stage: bool
    """The stage is over (its epochs are done, or the monitor ended it)."""
    end_run: bool
    """The whole run is over."""
    stop_reason: str | None = None
    """Why the run ended early, for people (None when it did not)."""
    note: str | None = None
    """What was decided about the next stage when this one ended (a `when: needed` stage: runs or skipped, why)."""


@dataclass
class Stage:
    """A stage in progress: its freeze plan and parameter groups, then its optimizer's lint and guard."""

    index: int
    config: StageConfig
    plan: FreezePlan
    groups: list[dict[str, Any]]
    """Parameter groups for any torch optimizer: trainable tensors only, each group with its rate."""
    since: int
    """Index in the history of the stage's first epoch."""
    model: nn.Module
    guard: FreezeGuard | None = None
    findings: list[Finding] = field(default_factory=list)

    def schedule(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
        """The stage's warm-up and decay over all its epochs, from `torch.optim.lr_scheduler`."""
        total = steps_per_epoch * self.config.epochs
        return build_schedule(optimizer, self.config.schedule, total, int(self.config.warmup * total))

    def attach(self, optimizer: torch.optim.Optimizer) -> list[Finding]:
        """Lint the set-up with the optimizer that will train the stage, and fingerprint every frozen tensor.

        Raises:
            SetupError: the set-up has an error (frozen tensors that weight decay or momentum would move, ...).
        """
        self.findings = check_setup(self.model, optimizer, self.plan)
        self.guard = FreezeGuard(self.model, self.plan)
        return self.findings

    def record(
        self,
        history: Sequence[EpochRecord],
        train_loss: float,
        val_loss: float,
        val_accuracy: float,
        examples: ValidationExamples | None = None,
        **more: Any,
    ) -> EpochRecord:
        """The record of the epoch that follows `history` in this stage (its counts and spec filled in); `examples`
        (each validation example's loss and correctness) lets the monitor measure every change against the
        validation set's noise; `more` sets any other field (train_accuracy, lr, train_seconds, val_count, ...)."""
        if examples is not None:
            more = {"val_count": len(examples), "val_loss_sd": round(examples.loss_sd, 6)} | more
            if examples.classes:
                more = {"val_macro_f1": macro_f1(examples.predicted, examples.labels)} | more
        return EpochRecord(
            epoch=len(history) + 1,
            stage=self.config.name,
            stage_index=self.index,
            stage_epoch=len(history) - self.since + 1,
            freeze=str(self.plan.spec),
            train_loss=train_loss,
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            trainable_tensors=self.plan.trainable_tensors,
            trainable_params=self.plan.trainable_params,
            examples=examples,
            **more,
        )

    def finish(self) -> GuardReport:
        """Prove that no frozen tensor or buffer moved during the stage.

        Raises:
            FrozenWeightsChanged: naming the tensors that moved.
        """
        if self.guard is None:
            self.guard = FreezeGuard(self.model, self.plan)
        return self.guard.verify()


class Recipe:
    """A list of stages and the monitor that judges their epochs: the one place stage decisions are made."""

    def __init__(
        self,
        stages: Sequence[StageConfig],
        patience: int = 2,
        min_delta: float = 0.0,
        augmented: bool = False,
        monitor: str = "accuracy",
    ):
        if not stages:
            raise ConfigError("a recipe needs at least one stage")
        if monitor not in MONITORED:
            raise ConfigError(f"the monitored metric must be {' or '.join(MONITORED)}, got {monitor!r}")
        self.stages = list(stages)
        self.monitor = OverfitMonitor(
            patience=patience, min_delta=min_delta, augmented=augmented, metric=MONITORED[monitor]
        )

    @classmethod
    def from_config(cls, config: FitConfig) -> Recipe:
        """The recipe of a fit config: its stages, with its patience and min_delta."""
        return cls(
            config.stages,
            patience=config.run.patience,
            min_delta=config.run.min_delta,
            augmented=config.data.augment != "none",
            monitor=config.run.monitor,
        )

    @property
    def epochs(self) -> int:
        """The most epochs the whole recipe runs (the monitor may end stages sooner)."""
        return sum(stage.epochs for stage in self.stages)

    def check(self, model: nn.Module, model_map: ModelMap) -> list[FreezePlan]:
        """Resolve every stage's freeze spec on the model, so a typo in stage 3 stops the run before stage 1.

        Returns:
            Each stage's plan, in order (what it would train; nothing is frozen here).

        Raises:
            ConfigError: listing each stage whose spec names nothing in this model.
        """
        problems, plans = [], []
        for index, stage in enumerate(self.stages):
            try:
                plans.append(plan_freeze(model, stage.freeze, model_map))
            except FreezeSpecError as err:
                problems.append(f"stages.{index}.freeze ({stage.name!r}) = {stage.freeze!r}: {err}")
        if problems:
            raise ConfigError(problems)
        return plans

    def start(self, index: int, model: nn.Module, model_map: ModelMap, history: Sequence[EpochRecord] = ()) -> Stage:
        """Freeze the model for stage `index` and build its fresh parameter groups (a stage never inherits the
        previous stage's optimizer); `history` is what ran before it (for a stage resumed mid-way, up to its
        start). This is where the model's trainable set changes."""
        config = self.stages[index]
        plan = freeze(model, config.freeze, model_map)
        groups = param_groups(
            model,
            plan,
            config.lr,
            head_lr_mult=config.head_lr_mult,
            layer_decay=config.layer_decay,
            weight_decay=config.weight_decay,
        )
        since = sum(1 for r in history if r.stage_index < index)
        return Stage(index, config, plan, groups, since, model)

    def decide(self, history: Sequence[EpochRecord], stage: Stage) -> Decision:
        """The verdict after the last epoch of `history`, which belongs to `stage`; that record's `verdict` and
        `best` are set from it.

        Overfitting ends the run, except in a head-only stage that has a later stage: a head on frozen features
        that starts to memorise has learned what those features allow (a linear probe); the next stage changes
        the features themselves, which is what fine-tuning after a probe is for. It gets `patience` epochs to beat
        the best epoch, as any later stage does, and the best weights are kept either way.

        A following stage with `when: needed` is judged when this stage ends (`train.stage_gate`): when it cannot
        pay, the run ends here with the best weights; either way `Decision.note` says what was decided and why.
        """
        history = list(history)
        if any(getattr(r, self.monitor.metric) is None for r in history):
            raise ValueError(
                f"the monitored metric is {self.monitor.metric.removeprefix('val_')}, and an epoch's record lacks it: "
                "record each validation example's predicted class and label "
                "(Stage.record(..., examples=examples_from_logits(logits, labels)))"
            )
        diagnosis = self.monitor.diagnose(history, stage.since)
        best = self.monitor.best_index(history) == len(history) - 1
        stage_epoch = len(history) - stage.since
        following = self.stages[stage.index + 1] if stage.index + 1 < len(self.stages) else None
        stop = None
        overfit = diagnosis.verdict == "overfitting" and diagnosis.should_stop
        end_stage = diagnosis.should_stop or stage_epoch >= stage.config.epochs
        verdict = None
        if end_stage and following is not None and following.when == "needed":
            verdict = gate(history[stage.since :], following)
        if verdict is not None and not verdict.run:
            diagnosis = dataclasses.replace(diagnosis, advice=[])
            stop = verdict.summary
        elif overfit and stage.plan.spec.mode == "head" and following:
            note = (
                f"the head has learned what the frozen features allow; stage {following.name!r} ({following.freeze}) "
                f"adapts them next and has {self.monitor.patience} epochs to beat epoch {diagnosis.best_epoch}, else "
                "the run stops there with the best weights"
            )
            diagnosis = dataclasses.replace(
                diagnosis, message=f"{diagnosis.message}\n{note[0].upper()}{note[1:]}.", advice=[]
            )
        elif overfit:
            level = f", {diagnosis.label}" if diagnosis.level else ""
            stop = (
                f"overfitting began at epoch {diagnosis.began_epoch} (stage {stage.config.name}{level}); "
                f"stopped at epoch {history[-1].epoch}"
            )
        end_stage = end_stage or stop is not None
        end_run = stop is not None or (end_stage and following is None)
        history[-1].verdict, history[-1].best = diagnosis.verdict, best
        note = f"{verdict.reason}." if verdict is not None and (stop is None or not verdict.run) else None
        return Decision(diagnosis, best, end_stage, end_run, stop, note)

    def finished(self, history: Sequence[EpochRecord]) -> str:
        """The stop reason of a run that went through every stage, with how each one ended."""
        return "every stage done (" + "; ".join(self.endings(history)) + ")"

    def endings(self, history: Sequence[EpochRecord]) -> list[str]:
        """How each stage that ran ended, for people: all its epochs, or the verdict that ended it early."""
        endings = []
        for index, stage in enumerate(self.stages):
            records = [r for r in history if r.stage_index == index]
            if not records:
                continue
            if records[-1].verdict in ("converged", "plateau", "overfitting") and len(records) < stage.epochs:
                endings.append(f"{stage.name}: {records[-1].verdict} after {len(records)} of {stage.epochs} epochs")
            else:
                endings.append(
                    f"{stage.name}: all {len(records)} epochs" if len(records) > 1 else f"{stage.name}: its 1 epoch"
                )
        return endings


def steps_per_epoch(batches: int, grad_accum: int = 1) -> int:
    """Optimizer steps in an epoch of `batches` batches with gradients accumulated over `grad_accum` batches."""
    return math.ceil(batches / grad_accum)
