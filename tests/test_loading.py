"""Model loading: folders, pipeline folders, the local hub cache (never a download), identity."""

from __future__ import annotations

import shutil

import pytest
import torch

from diffeat.errors import ModelError
from diffeat.models.loading import load_model, weights_sha256


def test_folder_pipeline_folder_and_identity(tmp_path, tiny_model_dir):
    direct = load_model(str(tiny_model_dir))
    pipeline = tmp_path / "pipe"
    shutil.copytree(tiny_model_dir, pipeline / "unet")
    (pipeline / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    via_pipeline = load_model(str(pipeline))
    assert direct.weights_sha256 == via_pipeline.weights_sha256 != load_model("random:tiny").weights_sha256
    assert direct.name == "tiny-unet" and direct.resolution == 32
    assert not any(p.requires_grad for p in direct.unet.parameters()) and not direct.unet.training
    # The identity is the weights, not the file: a re-save keeps it, one changed value changes it.
    unet = direct.unet
    with torch.no_grad():
        unet.conv_in.bias[0] += 1
    assert weights_sha256(unet) != direct.weights_sha256


def test_hub_ids_come_only_from_the_local_cache(tmp_path, tiny_model_dir, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-ddpm" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model_dir, snapshot / "unet")
    (snapshot / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    (cache / "models--someone--tiny-ddpm" / "refs").mkdir()
    (cache / "models--someone--tiny-ddpm" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("someone/tiny-ddpm")
    assert loaded.name == "someone--tiny-ddpm"
    assert loaded.weights_sha256 == load_model(str(tiny_model_dir)).weights_sha256
    with pytest.raises(ModelError, match=r"never downloads.*huggingface-cli download someone/absent"):
        load_model("someone/absent")


def test_bad_model_specs(tmp_path):
    with pytest.raises(ModelError, match="no such folder"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a diffusers model folder"):
        load_model(str(tmp_path / "empty"))
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"x")
    with pytest.raises(ModelError, match="convert-adm"):
        load_model(str(ckpt))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(ModelError, match="AutoencoderKL"):
        load_model(str(tmp_path / "vae"))
