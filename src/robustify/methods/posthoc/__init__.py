"""Post-hoc methods (DESIGN §3): map checkpoints (+ validation data) to a checkpoint.

The methods take different inputs — WiSE-FT two states and α, TPGM a template model and validation
batches, the greedy soup an accuracy function, the greedy ensemble logits — so `POSTHOC` only names
them; callers read each function's signature rather than a forced common interface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from robustify.methods.posthoc.soups import accuracy, greedy_ensemble, greedy_soup, uniform_soup
from robustify.methods.posthoc.tpgm import tpgm, tpgm_c
from robustify.methods.posthoc.wise import alphas, interpolate, output_ensemble

POSTHOC: dict[str, Callable[..., Any]] = {
    "wise": interpolate,
    "tpgm": tpgm,
    "tpgm-c": tpgm_c,
    "uniform-soup": uniform_soup,
    "greedy-soup": greedy_soup,
    "greedy-ensemble": greedy_ensemble,
}

__all__ = [
    "POSTHOC", "accuracy", "alphas", "greedy_ensemble", "greedy_soup", "interpolate", "output_ensemble",
    "tpgm", "tpgm_c", "uniform_soup",
]
