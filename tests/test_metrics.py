"""Accuracy / ECE / NLL against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from robustify.eval.metrics import accuracy, classification_metrics, ece, nll


def _logits_from_probs(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


# Four samples, three classes. Max-probabilities 0.7, 0.55, 0.9, 0.4 — none on a bin edge.
PROBS = [[0.7, 0.2, 0.1], [0.55, 0.25, 0.2], [0.05, 0.05, 0.9], [0.3, 0.4, 0.3]]
LABELS = torch.tensor([0, 1, 2, 1])


def test_accuracy_by_hand():
    # predictions 0, 0, 2, 1 → correct, wrong, correct, correct
    assert accuracy(_logits_from_probs(PROBS), LABELS) == pytest.approx(0.75)


def test_nll_by_hand():
    expected = -(math.log(0.7) + math.log(0.25) + math.log(0.9) + math.log(0.4)) / 4
    assert nll(_logits_from_probs(PROBS), LABELS) == pytest.approx(expected, rel=1e-9)


def test_ece_by_hand_15_bins():
    # Each sample falls in its own bin (0.7 → bin 10, 0.55 → 8, 0.9 → 13, 0.4 → 6), so
    # ECE = mean |correct − confidence| = (0.3 + 0.55 + 0.1 + 0.6) / 4 = 0.3875.
    assert ece(_logits_from_probs(PROBS), LABELS, n_bins=15) == pytest.approx(0.3875, abs=1e-6)


def test_ece_pools_samples_sharing_a_bin():
    # With 2 bins, [0.5, 1) holds 0.7, 0.55, 0.9: accuracy 2/3, mean confidence 0.71667 → gap 0.05;
    # [0, 0.5) holds 0.4 (correct) → gap 0.6. ECE = 3/4 · 0.05 + 1/4 · 0.6 = 0.1875.
    assert ece(_logits_from_probs(PROBS), LABELS, n_bins=2) == pytest.approx(0.1875, abs=1e-6)


def test_metrics_are_dataset_level_not_batch_averaged():
    torch.manual_seed(0)
    logits = torch.randn(300, 5) * 3
    labels = torch.randint(0, 5, (300,))
    whole = ece(logits, labels)
    halves = (ece(logits[:150], labels[:150]) + ece(logits[150:], labels[150:])) / 2
    assert whole != pytest.approx(halves, abs=1e-4)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="do not match"):
        classification_metrics(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_and_top_k_equal_torchmetrics_exactly(seed):
    """Our ECE / top-k avoid importing torchmetrics in every job; they must give its numbers bit for bit,
    including confidences of exactly 1 (their own bin in torchmetrics) and the bin edges."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

    from robustify.eval.metrics import top_k_accuracy

    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(997, 12, generator=gen, dtype=torch.float64) * (1 + 4 * seed)
    logits[:40, 3] = 200.0  # softmax confidence exactly 1.0
    logits[40:60] = 0.0  # confidence exactly 1/12, on no edge; ties for top-k
    labels = torch.randint(0, 12, (997,), generator=gen)
    for bins in (15, 10, 2):
        ours = ece(logits, labels, bins)
        ref = multiclass_calibration_error(logits.double().softmax(1), labels, num_classes=12, n_bins=bins,
                                           norm="l1").item()
        assert ours == ref
    for k in (1, 5):
        ref = multiclass_accuracy(logits[60:], labels[60:], num_classes=12, top_k=k, average="micro").item()
        assert top_k_accuracy(logits[60:], labels[60:], k) == pytest.approx(ref, abs=1e-7)
