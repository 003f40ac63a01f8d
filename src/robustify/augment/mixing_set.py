"""PixMix's mixing set: pictures read from a folder, or procedurally generated fractals.

The reference (andyzoujm/pixmix `imagenet.py`) reads the mixing set with `ImageFolder` and
`Resize(256) + RandomCrop(224)` and draws one picture uniformly per training image. `MixingSet` does the
same with every draw taken from the caller's generator. PixMix's own mixing set is fractals (plus
feature visualisations) that cannot ship with the mini-world, so `generate_fractals` renders random
iterated-function-system (IFS) fractals: a pure function of (n, size, seed), written as PNG like any
other image folder.
"""

from __future__ import annotations

import colorsys
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from robustify.io import PathLike, derive_seed, write_bytes

EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
_STAGE = "pixmix-fractals"


def _resize_shorter(img: Image.Image, shorter: int) -> Image.Image:
    """torchvision `Resize(int)` on a PIL image: shorter side → `shorter`, longer side truncated in
    proportion, bilinear; an image already at that size is returned unchanged."""
    w, h = img.size
    if w <= h:
        new_w, new_h = shorter, int(shorter * h / w)
    else:
        new_w, new_h = int(shorter * w / h), shorter
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.BILINEAR)


def resize_random_crop(img: Image.Image, size: int, resize: int, rng: np.random.Generator) -> Image.Image:
    """`Resize(resize)` then `RandomCrop(size)` as torchvision does them (top drawn before left, no
    draw when the resized picture already is `size`×`size`), with the offsets from `rng`."""
    if size < 1 or resize < size:
        raise ValueError(f"need 1 <= size <= resize, got size={size}, resize={resize}")
    img = _resize_shorter(img, resize)
    w, h = img.size
    if (w, h) == (size, size):
        return img
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return img.crop((left, top, left + size, top + size))


class MixingSet:
    """A folder of pictures (searched recursively, symlinks followed as `ImageFolder` does).

    Files are ordered by their relative path, so a seed picks the same picture on every filesystem.
    Unlike `ImageFolder`, no class sub-folders are required: PixMix never uses the labels.
    """

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"mixing set folder not found: {self.root}")
        found: list[str] = []
        for dirpath, _, filenames in os.walk(self.root, followlinks=True):
            for name in filenames:
                if os.path.splitext(name)[1].lower() in EXTENSIONS:
                    found.append(Path(dirpath, name).relative_to(self.root).as_posix())
        if not found:
            raise ValueError(f"mixing set {self.root}: no images found (looked for {', '.join(EXTENSIONS)})")
        self.files: list[str] = sorted(found)

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        return self.root / self.files[index]

    def load(self, index: int) -> Image.Image:
        """The picture as RGB (the `ImageFolder` loader's conversion); a file PIL cannot decode is an
        error naming it — a mixing set with broken files should be fixed, not silently thinned."""
        path = self.path(index)
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"mixing set picture {path} is not a readable image: {e}") from e

    def pick(self, rng: np.random.Generator, size: int, resize: int | None = None) -> Image.Image:
        """One picture drawn uniformly, resized (shorter side) to `resize` and randomly cropped to
        `size`×`size`. `resize` defaults to size·256/224 (floored): 256 for the reference's ImageNet
        224, and 36 for 32 px — exactly the reference's CIFAR `Resize(36) + RandomCrop(32)`."""
        if resize is None:
            resize = size * 256 // 224
        index = int(rng.integers(len(self.files)))
        return resize_random_crop(self.load(index), size, resize, rng)


