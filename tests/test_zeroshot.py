"""Zero-shot head construction (SPEC §1) and the classifier directory round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustify.config import ModelSpec
from robustify.models.clip import save_clip, tokenizer
from robustify.models.zeroshot import build_zeroshot_head, load_classifier, save_zeroshot_classifier

CLASSES = ["circle", "square", "star"]
TEMPLATES = ["a photo of a {}.", "a sketch of a {}.", "a {}."]


@pytest.fixture()
def head_and_clip(tiny_clip):
    torch.manual_seed(0)
    with torch.no_grad():
        tiny_clip.logit_scale.fill_(2.5)
        head = build_zeroshot_head(tiny_clip, tokenizer("tinyclip-rn32"), CLASSES, TEMPLATES)
    return head, tiny_clip


def test_columns_are_the_renormalised_template_average(head_and_clip):
    head, clip = head_and_clip
    tok = tokenizer("tinyclip-rn32")
    with torch.no_grad():
        for c, name in enumerate(CLASSES):
            emb = F.normalize(clip.encode_text(tok([t.format(name) for t in TEMPLATES])), dim=-1)
            expected = F.normalize(emb.mean(0), dim=0)
            torch.testing.assert_close(head.weight[:, c], expected, atol=1e-5, rtol=1e-5)
    assert head.weight.shape == (clip.text_projection.shape[1], len(CLASSES))
    torch.testing.assert_close(head.weight.norm(dim=0), torch.ones(len(CLASSES)))


def test_scale_is_applied_in_forward_not_folded_into_weights(head_and_clip):
    head, _ = head_and_clip
    assert head.scale.item() == pytest.approx(torch.tensor(2.5).exp().item())
    feats = torch.randn(4, head.weight.shape[0]) * 7
    cos = F.normalize(feats, dim=-1) @ head.weight
    torch.testing.assert_close(head(feats), head.scale * cos)
    assert "logit_scale" not in dict(head.named_parameters())  # a buffer: never trained


def test_context_matrix_has_one_unit_column_per_template(head_and_clip):
    head, clip = head_and_clip
    tok = tokenizer("tinyclip-rn32")
    assert head.ctx.shape == (head.weight.shape[0], len(TEMPLATES))
    torch.testing.assert_close(head.ctx.norm(dim=0), torch.ones(len(TEMPLATES)))
    with torch.no_grad():
        emb = F.normalize(clip.encode_text(tok([TEMPLATES[1].format(c) for c in CLASSES])), dim=-1)
    torch.testing.assert_close(head.ctx[:, 1], F.normalize(emb.mean(0), dim=0), atol=1e-5, rtol=1e-5)


def test_templates_need_a_placeholder(tiny_clip):
    with pytest.raises(ValueError, match="must contain"):
        build_zeroshot_head(tiny_clip, tokenizer("tinyclip-rn32"), CLASSES, ["a photo"])


def test_classifier_directory_round_trip(head_and_clip, tmp_path):
    head, clip = head_and_clip
    spec = ModelSpec("open_clip", "tinyclip-rn32", None)
    ckpt = save_clip(clip, spec, tmp_path / "clip")
    save_zeroshot_classifier(tmp_path / "clf", head, spec, str(ckpt), {"model_id": "zeroshot/t", "method": "zeroshot"})
    loaded, info = load_classifier(tmp_path / "clf")
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = head(clip.eval().encode_image(images))
        torch.testing.assert_close(loaded(images), expected, atol=1e-5, rtol=1e-5)
    assert info["model_id"] == "zeroshot/t" and info["checkpoint"] == str(ckpt)
