"""Shared fixtures: tiny real diffusers models and small real datasets, all on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two cores: keep torch from oversubscribing them when pytest and loader workers share the machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """Skip ``@pytest.mark.cuda`` tests on machines without a CUDA device (CI runs on CPUs)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random UNet2DModel saved as a real diffusers folder (config.json + safetensors)."""
    from diffeat.models.loading import build_random

    out = tmp_path_factory.mktemp("models") / "tiny-unet"
    build_random("tiny", seed=1).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def pipeline_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny real pipeline folders of every model family (tests/tiny_pipelines.py), built once per session."""
    from tiny_pipelines import BUILDERS

    root = tmp_path_factory.mktemp("pipelines")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture
def store_path(tmp_path) -> str:
    return str(tmp_path / "feats.zarr")
