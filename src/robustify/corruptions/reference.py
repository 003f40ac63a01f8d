"""The `reference` engine: bethgelab's `imagecorruptions` (the maintained fork `imagecorruptions-imaug`)
called as is, made deterministic for every op.

The fork takes `seed=` only for `glass_blur` (numba's RNG) and `impulse_noise` (a NumPy `Generator`);
every other op draws from NumPy's global RandomState. So each call seeds the global state with `seed`
and restores the caller's state afterwards, under a lock so that two threads cannot interleave draws.
The fast engine reproduces exactly these streams, which is what makes the two comparable seed by seed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from robustify.corruptions.names import ALL_CORRUPTIONS

_SEED_KWARG = frozenset({"glass_blur", "impulse_noise"})
_GLOBAL_RNG_LOCK = threading.Lock()


def _make(name: str) -> Callable[[np.ndarray, int, int], np.ndarray]:
    def run(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
        from imagecorruptions import corrupt  # imports scikit-image, numba, OpenCV: only when used

        kwargs = {"seed": seed} if name in _SEED_KWARG else {}
        with _GLOBAL_RNG_LOCK:
            saved = np.random.get_state()
            try:
                np.random.seed(seed)
                out = corrupt(image, severity=severity, corruption_name=name, **kwargs)
            finally:
                np.random.set_state(saved)
        return np.ascontiguousarray(out, dtype=np.uint8)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = f"imagecorruptions' `{name}` with global and per-op RNGs seeded by `seed`."
    return run


CORRUPTION_FUNCTIONS: dict[str, Callable[[np.ndarray, int, int], np.ndarray]] = {
    name: _make(name) for name in ALL_CORRUPTIONS
}
