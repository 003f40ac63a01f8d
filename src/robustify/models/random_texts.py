"""Random token texts for Lipsum-FT's regulariser and the energy gap (SPEC §2).

A random text is `[SOT] + L token ids + [EOT]`, zero-padded to the text tower's context length —
exactly what lipsum-ft's `scripts/Lipsum-FT.py` feeds the text model (ids uniform over the vocabulary
without SOT/EOT). open_clip pools the text at `argmax(ids)`, the EOT position, because EOT is the
largest id; the pool therefore never holds SOT or EOT.

Two token pools (`vocab`): `full` (every id below SOT, as the reference) and `seen` (the ids that
occur in a caption corpus). In a tiny world almost none of the 49k token embeddings were trained, so
`full` texts are mostly noise to the text tower; `seen` keeps the regulariser on trained embeddings
(`shared/notes/miniworld-facts.md`).

`encode_random_texts(clip, ids)` is `clip.encode_text(ids)` computed over the positions up to each
text's EOT only (10 of 77 for L=8): Lipsum-FT encodes 80 texts every step, the energy gap 10,000.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

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
    texts = sorted(set(corpus or []))  # the pool is a set of ids: tokenise each distinct caption once
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


_TOWERS: weakref.WeakKeyDictionary[nn.Module, tuple[bool, str, int | None] | None] = weakref.WeakKeyDictionary()


def _causal_text_tower(clip: nn.Module) -> tuple[nn.Module, str, int | None] | None:
    """(module holding the text tower's parts, pool type, EOS id) when `clip` encodes text exactly as
    open_clip's `CLIP.encode_text` / `TextTransformer.forward` with a causal mask; None otherwise.
    Checked once per model (the mask check is a few tensor ops, paid every step otherwise)."""
    if clip not in _TOWERS:
        _TOWERS[clip] = _check_text_tower(clip)
    found = _TOWERS[clip]
    if found is None:
        return None
    custom, pool, eos = found
    return (clip.text if custom else clip), pool, eos


def _check_text_tower(clip: nn.Module) -> tuple[bool, str, int | None] | None:
    try:
        from open_clip.model import CLIP, CustomTextCLIP
        from open_clip.transformer import TextTransformer
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return None
    if isinstance(clip, CLIP) and type(clip).encode_text is CLIP.encode_text:
        tower, found = clip, (False, clip.text_pool_type, getattr(clip, "text_eos_id", None))
    elif (isinstance(clip, CustomTextCLIP) and type(clip).encode_text is CustomTextCLIP.encode_text
          and type(clip.text) is TextTransformer and clip.text.cls_emb is None and not clip.text.use_pad_mask):
        tower, found = clip.text, (True, clip.text.pool_type, clip.text.eos_id)
    else:
        return None
    mask = tower.attn_mask
    if found[1] not in ("argmax", "eos") or mask is None or mask.ndim != 2:
        return None
    causal = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu_(1)
    if not (torch.equal(torch.isneginf(mask), causal) and bool((mask[~causal] == 0).all())):
        return None
    return found


def _plain_block(block: nn.Module) -> bool:
    """open_clip's `ResidualAttentionBlock` around a standard batch-first `nn.MultiheadAttention`
    (packed in-projection, no extra key/value biases, no active dropout): what `_block` computes."""
    from open_clip.transformer import ResidualAttentionBlock

    attn = getattr(block, "attn", None)
    return (type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
            and type(attn) is nn.MultiheadAttention and attn.batch_first and attn._qkv_same_embed_dim
            and attn.bias_k is None and attn.bias_v is None and not attn.add_zero_attn
            and (attn.dropout == 0 or not attn.training))


def _block(block: nn.Module, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """`block(x, attn_mask=causal)` for a `_plain_block`, with the attention called directly
    (`scaled_dot_product_attention`, as nn.MultiheadAttention does inside, without its ~100 µs of
    argument checks per call). `pos` given: the output at row `pos[b]` of each sequence only (B×1×W):
    its query, attention output and MLP are one row each, its keys and values every row's."""
    attn = block.attn
    width, heads = attn.embed_dim, attn.num_heads
    h = block.ln_1(x)
    if pos is None:
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        residual, mask, causal = x, None, True
    else:
        rows = torch.arange(x.shape[0], device=x.device)
        w_q, w_kv = attn.in_proj_weight.split([width, 2 * width])
        b_q, b_kv = attn.in_proj_bias.split([width, 2 * width]) if attn.in_proj_bias is not None else (None, None)
        q = F.linear(h[rows, pos].unsqueeze(1), w_q, b_q)  # LayerNorm is per row: ln_1 of the row
        k, v = F.linear(h, w_kv, b_kv).chunk(2, dim=-1)
        residual, causal = x[rows, pos].unsqueeze(1), False
        keys = torch.arange(x.shape[1], device=x.device)
        mask = (keys.view(1, -1) <= pos.view(-1, 1)).view(-1, 1, 1, x.shape[1])  # B×1×1×k: keys up to the row
    split = [t.unflatten(-1, (heads, width // heads)).transpose(1, 2) for t in (q, k, v)]  # B×H×L×d
    out = F.scaled_dot_product_attention(*split, attn_mask=mask, is_causal=causal).transpose(1, 2).flatten(2)
    y = residual + block.ls_1(F.linear(out, attn.out_proj.weight, attn.out_proj.bias))
    return y + block.ls_2(block.mlp(block.ln_2(y)))


def encode_random_texts(clip: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """`clip.encode_text(ids)` (unnormalised), computing only what the pooled output depends on.

    open_clip's text tower is causal and pools at `argmax(ids)` (the EOT of `[SOT] + L ids + [EOT]`),
    so (1) the tokens after the pooled one cannot change the output: a random text of L=8 tokens is
    encoded over a context of 10, not 77, with the tower's own `positional_embedding[:k]` and a
    causal mask over the k positions; and (2) the last block's output is needed at the pooled row
    only. The result equals the full-context encoding up to float rounding (~1e-6). Models whose
    text tower is not understood (HF text towers, CoCa, padding masks, overridden `encode_text`)
    fall back to `clip.encode_text`; other block types run whole over the k positions.
    """
    parts = _causal_text_tower(clip)
    if parts is None or ids.ndim != 2 or ids.shape[0] == 0:
        return clip.encode_text(ids)
    tower, pool, eos = parts
    pos = ids.argmax(dim=-1) if pool == "argmax" else (ids == eos).int().argmax(dim=-1)
    k = min(int(pos.max()) + 1, ids.shape[1])
    transformer = tower.transformer
    cast_dtype = transformer.get_cast_dtype()
    x = tower.token_embedding(ids[:, :k]).to(cast_dtype)
    x = x + tower.positional_embedding[:k].to(cast_dtype)
    blocks = list(transformer.resblocks)
    if transformer.batch_first and all(_plain_block(b) for b in blocks):
        for block in blocks[:-1]:
            x = _block(block, x, None)
        pooled = _block(blocks[-1], x, pos)[:, 0]
    else:  # open_clip's own blocks over the k positions (the transformer handles sequence-first)
        x = transformer(x, attn_mask=tower.attn_mask[:k, :k])
        pooled = x[torch.arange(x.shape[0], device=x.device), pos]  # = open_clip's text_global_pool
    pooled = tower.ln_final(pooled)  # per-token LayerNorm: on the pooled rows only
    projection = tower.text_projection
    if projection is None:
        return pooled
    return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