# ------------------------------------------------------------------ generated fractals
def _ifs_maps(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2–4 random contractive affine maps x ↦ A x + b and their choice probabilities.

    A = R(θ) · diag(σ1, d·σ2) · R(φ) with d = ±1; the singular values are scaled so that
    Σ(σ1 + 2σ2) lies in [(5+N)/2, (6+N)/2] — the range in which Anderson & Farrell ("Improving
    fractal pre-training", 2022) found random IFS attractors to be neither dust nor blobs. Maps are
    chosen with probability ∝ |det A| so the attractor is covered evenly.
    """
    n = int(rng.integers(2, 5))
    sig = np.sort(rng.uniform(0.05, 1.0, size=(n, 2)), axis=1)[:, ::-1]
    target = rng.uniform((5 + n) / 2, (6 + n) / 2)
    sig = np.clip(sig * target / (sig[:, 0] + 2 * sig[:, 1]).sum(), 0.02, 0.95)
    theta, phi = rng.uniform(-np.pi, np.pi, size=(2, n))
    d = rng.choice([-1.0, 1.0], size=n)

    def rot(t: np.ndarray) -> np.ndarray:
        c, s = np.cos(t), np.sin(t)
        return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)

    diag = np.zeros((n, 2, 2))
    diag[:, 0, 0], diag[:, 1, 1] = sig[:, 0], d * sig[:, 1]
    a = np.einsum("nij,njk,nkl->nil", rot(theta), diag, rot(phi))
    b = rng.uniform(-1.0, 1.0, size=(n, 2))
    det = np.abs(a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]) + 1e-3
    return a, b, det / det.sum()


def _render_ifs(rng: np.random.Generator, size: int, chains: int, steps: int, burn_in: int) -> np.ndarray | None:
    """Chaos game on `chains` points in parallel, coloured like fractal flames (a point's colour moves
    halfway to its map's colour at every step); brightness is the log hit density. Returns
    size×size×3 float in [0, 1], or None when the attractor is too thin to make a picture."""
    a, b, p = _ifs_maps(rng)
    n = len(p)
    palette = np.array([colorsys.hsv_to_rgb(h, rng.uniform(0.6, 1.0), 1.0) for h in rng.uniform(0, 1, n)])
    # start every chain on the attractor (the fixed point of map 0), so no transient point stretches
    # the bounding box; the burn-in only spreads the chains out over the attractor
    fixed = np.linalg.solve(np.eye(2) - a[0], b[0])
    xy = np.tile(fixed, (chains, 1))
    col = np.full((chains, 3), 0.5)
    cum = np.cumsum(p)
    pts, cols = [], []
    for t in range(steps):
        k = np.minimum(np.searchsorted(cum, rng.random(chains), side="right"), n - 1)
        m, x, y = a[k], xy[:, 0], xy[:, 1]  # elementwise, no BLAS: bytes must not depend on threads
        xy = np.stack([m[:, 0, 0] * x + m[:, 0, 1] * y, m[:, 1, 0] * x + m[:, 1, 1] * y], 1) + b[k]
        col = 0.5 * (col + palette[k])
        if t >= burn_in:
            pts.append(xy)
            cols.append(col)
    xy, col = np.concatenate(pts), np.concatenate(cols)
    lo, hi = xy.min(0), xy.max(0)
    extent = float((hi - lo).max())
    if not np.isfinite(extent) or extent < 1e-6:
        return None
    # keep the aspect ratio, centre the attractor, leave a 4% margin on the long side
    scale = (size - 1) * 0.92 / extent
    offset = (size - 1) / 2 - scale * (lo + hi) / 2
    ij = np.clip(np.rint(xy * scale + offset).astype(np.int64), 0, size - 1)
    flat = ij[:, 1] * size + ij[:, 0]
    count = np.bincount(flat, minlength=size * size).astype(np.float64)
    if (count > 0).mean() < 0.04:  # a line or sparse dust: not a useful mixing picture
        return None
    rgb = np.stack([np.bincount(flat, weights=col[:, c], minlength=size * size) for c in range(3)], 1)
    rgb = rgb / np.maximum(count, 1)[:, None]
    bright = np.log1p(count) / np.log1p(count.max())
    return (rgb * bright[:, None]).reshape(size, size, 3)


def fractal_image(seed: int, size: int) -> Image.Image:
    """One random IFS fractal, a pure function of (seed, size); degenerate draws are redrawn from the
    same generator, so the result stays deterministic."""
    rng = np.random.default_rng(seed)
    chains, steps, burn_in = 2048, 20 + max(1, size * size // 512), 12
    for _ in range(100):
        img = _render_ifs(rng, size, chains, steps, burn_in)
        if img is not None:
            return Image.fromarray(np.rint(img * 255).astype(np.uint8), "RGB")
    raise RuntimeError(f"no non-degenerate fractal in 100 draws for seed {seed}")  # never seen; a guard


def generate_fractals(out_dir: PathLike, n: int, size: int, seed: int) -> list[Path]:
    """Write `n` fractals of `size`×`size` px as `fractal-<i>.png` into `out_dir` (atomically) and return
    their paths. Image i uses seed derive_seed(seed, "pixmix-fractals", i), so it does not depend on n."""
    if n < 0:
        raise ValueError(f"generate_fractals: n must be >= 0, got {n}")
    if size < 8:
        raise ValueError(f"generate_fractals: size must be >= 8 px, got {size}")
    out = Path(out_dir)
    paths = []
    for i in range(n):
        buf = io.BytesIO()
        fractal_image(derive_seed(seed, _STAGE, i), size).save(buf, format="PNG", optimize=False, compress_level=6)
        path = out / f"fractal-{i:05d}.png"
        write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths
