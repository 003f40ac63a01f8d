"""The fused evaluation input pipeline (eval/loader.py) against the model's reference transform."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from robustify.eval.loader import BatchNormalize, ResizeCropUint8, make_eval_loader, split_eval_transform
from robustify.config import ModelSpec
from robustify.models.clip import preprocess
from robustify.models.timm_models import create_timm


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """Smooth gradients plus texture, so resampling errors would show up."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, (np.sin(xx / 7) * np.cos(yy / 5) + 1) * 127], -1)
    arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    root = tmp_path_factory.mktemp("imgs")
    sizes = [(500, 375), (375, 500), (224, 224), (300, 257), (97, 130), (640, 181), (256, 256)]
    rows = []
    for i, (w, h) in enumerate(sizes):
        path = root / f"{i}.png"
        _photo(w, h, i).save(path)
        rows.append({"path": str(path), "label": i})
    return pd.DataFrame(rows)


def _timm_transform():
    import timm.data

    model = create_timm(ModelSpec("timm", "resnet18", None))
    return timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))


@pytest.mark.parametrize("which", ["open_clip", "timm"])
def test_fused_transform_within_one_grey_level(which: str, images: pd.DataFrame) -> None:
    if which == "open_clip":  # open_clip's eval transform at ViT-B/16's size (bicubic, CLIP stats)
        import open_clip

        transform = open_clip.image_transform(224, is_train=False)
    else:
        transform = _timm_transform()
    parts = split_eval_transform(transform)
    assert parts is not None, "a standard eval transform must be recognised"
    per_image, normalize = parts
    assert isinstance(per_image, ResizeCropUint8) and isinstance(normalize, BatchNormalize)
    worst = 0.0
    for path in images["path"]:
        with Image.open(path) as im:
            im = im.convert("RGB")
            ref = transform(im)
            fused = normalize(per_image(im)[None])[0]
        assert fused.shape == ref.shape == (3, 224, 224)
        std = torch.tensor(normalize.std).view(3, 1, 1)
        worst = max(worst, float(((fused - ref).abs() * std * 255).max()))
    assert worst <= 1.0 + 1e-3, f"fused transform is {worst:.3f} grey levels off"


def test_unfusable_transform_is_left_alone() -> None:
    import torchvision.transforms as T

    assert split_eval_transform(T.Compose([T.Resize(32), T.ToTensor()])) is None
    flip = T.Compose([T.Resize(32), T.CenterCrop(32), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    assert split_eval_transform(flip) is None


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_keeps_manifest_order_and_matches_reference(workers: int, images: pd.DataFrame, tiny_clip) -> None:
    transform = preprocess(tiny_clip)  # 32 px: every image above is resized and cropped
    frame = images.iloc[::-1].reset_index(drop=True)  # order must follow the frame, not the file names
    fused = list(make_eval_loader(frame, transform, batch_size=3, workers=workers))
    ref = list(make_eval_loader(frame, transform, batch_size=3, workers=workers, fuse=False))
    assert [len(y) for _, y in fused] == [3, 3, 1]
    labels = torch.cat([y for _, y in fused])
    assert labels.tolist() == frame["label"].tolist()
    x, x_ref = torch.cat([x for x, _ in fused]), torch.cat([x for x, _ in ref])
    assert x.dtype == torch.float32 and x.shape == x_ref.shape == (7, 3, 32, 32)
    assert torch.allclose(x, x_ref, atol=1.01 / 255 / 0.26)  # ≤1 grey level after CLIP's std (≥0.26)
    assert (x - x_ref).abs().gt(1e-5).float().mean() < 0.01


def test_predict_with_and_without_fusion_agree(images: pd.DataFrame, tiny_clip) -> None:
    from robustify.eval.evaluate import predict
    from robustify.models.zeroshot import ImageClassifier

    torch.manual_seed(0)
    clf = ImageClassifier(tiny_clip.visual, torch.nn.Linear(tiny_clip.visual.output_dim, 5))
    transform = preprocess(clf.encoder)
    a, ya = predict(clf, images, transform, 4, 0, "cpu")
    b, yb = predict(clf, images, transform, 4, 0, "cpu", fuse=False)
    assert ya.tolist() == images["label"].tolist() and torch.equal(ya, yb) and a.shape == (7, 5)
    assert torch.allclose(a, b, atol=1e-2)
    assert (a.argmax(1) == b.argmax(1)).all()
