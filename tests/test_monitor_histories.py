"""The overfitting monitor on real training histories it was not written for (tests/data/histories/README.md holds
the ground-truth rule and the score; `python tests/monitor_histories.py` prints the table)."""

import pytest

import monitor_histories as histories

RUNS = histories.runs()
SCORES = {run["name"]: histories.score(run) for run in RUNS}


def test_the_suite_holds_at_least_twelve_real_histories_of_both_kinds():
    assert len(RUNS) >= 12
    overfitting = sum(histories.ground_truth(run).overfits for run in RUNS)
    assert overfitting >= 4 and len(RUNS) - overfitting >= 4


UNRESOLVED = {
    "digits-mlp-noise30": (
        "truth accuracy peaked at epoch 7 and drifted down 1.5 points by epoch 13 while its loss kept falling to epoch "
        "36; the 400 validation examples set their best accuracy at epoch 13 (a 1.5-point drift is about one paired "
        "standard error there), so the monitor stops at epoch 20 as converged, after the window the rule allows"
    ),
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=UNRESOLVED[name]))
        if name in UNRESOLVED
        else name
        for name in sorted(SCORES)
    ],
)
def test_healthy_runs_are_never_called_overfitting_and_overfitting_runs_are_caught_in_time(name):
    score = SCORES[name]
    assert score.outcome in ("ok", "caught", "stopped before onset"), (score.outcome, score.verdicts, score.message)


def test_the_kept_accuracy_is_within_one_standard_error_of_the_runs_best_on_nine_runs_in_ten():
    kept = [name for name, score in SCORES.items() if score.kept]
    assert len(kept) >= 0.9 * len(SCORES), sorted(set(SCORES) - set(kept))
