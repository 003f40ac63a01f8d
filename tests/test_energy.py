"""Energy gap (SPEC §2, Lipsum-FT Eq. 6) and the random texts it is estimated with."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from robustify.config import ModelSpec
from robustify.eval.energy import energy_gap, energy_gap_for, random_text_embeddings, random_text_ids
from robustify.models.clip import create_clip, tokenizer
from robustify.models.random_texts import special_ids


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def clip():
    return create_clip(ModelSpec("open_clip", "tinyclip-rn32"), init_seed=0)


@pytest.fixture(scope="module")
def tok():
    return tokenizer("tinyclip-rn32")


def test_energy_gap_matches_a_hand_computation():
    # normalised: tuned = [[1,0],[0,1]], zero = [[0,1],[1,0]] → diff = ±[1,-1]
    tuned = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    zero = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # <diff, t> = ±(1, -1, -0.2) → squares (1, 1, 0.04) per image; mean 2.04/3 = 0.68; × s² = 4
    assert energy_gap(tuned, zero, texts, scale=2.0) == pytest.approx(2.72, rel=1e-6)
    assert energy_gap(tuned, zero, texts, scale=2.0, chunk=1) == pytest.approx(2.72, rel=1e-6)
    assert energy_gap(tuned, tuned, texts, scale=2.0) == 0.0
    with pytest.raises(ValueError):
        energy_gap(tuned, zero, torch.ones(3, 4), scale=2.0)


def test_random_texts_are_sot_ids_eot_zero_padded(tok):
    sot, eot = special_ids(tok)
    ids = random_text_ids(tok, n=300, length=8, seed=3)
    assert ids.shape == (300, tok.context_length) and ids.dtype == torch.long
    assert (ids[:, 0] == sot).all() and (ids[:, 9] == eot).all() and (ids[:, 10:] == 0).all()
    body = ids[:, 1:9]
    assert not ((body == sot) | (body == eot)).any() and (body < min(sot, eot)).all()
    assert body.unique().numel() > 1000  # spread over the full vocabulary
    assert torch.equal(ids, random_text_ids(tok, n=300, length=8, seed=3))
    assert not torch.equal(ids, random_text_ids(tok, n=300, length=8, seed=4))
    with pytest.raises(ValueError, match="context length"):
        random_text_ids(tok, n=2, length=tok.context_length - 1)


def test_seen_vocabulary_draws_from_the_corpus(tok):
    corpus = ["a red circle", "a blue square on grass"]
    allowed = set(tok(corpus).flatten().tolist()) - {0, *special_ids(tok)}
    ids = random_text_ids(tok, n=50, length=8, vocab="seen", corpus=corpus, seed=0)
    assert set(ids[:, 1:9].flatten().tolist()) <= allowed


def test_random_text_embeddings_are_unit_norm_and_reproducible(clip, tok):
    emb = random_text_embeddings(clip, tok, n=40, seed=1, batch_size=16)
    assert emb.shape == (40, 64)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(40))
    with torch.no_grad():
        ref = F.normalize(clip.encode_text(random_text_ids(tok, n=40, seed=1)), dim=-1)
    torch.testing.assert_close(emb, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(random_text_embeddings(clip, tok, n=40, seed=1, batch_size=1000), emb)


def test_energy_gap_for_encoders(clip, tok):
    texts = random_text_embeddings(clip, tok, n=50, seed=0)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 3, 32, 32, generator=gen), torch.zeros(5, dtype=torch.long)) for _ in range(3)]
    zero = copy.deepcopy(clip.visual)
    assert energy_gap_for(zero, copy.deepcopy(zero), batches, texts, 10.0, "cpu") == 0.0

    tuned = copy.deepcopy(zero).train()
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    gap = energy_gap_for(tuned, zero, batches, texts, 10.0, "cpu", chunk=2)
    assert gap > 0 and tuned.training and not zero.training  # modes restored
    with torch.no_grad():
        tuned.eval()
        feats_t = torch.cat([tuned(x) for x, _ in batches])
        feats_0 = torch.cat([zero(x) for x, _ in batches])
    assert gap == pytest.approx(energy_gap(feats_t, feats_0, texts, 10.0), rel=1e-5)
    assert energy_gap_for(tuned, zero, batches, texts, 20.0, "cpu") == pytest.approx(4 * gap, rel=1e-6)
