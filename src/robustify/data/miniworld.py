"""The mini-world: the embedded default dataset, generated procedurally and deterministically.

Shape classes rendered in five DomainNet-like domains (a photo-like reference domain with busy
textured backgrounds, plus sketch, clipart, painting and infographic), a shape-focused caption for
every pre-training image, and splits: `pretrain` (all domains, with captions), reference
`train`/`val`/`test`, and a `test` split per shifted domain. It is written to disk as PNG files plus
`manifest.parquet` exactly like a real dataset, so every later stage treats it like ImageNet or
DomainNet. What makes it show the robustness phenomena on a CPU is recorded in
`shared/notes/miniworld-facts.md` (32 px images, shape-focused captions, sizes).

Each item has its own random generator derived from (seed, split, domain, index), so the bytes of
an item do not depend on how many workers render or in which order.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from robustify.config import MiniWorldConfig
from robustify.data.shapes import SHAPES, transform
from robustify.io import write_json, write_parquet

DOMAIN_PHRASES: dict[str, tuple[str, ...]] = {
    "photo": ("photo", "picture", "snapshot", "photograph"),
    "sketch": ("pencil sketch", "sketch", "drawing", "line drawing"),
    "clipart": ("clipart", "cartoon", "icon", "clip art image"),
    "painting": ("painting", "oil painting", "watercolor", "artwork"),
    "infographic": ("infographic", "diagram", "chart", "poster"),
}
CAPTION_TEMPLATES = ("a {d} of a {s}.", "{d} of a {s}", "a {s} in a {d}.", "this {d} shows a {s}.")
GENERIC_NOUNS = ("object", "shape", "thing")
_STAGE = "miniworld"


@dataclass(frozen=True)
class Item:
    split: str
    domain: str
    index: int
    label: int


def item_rng(seed: int, split: str, domain: str, index: int) -> np.random.Generator:
    """Derived, order-independent seed: hash(seed, stage, split, domain, index) (DESIGN §6)."""
    words = [seed, *map(ord, _STAGE), 0, *map(ord, split), 0, *map(ord, domain), index]
    return np.random.default_rng(np.random.SeedSequence(words))


# ------------------------------------------------------------------ rendering helpers
def _color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))  # type: ignore[return-value]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 3) -> np.ndarray:
    """Low-frequency colour noise: a random grid upsampled bilinearly, values in [0, 1]."""
    grid = (rng.random((cells, cells, channels)) * 255).astype(np.uint8)
    planes = [Image.fromarray(grid[..., c]).resize((size, size), Image.BILINEAR) for c in range(channels)]
    return np.stack([np.asarray(p, dtype=np.float32) for p in planes], axis=-1) / 255.0


def _mask(name: str, size: int, cx: float, cy: float, radius: float, angle: float) -> Image.Image:
    rings = transform(SHAPES[name], cx, cy, radius, angle)
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    d.polygon(rings[0], fill=255)
    for hole in rings[1:]:
        d.polygon(hole, fill=0)
    return m


def _outline(mask: Image.Image, width: int) -> Image.Image:
    k = 2 * width + 1
    outer = mask.filter(ImageFilter.MaxFilter(k))
    inner = mask.filter(ImageFilter.MinFilter(k))
    return Image.fromarray(np.asarray(outer) - np.asarray(inner))


def _blend(base: np.ndarray, layer: np.ndarray, mask: Image.Image) -> np.ndarray:
    a = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    return base * (1 - a) + layer * a


def _placement(rng: np.random.Generator, size: int, rmin: float, rmax: float) -> tuple[float, float, float, float]:
    radius = size * rng.uniform(rmin, rmax)
    margin = radius * 1.05
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    return cx, cy, radius, rng.uniform(-20, 20)


def _photo(rng: np.random.Generator, shape: str, s: int) -> np.ndarray:
    """Busy textured background, textured and shaded object, sensor noise: hard but realistic."""
    bg = 0.55 * _smooth_noise(rng, s, int(rng.integers(3, 7))) + 0.45 * _smooth_noise(rng, s, int(rng.integers(10, 20)))
    bg_img = Image.fromarray((bg * 255).astype(np.uint8))
    d = ImageDraw.Draw(bg_img)
    for _ in range(int(rng.integers(3, 8))):  # clutter
        x0, y0 = rng.uniform(0, s, 2)
        w, h = rng.uniform(s * 0.05, s * 0.3, 2)
        d.line([(x0, y0), (x0 + w, y0 + h)], fill=_color(rng), width=int(rng.integers(1, 4)))
    bg = np.asarray(bg_img, dtype=np.float32) / 255.0
    cx, cy, r, ang = _placement(rng, s, 0.25, 0.42)
    m = _mask(shape, s, cx, cy, r, ang)
    base = np.array(_color(rng, 20, 236), dtype=np.float32) / 255.0
    tex = 0.75 + 0.5 * _smooth_noise(rng, s, 8, 1)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    light = 0.8 + 0.4 * ((xx - cx) * rng.uniform(-1, 1) + (yy - cy) * rng.uniform(-1, 1)) / s
    obj = np.clip(base[None, None, :] * tex * light[..., None], 0, 1)
    shadow = m.filter(ImageFilter.GaussianBlur(s / 24)).transform((s, s), Image.AFFINE, (1, 0, -s / 32, 0, 1, -s / 32))
    out = _blend(bg, bg * 0.45, shadow)
    out = _blend(out, obj, m.filter(ImageFilter.GaussianBlur(0.6)))
    out = out + rng.normal(0, 0.04, out.shape).astype(np.float32)
    return np.clip(out, 0, 1)


def _sketch(rng: np.random.Generator, shape: str, s: int) -> np.ndarray:
    """Grey pencil outline strokes (jittered, repeated) with optional hatching on paper."""
    paper = 0.9 + 0.08 * _smooth_noise(rng, s, 16, 1)
    img = Image.fromarray((np.repeat(paper, 3, axis=2) * 255).astype(np.uint8))
    cx, cy, r, ang = _placement(rng, s, 0.25, 0.42)
    ink = int(rng.integers(20, 90))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    for _ in range(int(rng.integers(2, 4))):  # repeated, slightly offset strokes of the boundary
        jx, jy, jr, ja = rng.normal(0, s / 90), rng.normal(0, s / 90), rng.normal(1, 0.03), rng.normal(0, 2)
        stroke = _outline(_mask(shape, s, cx + jx, cy + jy, r * jr, ang + ja), int(rng.integers(1, 3)) * max(1, s // 64))
        arr = _blend(arr, np.full((s, s, 3), ink / 255, np.float32), stroke)
    img = Image.fromarray((arr * 255).astype(np.uint8))
    if rng.random() < 0.5:  # hatching inside the shape
        hatch = Image.new("L", (s, s), 0)
        hd = ImageDraw.Draw(hatch)
        step = int(rng.integers(4, 8))
        for k in range(-s, s, step):
            hd.line([(k, 0), (k + s, s)], fill=160, width=1)
        m = _mask(shape, s, cx, cy, r, ang)
        hatch = Image.fromarray(np.minimum(np.asarray(hatch), np.asarray(m)))
        arr = _blend(np.asarray(img, dtype=np.float32) / 255, np.full((s, s, 3), ink / 255, np.float32), hatch)
        return np.clip(arr, 0, 1)
    return np.asarray(img, dtype=np.float32) / 255.0


def _clipart(rng: np.random.Generator, shape: str, s: int) -> np.ndarray:
    """Flat saturated fill, thick dark outline, plain background."""
    bg = np.array(_color(rng, 200, 256) if rng.random() < 0.5 else (255, 255, 255), np.float32) / 255
    out = np.broadcast_to(bg, (s, s, 3)).copy()
    cx, cy, r, ang = _placement(rng, s, 0.27, 0.42)
    m = _mask(shape, s, cx, cy, r, ang)
    hsv = Image.new("HSV", (1, 1), (int(rng.integers(0, 256)), int(rng.integers(180, 256)), int(rng.integers(170, 256))))
    fill = np.array(hsv.convert("RGB").getpixel((0, 0)), np.float32) / 255
    out = _blend(out, np.broadcast_to(fill, (s, s, 3)), m)
    out = _blend(out, np.zeros((s, s, 3), np.float32), _outline(m, max(1, s // 32)))
    return out


def _painting(rng: np.random.Generator, shape: str, s: int) -> np.ndarray:
    """Gradient canvas with brush strokes, stroke-textured object, soft edges, few colours."""
    c1, c2 = (np.array(_color(rng), np.float32) / 255 for _ in range(2))
    t = np.linspace(0, 1, s, dtype=np.float32)[:, None, None]
    canvas = Image.fromarray(((c1 * (1 - t) + c2 * t).repeat(s, axis=1) * 255).astype(np.uint8))
    d = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(8, 16))):
        x0, y0 = rng.uniform(0, s, 2)
        ang = rng.uniform(0, np.pi)
        ln = rng.uniform(s * 0.2, s * 0.6)
        d.line([(x0, y0), (x0 + ln * np.cos(ang), y0 + ln * np.sin(ang))], fill=_color(rng), width=int(rng.integers(s // 16, s // 6)))
    cx, cy, r, a = _placement(rng, s, 0.25, 0.42)
    m = _mask(shape, s, cx, cy, r, a)
    obj = Image.new("RGB", (s, s), _color(rng))
    od = ImageDraw.Draw(obj)
    base = np.array(obj.getpixel((0, 0)), dtype=np.int64)
    for _ in range(12):
        x0, y0 = rng.uniform(0, s, 2)
        col = tuple(int(v) for v in np.clip(base + rng.integers(-50, 51, 3), 0, 255))
        od.line([(x0, y0), (x0 + rng.uniform(-s / 3, s / 3), y0 + rng.uniform(-s / 3, s / 3))], fill=col, width=s // 10)
    out = _blend(np.asarray(canvas, np.float32) / 255, np.asarray(obj, np.float32) / 255, m.filter(ImageFilter.GaussianBlur(s / 40)))
    img = Image.fromarray((out * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(s / 64))
    return np.asarray(img.quantize(int(rng.integers(6, 12)), dither=Image.Dither.NONE).convert("RGB"), np.float32) / 255


def _infographic(rng: np.random.Generator, shape: str, s: int) -> np.ndarray:
    """A small flat icon among chart bars and text-like lines on a light layout."""
    img = Image.new("RGB", (s, s), _color(rng, 225, 256))
    d = ImageDraw.Draw(img)
    icon_left = rng.random() < 0.5
    x_lo, x_hi = (0.55 * s, 0.95 * s) if icon_left else (0.05 * s, 0.45 * s)
    base_y = s * rng.uniform(0.85, 0.95)
    for k in range(int(rng.integers(3, 6))):  # bar chart
        w = (x_hi - x_lo) / 6
        x = x_lo + k * w * 1.2
        h = s * rng.uniform(0.15, 0.5)
        d.rectangle([x, base_y - h, x + w * 0.8, base_y], fill=_color(rng, 40, 220))
    for k in range(int(rng.integers(2, 5))):  # "text"
        y = s * (0.08 + 0.08 * k)
        d.line([(x_lo, y), (x_lo + rng.uniform(0.4, 1.0) * (x_hi - x_lo), y)], fill=(60, 60, 60), width=max(1, s // 32))
    radius = s * rng.uniform(0.15, 0.22)
    cx = s * (0.25 if icon_left else 0.75) + rng.normal(0, s / 40)
    cy = s * rng.uniform(0.3, 0.7)
    m = _mask(shape, s, cx, cy, radius, rng.uniform(-20, 20))
    out = _blend(np.asarray(img, np.float32) / 255, np.broadcast_to(np.array(_color(rng, 0, 200), np.float32) / 255, (s, s, 3)), m)
    return out


RENDERERS = {"photo": _photo, "sketch": _sketch, "clipart": _clipart, "painting": _painting, "infographic": _infographic}


def render(cfg: MiniWorldConfig, seed: int, item: Item) -> tuple[bytes, str | None]:
    """Render one item → (PNG bytes, caption or None). Pure function of (cfg, seed, item)."""
    rng = item_rng(seed, item.split, item.domain, item.index)
    shape = cfg.classes[item.label]
    arr = RENDERERS[item.domain](rng, shape, cfg.render_size)
    img = Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")
    if cfg.image_size != cfg.render_size:
        img = img.resize((cfg.image_size, cfg.image_size), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    caption = caption_for(rng, cfg, item) if item.split == "pretrain" else None
    return buf.getvalue(), caption


def caption_for(rng: np.random.Generator, cfg: MiniWorldConfig, item: Item) -> str:
    """Shape-focused caption with web-like noise: generic nouns and some wrong shapes."""
    u = rng.random()
    if u < cfg.generic_noun_rate:
        noun = GENERIC_NOUNS[int(rng.integers(len(GENERIC_NOUNS)))]
    elif u < cfg.generic_noun_rate + cfg.wrong_shape_rate:
        others = [c for i, c in enumerate(cfg.classes) if i != item.label]
        noun = others[int(rng.integers(len(others)))]
    else:
        noun = cfg.classes[item.label]
    phrase = DOMAIN_PHRASES[item.domain][int(rng.integers(4))]
    return CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(d=phrase, s=noun)


def plan(cfg: MiniWorldConfig) -> list[Item]:
    """Every item of the world, in manifest order. Labels cycle so splits are class-balanced."""
    n_cls = len(cfg.classes)
    items: list[Item] = []
    for i in range(cfg.pretrain_pairs):
        items.append(Item("pretrain", cfg.domains[(i // n_cls) % len(cfg.domains)], i, i % n_cls))
    for split, n in (("train", cfg.train), ("val", cfg.val)):
        items += [Item(split, cfg.reference_domain, i, i % n_cls) for i in range(n)]
    for dom in cfg.domains:
        items += [Item("test", dom, i, i % n_cls) for i in range(cfg.test_per_domain)]
    return items


def relpath(cfg: MiniWorldConfig, item: Item) -> str:
    return f"images/{item.split}/{item.domain}/{cfg.classes[item.label]}/{item.split}-{item.domain}-{item.index:06d}.png"


def _render_chunk(args: tuple[MiniWorldConfig, int, str, list[Item]]) -> list[str | None]:
    cfg, seed, staging, items = args
    captions = []
    for item in items:
        data, caption = render(cfg, seed, item)
        path = Path(staging) / relpath(cfg, item)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        captions.append(caption)
    return captions


def _chunks(items: list[Item], size: int) -> Iterator[list[Item]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def generate(cfg: MiniWorldConfig, seed: int, out_dir: str | Path | None = None, progress: bool = False) -> pd.DataFrame:
    """Write the world to `out_dir` (default `cfg.root`) and return its manifest.

    Images are rendered into a staging folder that replaces `images/` only when complete, and the
    manifest is written last, so an interrupted run never leaves a manifest describing missing files.
    """
    root = Path(out_dir or cfg.root)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".images-staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    items = plan(cfg)
    jobs = [(cfg, seed, str(staging), chunk) for chunk in _chunks(items, 500)]
    captions: list[str | None] = []
    if cfg.workers > 1:
        with mp.get_context("spawn").Pool(cfg.workers) as pool:
            results = pool.imap(_render_chunk, jobs)
            for res in _progress(results, len(jobs), progress):
                captions += res
    else:
        for job in _progress(map(_render_chunk, jobs), len(jobs), progress):
            captions += job
    (root / "manifest.parquet").unlink(missing_ok=True)
    shutil.rmtree(root / "images", ignore_errors=True)
    os.replace(staging / "images", root / "images")
    staging.rmdir()
    manifest = pd.DataFrame(
        {
            "path": [relpath(cfg, it) for it in items],
            "label": np.array([it.label for it in items], dtype=np.int64),
            "class_name": [cfg.classes[it.label] for it in items],
            "split": [it.split for it in items],
            "domain": [it.domain for it in items],
            "item_id": np.array([it.index for it in items], dtype=np.int64),
            "caption": captions,
        }
    )
    # Only what defines the content: root and worker count do not change a single byte.
    content = {k: v for k, v in asdict(cfg).items() if k not in ("root", "workers")}
    write_json(root / "dataset.json", {"name": "miniworld", "classes": list(cfg.classes), "seed": seed, "config": content})
    write_parquet(root / "manifest.parquet", manifest)
    return manifest


def _progress(it, total: int, enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, unit="chunk", desc="miniworld", mininterval=5)
