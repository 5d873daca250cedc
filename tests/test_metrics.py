"""Classification metrics agree with scikit-learn's, including classes that are never predicted or never occur."""

import pytest
import torch
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from frostline.metrics import classify

LABELS = ["ant", "bee", "cat", "dog"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_figures_and_macro_f1_match_scikit_learn(seed):
    generator = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, 3, (200,), generator=generator)  # "dog" never occurs
    predicted = torch.where(
        torch.rand(200, generator=generator) < 0.7, truth, torch.randint(0, 4, (200,), generator=generator)
    )
    predicted[predicted == 1] = 0  # "bee" is never predicted
    scores = classify(LABELS, truth, predicted)

    assert [list(row) for row in scores.confusion] == confusion_matrix(truth, predicted, labels=range(4)).tolist()
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=range(4), zero_division=0)
    for c, p, r, f, s in zip(scores.classes, precision, recall, f1, support, strict=True):
        assert (c.precision, c.recall, c.f1, c.support) == pytest.approx((p, r, f, s))
    assert scores.macro_f1 == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))
    assert scores.accuracy == pytest.approx(float((truth == predicted).float().mean()))
    assert scores.classes[1].precision == 0.0 and scores.classes[3].recall == 0.0


def test_confused_pairs_are_the_largest_off_diagonal_counts():
    truth = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    predicted = torch.tensor([1, 1, 1, 0, 1, 2, 0, 2, 2])
    pairs = classify(LABELS[:3], truth, predicted).confused_pairs()
    assert [(p.truth, p.predicted, p.count, p.of) for p in pairs] == [
        ("ant", "bee", 3, 4),
        ("bee", "cat", 1, 2),
        ("cat", "ant", 1, 3),
    ]


def test_the_record_holds_every_figure_people_read():
    record = classify(LABELS[:2], torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1])).to_dict()
    assert record["confusion"] == [[1, 0], [1, 1]] and record["examples"] == 3
    assert record["classes"][0] == {
        "name": "ant",
        "support": 1,
        "predicted": 2,
        "precision": 0.5,
        "recall": 1.0,
        "f1": pytest.approx(2 / 3),
    }
    assert record["confused_pairs"] == [{"true": "bee", "predicted": "ant", "count": 1, "of": 2}]


def test_mismatched_lengths_and_unknown_classes_are_refused():
    with pytest.raises(ValueError, match="3 true labels but 2 predictions"):
        classify(LABELS, torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="a prediction is outside the 2 classes"):
        classify(LABELS[:2], torch.tensor([0, 1]), torch.tensor([0, 2]))
