"""Shared fixtures: the repository root, a tiny mini-world config and a random tiny CLIP."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from robustify.config import MiniWorldConfig, ModelSpec, load_params, section

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy CI box they spin-wait."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def default_params() -> dict:
    return load_params(REPO / "params.yaml", schema_path=REPO / "workflow/schemas/params.schema.yaml")


@pytest.fixture()
def tiny_world_cfg(tmp_path: Path, default_params: dict) -> MiniWorldConfig:
    cfg = section(MiniWorldConfig, default_params["miniworld"], "miniworld")
    return dataclasses.replace(
        cfg, root=str(tmp_path / "world"), pretrain_pairs=60, train=24, val=12, test_per_domain=12, workers=1
    )


@pytest.fixture()
def tiny_clip():
    from robustify.models.clip import create_clip

    return create_clip(ModelSpec("open_clip", "tinyclip-rn32", None))
