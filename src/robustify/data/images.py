"""Decoding any image file to 8-bit RGB. Torch-free, so dataset classes and the corruption builder's
short CPU jobs import it without paying for torch."""

from __future__ import annotations

from PIL import Image


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB: 16/32-bit greyscale is rescaled (a plain convert would clip),
    alpha is composited on white, CMYK/P/L go through PIL's conversions."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        hi = 65535.0 if im.mode.startswith("I;16") else max(1.0, float(im.getextrema()[1]))
        im = im.convert("I").point(lambda v: v * (255.0 / hi)).convert("L")
    elif im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return to_rgb(im)
