"""Evaluation of a three-head student with MC head selection on datasets on disk (SPEC §3, paper §4.3.2):
the rows agree with a recomputation from the same MC outputs, corrupted sets are scored per
(corruption, severity) cell, label-space projection happens before selection, reruns are identical;
and the cost metrics (trainable parameters, ms per image, inference GFLOPs) against hand counts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from robustify.config import EvalSetSpec, EvaluateConfig, ModelSpec
from robustify.data.folder import ImageFolder
from robustify.data.registry import get_dataset
from robustify.eval.cost import count_trainable, gflops, ms_per_image, student_predict_fn
from robustify.eval.head_selection import HeadSelectionTally
from robustify.eval.loader import make_eval_loader
from robustify.eval.metrics import classification_metrics
from robustify.eval.student import evaluate_student
from robustify.io import derive_seed, write_json, write_parquet
from robustify.methods.distill.selection import HEADS, eval_mode, mc_head_outputs, select_heads
from robustify.methods.distill.student import ThreeHeadStudent
from robustify.models.clip import create_clip, preprocess
from robustify.models.zeroshot import ImageClassifier, ZeroShotHead

pytestmark = pytest.mark.usefixtures("single_thread")

C = 4
N = 12
CFG = EvaluateConfig(batch_size=5, ece_bins=5)  # 12 images → batches of 5, 5, 2
CONTEXT = {"model_id": "distill/tiny/t/three-head/s0", "method": "three-head", "seed": 0}
# two (corruption, severity) cells, interleaved so that both cross batch boundaries
CELLS = [("gaussian_noise", 1), ("defocus_blur", 3), ("defocus_blur", 3), ("gaussian_noise", 1), ("defocus_blur", 3),
         ("gaussian_noise", 1), ("gaussian_noise", 1), ("gaussian_noise", 1), ("defocus_blur", 3),
         ("gaussian_noise", 1), ("defocus_blur", 3), ("gaussian_noise", 1)]


def student_and_tower() -> tuple[ThreeHeadStudent, nn.Module]:
    """The mini-world student (tinyclip-rn32 tower, zero-shot head, 2 of 4 blocks tuned) with heads that
    differ from each other, as after training; without that every rule would tie on the clean head."""
    tower = create_clip(ModelSpec("open_clip", "tinyclip-rn32"), init_seed=0).visual
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in tower.modules():
            if isinstance(m, nn.BatchNorm2d):  # ModifiedResNet zero-inits bn3: blocks would be identities
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    head = ZeroShotHead(F.normalize(torch.randn(64, C, generator=g), dim=0), math.log(30.0))
    student = ThreeHeadStudent.from_model(ImageClassifier(tower.eval(), head), 0.5, dropout=0.25)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return student.eval(), tower


@pytest.fixture(scope="module")
def model() -> tuple[ThreeHeadStudent, nn.Module]:
    return student_and_tower()


def write_dataset(root: Path, labels: list[int], cells: list[tuple[str, int]] | None = None) -> Path:
    """A prepared dataset: PNGs (36×40, so the eval transform resizes and crops), manifest, class names."""
    rng = np.random.default_rng(0)
    rows = []
    for i, label in enumerate(labels):
        path = root / "img" / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8), "RGB").save(path)
        row = {"path": f"img/{i:02d}.png", "label": label, "split": "test"}
        if cells is not None:
            row["corruption"], row["severity"] = cells[i]
        rows.append(row)
    write_parquet(root / "manifest.parquet", pd.DataFrame(rows))
    write_json(root / "dataset.json", {"name": root.name, "classes": ["circle", "square", "star", "heart"]})
    return root


LABELS = [0, 1, 2, 3, 1, 0, 3, 2, 2, 1, 0, 3]


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("tiny"), LABELS)


@pytest.fixture(scope="module")
def corrupted_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("tiny-c"), LABELS, CELLS)


def mc_outputs(student, tower, dataset, eval_name: str, seed: int = 0, n_passes: int = 10) -> tuple[dict, torch.Tensor]:
    """The MC probabilities evaluate_student scores, recomputed: the same batches, the generator seeded by
    derive_seed(seed, "head-selection", eval set), one draw per batch."""
    frame = dataset.select("test")
    loader = make_eval_loader(frame, preprocess(tower), CFG.batch_size, 0, "cpu", load_image=dataset.load_image)
    gen = torch.Generator().manual_seed(derive_seed(seed, "head-selection", eval_name))
    probs, labels = {h: [] for h in HEADS}, []
    with torch.no_grad(), eval_mode(student):
        for x, y in loader:
            out = mc_head_outputs(student, student.features(x), n_passes, gen=gen)
            for h in HEADS:
                probs[h].append(out[h])
            labels.append(y)
    return {h: torch.cat(v, dim=1) for h, v in probs.items()}, torch.cat(labels)


def expected_metrics(probs: dict, labels: torch.Tensor, shift_type: str) -> dict[str, float]:
    chosen = select_heads(probs, "ours").probs.float()
    tally = HeadSelectionTally()
    tally.update(labels, probs)
    return {**classification_metrics(chosen.clamp_min(1e-30).log(), labels, CFG.ece_bins), **tally.metrics(shift_type)}


def values(rows: pd.DataFrame) -> dict[str, float]:
    return dict(zip(rows["metric"], rows["value"]))


def test_student_rows_are_the_head_selection_of_its_mc_outputs(model, clean_set):
    student, tower = model
    dataset = get_dataset("imagefolder", clean_set)
    spec = EvalSetSpec("imagefolder", "test", "reference")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        rows = evaluate_student(student, tower, dataset, "tiny", spec, CFG, CONTEXT)
    assert set(rows["n"]) == {N} and rows["corruption"].isna().all() and set(rows["eval_dataset"]) == {"tiny"}
    assert set(rows["shift_type"]) == {"reference"} and set(rows["model_id"]) == {CONTEXT["model_id"]}
    got = values(rows)
    assert got["accuracy"] == got["accuracy_select_ours"]  # the model's prediction is Eq. 6's head
    probs, labels = mc_outputs(student, tower, dataset, "tiny")
    assert labels.tolist() == LABELS
    expected = expected_metrics(probs, labels, "reference")
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    # the fixture's heads really disagree: the rules and heads do not all score the same
    assert len({got[f"accuracy_head_{h}"] for h in HEADS} | {got["accuracy_select_no_kl"]}) > 1
    choice = select_heads(probs, "ours").choice
    assert got["f_correct_ours"] == pytest.approx(float((choice == 0).float().mean()))  # reference set: clean head
    with torch.random.fork_rng(devices=[]):  # the MC masks come from the eval set's own generator, not the global RNG
        torch.manual_seed(456)
        again = evaluate_student(student, tower, dataset, "tiny", spec, CFG, CONTEXT)
    pd.testing.assert_frame_equal(rows.drop(columns="created_at"), again.drop(columns="created_at"))
    shifted = values(evaluate_student(student, tower, dataset, "tiny", EvalSetSpec("imagefolder", "test", "natural"),
                                      CFG, CONTEXT))
    assert shifted["f_correct_ours"] == pytest.approx(1 - got["f_correct_ours"])  # shifted: the unclean head
    assert shifted["accuracy"] == got["accuracy"]


def test_another_eval_set_name_or_seed_draws_other_masks(model, clean_set):
    student, tower = model
    dataset = get_dataset("imagefolder", clean_set)
    base, _ = mc_outputs(student, tower, dataset, "tiny")
    for name, seed in (("tiny-2", 0), ("tiny", 1)):
        other, _ = mc_outputs(student, tower, dataset, name, seed)
        assert not torch.equal(other["clean"], base["clean"])
        expected = expected_metrics(other, torch.tensor(LABELS), "reference")
        got = values(evaluate_student(student, tower, dataset, name, EvalSetSpec("imagefolder", "test", "reference"),
                                      CFG, CONTEXT, seed=seed))
        for k in ("ece", "nll", "accuracy_select_ours"):
            assert got[k] == pytest.approx(expected[k], rel=1e-6), (name, seed, k)


def test_corrupted_set_is_scored_per_cell(model, corrupted_set):
    student, tower = model
    dataset = get_dataset("imagefolder", corrupted_set)
    spec = EvalSetSpec("imagefolder", "test", "corruption")
    rows = evaluate_student(student, tower, dataset, "tiny-c", spec, CFG, CONTEXT)
    cells = rows.groupby(["corruption", "severity"])["n"].first()
    assert cells.to_dict() == {("defocus_blur", 3): 5, ("gaussian_noise", 1): 7} and cells.sum() == N
    assert rows["corruption"].notna().all()
    probs, labels = mc_outputs(student, tower, dataset, "tiny-c")
    for cell in (("gaussian_noise", 1), ("defocus_blur", 3)):
        idx = torch.tensor([i for i, c in enumerate(CELLS) if c == cell])
        expected = expected_metrics({h: p[:, idx] for h, p in probs.items()}, labels[idx], "corruption")
        got = values(rows[(rows["corruption"] == cell[0]) & (rows["severity"] == cell[1])])
        assert set(got) == set(expected)
        for k, v in expected.items():
            assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (cell, k)
    again = evaluate_student(student, tower, dataset, "tiny-c", spec, CFG, CONTEXT)
    pd.testing.assert_frame_equal(rows.drop(columns="created_at"), again.drop(columns="created_at"))


class PairedClasses(ImageFolder):
    """A dataset scored in a coarser label space: dataset class j = max over model classes 2j, 2j+1
    (ObjectNet's max over mapped classes). Not registered: only this test uses it."""

    def project_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.view(logits.shape[0], -1, 2).amax(dim=-1)


def test_projected_sets_select_heads_in_the_datasets_label_space(model, tmp_path):
    student, tower = model
    labels = [lab // 2 for lab in LABELS]
    dataset = PairedClasses(write_dataset(tmp_path / "paired", labels))
    spec = EvalSetSpec("imagefolder", "test", "natural")
    rows = evaluate_student(student, tower, dataset, "paired", spec, CFG, CONTEXT)
    probs, _ = mc_outputs(student, tower, dataset, "paired")
    # each pass's log-probabilities projected to the 2 classes, then re-normalised
    projected = {h: p.clamp_min(1e-30).log().view(10, N, 2, 2).amax(-1).softmax(-1) for h, p in probs.items()}
    expected = expected_metrics(projected, torch.tensor(labels), "natural")
    got = values(rows)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert "top5" not in got  # two classes


# ----------------------------------------------------------------------------------- cost
def test_linear_gflops_per_image_is_the_hand_count():
    layer = nn.Linear(10, 5)
    for batch in (1, 4, 7):  # 2 FLOPs per multiply-add, 10·5 of them per image, whatever the batch
        assert gflops(layer, torch.zeros(batch, 10)) == 2 * 10 * 5 / 1e9
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert gflops(conv, torch.zeros(2, 3, 6, 6)) == pytest.approx(2 * 8 * 6 * 6 * 3 * 9 / 1e9, rel=1e-12)


class TinyStudent(nn.Module):
    """The head-selection interface with hand-countable FLOPs: prefix 10→8, shared 8→8, three heads 8→4."""

    def __init__(self) -> None:
        super().__init__()
        self.prefix, self.shared = nn.Linear(10, 8), nn.Linear(8, 8)
        self.heads = nn.ModuleDict({h: nn.Linear(8, 4) for h in HEADS})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.prefix(x)

    def forward_from_features(self, features: torch.Tensor, heads) -> dict[str, torch.Tensor]:
        z = self.shared(features)
        return {h: self.heads[h](z) for h in heads}


def test_student_predict_fn_counts_the_prefix_once_and_every_pass():
    tiny = TinyStudent()
    for n in (1, 2, 10):  # prefix 2·10·8 = 160, each pass 2·8·8 + 3·2·8·4 = 320 FLOPs per image
        total = gflops(student_predict_fn(tiny, n), torch.zeros(3, 10))
        assert total == pytest.approx((160 + 320 * n) / 1e9, rel=1e-12)


def test_real_student_gflops_grow_linearly_in_the_passes(model):
    student, _ = model
    x = torch.zeros(2, 3, 32, 32)
    prefix = gflops(student.features, x)
    one_pass = gflops(lambda z: student.forward_from_features(z, HEADS), student.features(x))
    assert prefix > 0 and one_pass > 0
    totals = [gflops(student_predict_fn(student, n), x) for n in (1, 2, 5)]
    for n, total in zip((1, 2, 5), totals):
        assert total == pytest.approx(prefix + n * one_pass, rel=1e-9)
    assert totals[1] - totals[0] == pytest.approx(one_pass, rel=1e-9)


def test_trainable_count_and_ms_per_image():
    net = nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 2))
    net[1].requires_grad_(False)
    assert count_trainable(net) == 10 * 5 + 5
    student, _ = student_and_tower()
    assert count_trainable(student) == student.count_trainable() > 0
    assert ms_per_image([0.1, 0.3, 0.2, 5.0], 10) == pytest.approx(25.0)  # median 0.25 s / 10 images
    assert ms_per_image([0.4, 0.2, 9.0], 8) == pytest.approx(50.0)  # median 0.4 s / 8 images
    assert math.isnan(ms_per_image([], 8))
