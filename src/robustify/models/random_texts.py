"""Random token texts for Lipsum-FT's regulariser and the energy gap (SPEC §2).

A random text is `[SOT] + L token ids + [EOT]`, zero-padded to the text tower's context length —
exactly what lipsum-ft's `scripts/Lipsum-FT.py` feeds the text model (ids uniform over the vocabulary
without SOT/EOT). open_clip pools the text at `argmax(ids)`, the EOT position, because EOT is the
largest id; the pool therefore never holds SOT or EOT.

Two token pools (`vocab`): `full` (every id below SOT, as the reference) and `seen` (the ids that
occur in a caption corpus). In a tiny world almost none of the 49k token embeddings were trained, so
`full` texts are mostly noise to the text tower; `seen` keeps the regulariser on trained embeddings
(`shared/notes/miniworld-facts.md`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

VOCABS = ("full", "seen")


def special_ids(tokenize: Callable[..., torch.Tensor]) -> tuple[int, int]:
    """(SOT, EOT) ids of an open_clip tokenizer (read from the tokenizer, not hard-coded)."""
    if hasattr(tokenize, "sot_token_id") and hasattr(tokenize, "eot_token_id"):
        return int(tokenize.sot_token_id), int(tokenize.eot_token_id)
    ids = tokenize([""])[0]  # other tokenizers: the empty text is SOT, EOT, padding
    return int(ids[0]), int(ids[1])


def token_pool(tokenize: Callable[..., torch.Tensor], vocab: str, corpus: Iterable[str] | None = None) -> torch.Tensor:
    """The ids random texts draw from: `full` = [0, SOT) as lipsum-ft; `seen` = the ids of `corpus`."""
    sot, eot = special_ids(tokenize)
    if vocab == "full":
        return torch.arange(0, min(sot, eot), dtype=torch.long)
    if vocab != "seen":
        raise ValueError(f"vocab must be one of {VOCABS}, got '{vocab}'")
    texts = list(corpus or [])
    if not texts:
        raise ValueError("vocab 'seen' needs a caption corpus (e.g. the pre-training captions)")
    ids = torch.cat([tokenize(texts[i:i + 4096]).flatten() for i in range(0, len(texts), 4096)]).unique()
    ids = ids[(ids != sot) & (ids != eot) & (ids != 0)]  # 0 is the padding id
    if ids.numel() == 0:
        raise ValueError("vocab 'seen': the corpus holds no ordinary tokens")
    return ids.sort().values


def sample_texts(pool: torch.Tensor, m: int, length: int, context_length: int, sot: int, eot: int,
                 generator: torch.Generator) -> torch.Tensor:
    """M×context_length ids: `[SOT] + L ids drawn uniformly from pool + [EOT]`, zero-padded."""
    if length + 2 > context_length:
        raise ValueError(f"random texts of {length} tokens do not fit the context length {context_length}")
    texts = torch.zeros(m, context_length, dtype=torch.long)
    texts[:, 0] = sot
    texts[:, 1:1 + length] = pool[torch.randint(0, pool.numel(), (m, length), generator=generator)]
    texts[:, 1 + length] = eot
    return texts
