"""Streaming training data (methods/train_data.py): decoded from files by worker processes, it must
feed the loop exactly the batches of the in-memory split, so a streamed run — resumed or not — ends
with the in-memory run's weights."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustify.config import ModelSpec
from robustify.data.images import load_rgb
from robustify.methods.finetune import FineTuneConfig, finetune, make_method, tuned_and_reference
from robustify.methods.train_data import ImageData, StreamingImages, decode_all, make_train_data, rank_batch
from robustify.models.clip import create_clip, tokenizer
from robustify.models.zeroshot import build_zeroshot_head

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
CLASSES = ["circle", "square", "star"]
SIZE = 32


def _write_images(root: Path, n: int) -> list[str]:
    """n small files of mixed formats, sizes (landscape, portrait, smaller than SIZE) and modes."""
    rng = np.random.default_rng(0)
    shapes = [(40, 32), (36, 48), (45, 30), (32, 32), (28, 28), (64, 50)]  # (h, w)
    paths = []
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (3 + i)) % 256, (yy * 5 + 7 * i) % 256, ((xx + yy) * 2) % 256], -1)
        array = np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
        kind = i % 4
        if kind == 0:
            path = root / f"{i}.jpg"
            image.save(path, quality=90)
        elif kind == 1:
            path = root / f"{i}.png"
            image.save(path)
        elif kind == 2:  # greyscale
            path = root / f"{i}.png"
            image.convert("L").save(path)
        else:  # alpha: composited on white by load_rgb
            path = root / f"{i}.png"
            rgba = image.convert("RGBA")
            rgba.putalpha(Image.fromarray((xx * 255 // max(1, w - 1)).astype(np.uint8)))
            rgba.save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("images")
    paths = _write_images(root, 32)
    labels = torch.arange(32) % len(CLASSES)
    return {"train": (paths[:24], labels[:24]), "val": (paths[24:], labels[24:])}


def both(files: dict, split: str, workers: int = 0) -> tuple[ImageData, StreamingImages]:
    paths, labels = files[split]
    memory = make_train_data(paths, labels, SIZE, MEAN, STD, workers=0)
    stream = make_train_data(paths, labels, SIZE, MEAN, STD, workers=workers, max_memory_bytes=0)
    assert isinstance(memory, ImageData) and isinstance(stream, StreamingImages)
    return memory, stream


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_yields_exactly_the_in_memory_images(files: dict, workers: int) -> None:
    memory, stream = both(files, "train", workers)
    assert len(stream) == len(memory) == 24 and torch.equal(stream.labels, memory.labels)
    for rank, world in [(0, 1), (1, 2)]:  # 5 steps of 8: crosses an epoch (3 steps each)
        got = list(stream.step_batches(seed=3, start=2, stop=7, batch_size=8, rank=rank, world=world))
        assert len(got) == 5
        for step, (images, labels) in zip(range(2, 7), got):
            idx = rank_batch(3, step, 24, 8, rank, world)
            assert images.dtype == torch.uint8 and images.shape == (8 // world, 3, SIZE, SIZE)
            assert torch.equal(images, memory.images[idx]) and torch.equal(labels, memory.labels[idx])
    for rank, world in [(0, 1), (0, 2), (1, 2)]:  # validation batches, DDP-strided
        a = list(memory.batches(5, "cpu", rank, world))
        b = list(stream.batches(5, "cpu", rank, world))
        assert len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))
        assert sum(len(y) for _, y in b) == len(range(rank, 24, world))


def test_decoding_is_open_clips_eval_preprocessing(files: dict) -> None:
    """uint8 resize(shortest side) + centre crop, then the loop's normalisation = open_clip's eval
    transform (float ToTensor + Normalize) on the same RGB image."""
    import open_clip

    paths = files["train"][0][:6]  # every shape: landscape, portrait, upscaled, square
    memory = ImageData(decode_all(paths, SIZE), torch.zeros(6, dtype=torch.long), MEAN, STD)
    reference = open_clip.image_transform(SIZE, is_train=False, mean=MEAN, std=STD)
    expected = torch.stack([reference(load_rgb(p)) for p in paths])
    torch.testing.assert_close(memory.normalise(memory.images, "cpu"), expected, rtol=0, atol=1e-6)


def test_make_train_data_streams_above_the_memory_limit(files: dict) -> None:
    paths, labels = files["train"]
    need = len(paths) * 3 * SIZE * SIZE
    assert isinstance(make_train_data(paths, labels, SIZE, MEAN, STD, workers=0, max_memory_bytes=need), ImageData)
    assert isinstance(make_train_data(paths, labels, SIZE, MEAN, STD, workers=0, max_memory_bytes=need - 1),
                      StreamingImages)


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    stream = StreamingImages([str(bad)], [0], SIZE, MEAN, STD, workers=0)
    with pytest.raises(RuntimeError, match="bad.jpg"):
        next(stream.batches(1, "cpu"))


# ---------------------------------------------------------------------------- through the loop
@pytest.fixture(scope="module")
def clip_world() -> dict:
    clip = create_clip(ModelSpec("open_clip", "tinyclip-rn32"), init_seed=0)
    tok = tokenizer("tinyclip-rn32")
    return {"clip": clip, "head": build_zeroshot_head(clip, tok, CLASSES, ["a photo of a {}.", "a {}."]), "tok": tok}


def train_run(clip_world: dict, train, val, name: str = "ft", params: dict | None = None, **kw):
    model, reference, text = tuned_and_reference(copy.deepcopy(clip_world["clip"]), clip_world["head"])
    text.tokenize = clip_world["tok"]
    cfg = FineTuneConfig(steps=5, batch_size=8, lr=1e-3, eval_every=2, checkpoint_every=2, augment="flip-shift")
    return finetune(model, reference, make_method(name, params), train, val, cfg, seed=1, text=text, **kw)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("name,params", [("ft", None), ("lipsum-ft", {"texts": 8}), ("lp", None)])
def test_a_streamed_run_ends_with_the_in_memory_weights(files: dict, clip_world: dict, name: str,
                                                        params: dict | None) -> None:
    train_mem, train_stream = both(files, "train", workers=1)
    val_mem, val_stream = both(files, "val")
    memory = train_run(clip_world, train_mem, val_mem, name, params)
    streamed = train_run(clip_world, train_stream, val_stream, name, params)
    assert_same_weights(memory.model, streamed.model)
    assert [r["val_accuracy"] for r in memory.history] == [r["val_accuracy"] for r in streamed.history]
    start = clip_world["head"].weight
    assert not torch.equal(streamed.model.head.weight, start)  # it trained


def test_a_streamed_run_resumes_exactly(files: dict, clip_world: dict, tmp_path: Path) -> None:
    _, train = both(files, "train", workers=1)
    _, val = both(files, "val")
    whole = train_run(clip_world, train, val)
    state = tmp_path / "resume.pt"
    train_run(clip_world, train, val, resume_path=state, fingerprint="run", stop_after=3)  # killed after step 3
    assert state.exists()
    resumed = train_run(clip_world, train, val, resume_path=state, fingerprint="run")
    assert resumed.steps_run == 3 and not state.exists()  # steps 2, 3, 4 from step 2's state
    assert_same_weights(whole.model, resumed.model)
