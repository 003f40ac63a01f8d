"""Public API of the ImageNet-C corruptions: `corrupt(image, name, severity, seed, engine)`.

Two engines, each a registry `name -> fn(image, severity, seed)` in its own module, imported on first
use (they pull in numba, OpenCV, scikit-image):

* `fast` (default, `fast.py`): our vectorised implementation, >= 10x faster. Byte-identical to
  `reference` for the same seed on every op except defocus blur (within one grey level) and frost (the
  texture set of the original ImageNet-C).
* `reference` (`reference.py`): bethgelab's `imagecorruptions` fork, seeded deterministically.

Every call is a pure function of (image, name, severity, seed): no global RNG is read or left changed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from numbers import Integral

import numpy as np

from robustify.corruptions.names import ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES

__all__ = ["ALL_CORRUPTIONS", "CORRUPTIONS", "ENGINES", "EXTRA_CORRUPTIONS", "SEVERITIES", "MIN_SIDE", "corrupt",
           "engine_functions"]

CorruptionFn = Callable[[np.ndarray, int, int], np.ndarray]
_ENGINE_MODULES = {"fast": "robustify.corruptions.fast", "reference": "robustify.corruptions.reference"}
ENGINES: tuple[str, ...] = tuple(_ENGINE_MODULES)
MIN_SIDE = 32  # the reference refuses smaller images (its kernels and crops assume at least this)
SEED_LIMIT = 2**32  # NumPy's legacy seeding takes 32 bits


def engine_functions(engine: str) -> dict[str, CorruptionFn]:
    """The registry of one engine (imports it on first use)."""
    if engine not in _ENGINE_MODULES:
        raise ValueError(f"corrupt: unknown engine {engine!r} (valid: {list(ENGINES)})")
    return importlib.import_module(_ENGINE_MODULES[engine]).CORRUPTION_FUNCTIONS


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Check an input image and return it as a C-contiguous uint8 (H, W, 3) array (greyscale stacked)."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"corrupt: image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"corrupt: image dtype must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.stack((image,) * 3, axis=-1)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"corrupt: image must be HxW, HxWx1 or HxWx3, got shape {image.shape}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"corrupt: image sides must be >= {MIN_SIDE} pixels, got {image.shape[:2]}")
    return np.ascontiguousarray(image)


def corrupt(image: np.ndarray, name: str, severity: int, seed: int, engine: str = "fast") -> np.ndarray:
    """Apply ImageNet-C corruption `name` at `severity` (1..5) to a uint8 image, deterministically in
    `seed` (an int in [0, 2**32)). Greyscale input is stacked to RGB; the result is uint8 (H, W, 3)."""
    if name not in ALL_CORRUPTIONS:
        raise ValueError(f"corrupt: unknown corruption {name!r} (valid: {list(ALL_CORRUPTIONS)})")
    if isinstance(severity, bool) or not isinstance(severity, Integral) or int(severity) not in SEVERITIES:
        raise ValueError(f"corrupt: severity must be one of {list(SEVERITIES)}, got {severity!r}")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= int(seed) < SEED_LIMIT:
        raise ValueError(f"corrupt: seed must be an int in [0, 2**32), got {seed!r}")
    fn = engine_functions(engine)[name]
    out = fn(as_rgb(image), int(severity), int(seed))
    return np.ascontiguousarray(out, dtype=np.uint8)
