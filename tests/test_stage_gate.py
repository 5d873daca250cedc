"""`when: needed`: a later stage runs only when the stage before it leaves something a validation set could show fixed."""

import dataclasses

import pytest
import torch

import tiny_task
from frostline import Recipe, StageConfig, inspect_model
from frostline.config import default_stages
from frostline.errors import ConfigError
from frostline.train.evidence import ValidationExamples
from frostline.train.stage_gate import SMALLEST_SHOWN, gate

HEAD = StageConfig(name="head", freeze="head", epochs=2, lr=1e-2)
LAST = StageConfig(name="last1", freeze="last:1", epochs=2, lr=1e-3, when="needed")


def _records(train_accuracy, val_accuracy=0.96, count=400):
    correct = torch.zeros(count, dtype=torch.bool)
    correct[: round(val_accuracy * count)] = True
    examples = ValidationExamples(torch.full((count,), 0.1), correct)
    stage = Recipe([HEAD, LAST]).start(0, *_model())
    first = stage.record([], 0.5, 0.3, val_accuracy - 0.01, examples, train_accuracy=train_accuracy - 0.01)
    return [first, stage.record([first], 0.4, 0.2, val_accuracy, examples, train_accuracy=train_accuracy)]


def _model():
    torch.manual_seed(0)
    model, example = tiny_task.model(10)
    return model, inspect_model(model, example)


def test_a_stage_that_could_fix_fewer_examples_than_noise_hides_is_skipped_with_its_evidence():
    # training error 0.5% of 400 validation examples: about 2 examples, fewer than a paired comparison can show
    verdict = gate(_records(0.995), LAST)
    assert not verdict.run
    assert "fits 99.50% of its training examples" in verdict.reason
    assert "about 2.0 of the 400" in verdict.reason and f"net gain of {SMALLEST_SHOWN} examples" in verdict.reason
    assert "when: always" in verdict.reason and "not ruled out" in verdict.reason
    assert verdict.summary.startswith("stage last1 skipped")


def test_a_stage_runs_when_the_features_leave_training_error_the_validation_set_can_see():
    verdict = gate(_records(0.95), LAST)
    assert verdict.run and "about 20.0 of the 400" in verdict.reason
    # the same fit judged on a larger validation set: 0.5% of 2,000 examples is 10, enough to show
    assert gate(_records(0.995, count=2000), LAST).run


def test_without_a_training_accuracy_the_stage_runs_and_says_why():
    records = [dataclasses.replace(r, train_accuracy=None) for r in _records(0.999)]
    verdict = gate(records, LAST)
    assert verdict.run and "no training accuracy" in verdict.reason


def _decide(stages, train_accuracy):
    model, model_map = _model()
    recipe = Recipe(stages)
    stage = recipe.start(0, model, model_map)
    history = []
    for epoch, accuracy in enumerate((0.9, 0.95)):
        correct = torch.arange(400) < round(accuracy * 400)
        examples = ValidationExamples(torch.full((400,), 0.3 - 0.1 * epoch), correct)
        history.append(
            stage.record(
                history, 1.0 - epoch * 0.5, 0.3 - 0.1 * epoch, accuracy, examples, train_accuracy=train_accuracy
            )
        )
        decision = recipe.decide(history, stage)
    return decision


def test_the_recipe_ends_the_run_at_the_stage_boundary_when_the_next_stage_cannot_pay():
    decision = _decide([HEAD, LAST], train_accuracy=1.0)
    assert decision.end_stage and decision.end_run
    assert decision.stop_reason == (
        "stage last1 skipped: what the stage before it leaves unfitted (0.00% of its training examples) is about 0.0 "
        f"of the 400 validation examples, fewer than the {SMALLEST_SHOWN} a gain needs to be told from noise"
    )
    assert decision.note.startswith("stage 'last1' (last:1) skipped: the previous stage fits 100.00%")
    # the same numbers with a stage that always runs: the run goes on to it
    always = _decide([HEAD, dataclasses.replace(LAST, when="always")], train_accuracy=1.0)
    assert always.end_stage and not always.end_run and always.stop_reason is None
    # and a stage the features need runs, with the evidence in the diagnosis
    needed = _decide([HEAD, LAST], train_accuracy=0.9)
    assert not needed.end_run and needed.note.startswith("stage 'last1' (last:1) runs: the previous stage fits 90.00%")
    assert always.note is None


def test_the_default_recipe_judges_its_second_stage_and_bad_values_are_refused():
    assert [s.when for s in default_stages()] == ["always", "needed"]
    with pytest.raises(ConfigError, match="when must be always or needed, got 'sometimes'"):
        StageConfig(when="sometimes")


def test_a_fit_that_needs_no_second_stage_ends_before_it_with_the_best_weights(tmp_path):
    from frostline.config import DataConfig, FitConfig, ModelConfig, RunConfig
    from frostline.train.trainer import SilentReporter, Trainer

    stages = [
        # the whole net on digits: it fits its 1,200 training examples, so adapting blocks has nothing left to fix
        StageConfig(name="all", freeze="none", epochs=20, lr=3e-3),
        StageConfig(name="again", freeze="last:1", epochs=2, lr=1e-3, when="needed"),
    ]
    config = FitConfig(
        ModelConfig("py:tiny_task:wide_model"),
        DataConfig(ref="py:tiny_task:data", batch_size=32),
        stages,
        RunConfig(output=str(tmp_path / "run"), patience=30, precision="fp32"),
    )
    notes = []

    class Notes(SilentReporter):
        def note(self, message):
            notes.append(message)

    result = Trainer(config, Notes()).fit()
    assert result.history[-1].train_accuracy > 0.995
    # what was decided, with the evidence, is said when the stage before it ends
    assert [n for n in notes if n.startswith("stage 'again' (last:1) skipped: the previous stage fits")]
    assert [r.stage for r in result.history] == ["all"] * 20
    assert result.stop_reason.startswith("stage again skipped: what the stage before it leaves unfitted")
    assert "again" not in result.stage_plans and (tmp_path / "run" / "best.safetensors").is_file()
