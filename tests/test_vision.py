"""Vision backbones (the paper's baselines) on tiny real transformers folders: blocks, forward, preprocessing, store.

References come from transformers itself: the model's own forward with ``output_hidden_states``, its own
``AutoImageProcessor``; stores, CKA and probes are the real ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from diffeat.cli import main
from diffeat.errors import DiffeatError, ModelError
from diffeat.models.loading import load_model, peek_family

#: fixture -> (blocks in its table, prefix tokens before the patches: class [+ registers])
EXPECTED = {"resnet": (5, 0), "vit": (4, 1), "dinov2": (4, 1), "clip": (4, 1)}


@pytest.fixture(scope="module")
def vision_dirs(tmp_path_factory) -> dict[str, Path]:
    from tiny_vision import BUILDERS

    root = tmp_path_factory.mktemp("vision")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def loaded(vision_dirs):
    return {name: load_model(str(path)) for name, path in vision_dirs.items()}


def _pixels(batch: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _patches(hidden: torch.Tensor, prefix: int) -> torch.Tensor:
    """The model's own hidden state without its class/register tokens (CNNs: the map itself)."""
    return hidden if hidden.dim() == 4 else hidden[:, prefix:]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_block_table_is_the_models_hidden_states(name, loaded):
    model = loaded[name].model
    n_blocks, prefix = EXPECTED[name]
    assert loaded[name].family == "vision" and model.schedule is None and model.first_block == 0
    table = model.block_table()
    with torch.no_grad():
        hidden = model.denoiser(pixel_values=_pixels(1), output_hidden_states=True).hidden_states
    assert [b.index for b in table] == list(range(len(hidden))) == list(range(n_blocks))
    for b, h in zip(table, hidden):
        if h.dim() == 4:
            assert (b.channels, b.height, b.width) == tuple(h.shape[1:]), b
        else:  # tokens: the patch grid holds every token but the class (and register) tokens
            assert b.channels == h.shape[2] and b.height * b.width == h.shape[1] - prefix, b


@pytest.mark.parametrize("name", list(EXPECTED))
def test_truncated_forward_is_bitwise_the_hidden_state(name, loaded):
    model = loaded[name].model
    _, prefix = EXPECTED[name]
    x = _pixels()
    with torch.no_grad():
        hidden = model.denoiser(pixel_values=x, output_hidden_states=True).hidden_states
        every = model.feature_forward(range(len(hidden)))(x)
        singles = {b: model.feature_forward([b])(x, None)[b] for b in range(len(hidden))}
    for b, h in enumerate(hidden):
        for got in (every[b], singles[b]):
            tokens = got if h.dim() == 4 else got.flatten(2).transpose(1, 2)  # the grid, row-major, as tokens
            assert torch.equal(tokens, _patches(h, prefix)), f"{name} block {b}"


@pytest.mark.parametrize("name", list(EXPECTED))
def test_nothing_after_the_deepest_block_runs(name, loaded):
    model = loaded[name].model
    backbone = model.denoiser
    table = {b.index: b.module for b in model.block_table()}
    deepest = 1
    names = {m: n for n, m in backbone.named_modules()}
    calls: list[str] = []
    handles = [m.register_forward_pre_hook(lambda m, a: calls.append(names[m])) for m in backbone.modules()
               if not any(True for _ in m.children())]
    try:
        with torch.no_grad():
            out = model.feature_forward([deepest])(_pixels(2))
    finally:
        for h in handles:
            h.remove()
    later = [module for index, module in table.items() if index > deepest]
    heads = ["layernorm", "pooler", "post_layernorm"]
    assert list(out) == [deepest] and calls
    assert [c for c in calls if any(c == m or c.startswith(m + ".") for m in later + heads)] == []
    assert any(c.startswith(table[deepest] + ".") for c in calls)


def test_position_embeddings_are_interpolated_off_the_native_size(loaded):
    """A ViT at 48 px (its position embeddings are for 32): the model's own interpolate_pos_encoding=True forward."""
    model = loaded["vit"].model
    x = _pixels(2, 48)
    with torch.no_grad():
        hidden = model.denoiser(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states
        got = model.feature_forward([0, 2])(x)
    assert got[2].shape == (2, 32, 6, 6)
    for b in (0, 2):
        assert torch.equal(got[b].flatten(2).transpose(1, 2), hidden[b][:, 1:])
    assert model.identity(48)["position_embedding"] == "interpolated to the patch grid"
    assert "position_embedding" not in model.identity(32)
    with pytest.raises(DiffeatError, match="--resolution 36 does not fit.*multiple of 8"):
        model.check_resolution(36)


def test_random_architectures_are_the_hub_models_shapes():
    want = {"resnet50": (5, (2048, 7, 7)), "vit-b16": (13, (768, 14, 14)), "dinov2-s14": (13, (384, 16, 16)),
            "clip-b32": (13, (768, 7, 7)), "convnext-t": (5, (768, 7, 7))}
    for arch, (count, last) in want.items():
        loaded = load_model(f"random:{arch}", device="meta")
        table = loaded.model.block_table()
        assert (len(table), (table[-1].channels, table[-1].height, table[-1].width)) == (count, last), arch
        assert loaded.resolution == 224 and loaded.name == f"random-{arch}"
    assert load_model("random:resnet50", device="meta").model.block_table()[0].module == "embedder"


# -- preprocessing ------------------------------------------------------------------------------------------------


def _real_jpegs() -> list[Path]:
    """Photographs that ship with scikit-learn and matplotlib (real JPEG files, 427x640 and 600x512)."""
    import matplotlib
    import sklearn.datasets

    images = Path(sklearn.datasets.__file__).parent / "images"
    return [images / "china.jpg", images / "flower.jpg",
            Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]


def _processor_folders(tmp_path: Path, vision_dirs: dict[str, Path]) -> dict[str, Path]:
    """The tiny models' folders, and folders holding the hub models' preprocessor configs (224 px)."""
    from diffeat.models.families import vision

    out = dict(vision_dirs)
    for name in ("resnet50", "vit-b16", "dinov2-s14", "clip-b32"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "preprocessor_config.json").write_text(json.dumps(vision.RANDOM[name].processor))
        out[name] = folder
    return out


def test_preprocessing_is_the_models_own_image_processor(tmp_path, vision_dirs):
    from transformers import AutoImageProcessor

    from diffeat.models.preprocessing import read_processor_config

    images = [Image.open(p).convert("RGB") for p in _real_jpegs()]
    images.append(images[0].crop((100, 50, 130, 70)))  # smaller than every crop: upscaled
    for name, folder in _processor_folders(tmp_path, vision_dirs).items():
        theirs = AutoImageProcessor.from_pretrained(str(folder))
        ours = read_processor_config(folder)
        std = np.asarray(ours.std, dtype=np.float64).reshape(3, 1, 1)
        for image in images:
            want = theirs(image, return_tensors="np")["pixel_values"][0]
            got = ours(image)
            assert got.shape == want.shape and got.dtype == np.float32, name
            assert np.abs((got - want) * std * 255).max() <= 1.0, name  # within one gray level
    assert read_processor_config(vision_dirs["resnet"]).identity()["resize"] == ["shortest_edge", 36]


def test_an_unsupported_image_processor_is_refused(tmp_path):
    from diffeat.models.preprocessing import read_processor_config

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "SiglipImageProcessor"}))
    with pytest.raises(ModelError, match="image processor 'SiglipImageProcessor' is not supported"):
        read_processor_config(tmp_path)


# -- loading ------------------------------------------------------------------------------------------------------


def test_weights_load_strictly(tmp_path, vision_dirs):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "resnet"
    shutil.copytree(vision_dirs["resnet"], folder)
    weights = load_file(folder / "model.safetensors")
    dropped = sorted(weights)[3]
    save_file({k: v for k, v in weights.items() if k != dropped}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelError, match=f"weight `{dropped}` of the ResNetForImageClassification is missing"):
        load_model(str(folder))
    save_file({**weights, "resnet.extra": torch.zeros(2)}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="weight `resnet.extra` .* is in the weight files but not in the model"):
        load_model(str(folder))


def test_a_cached_hub_id_loads_and_an_absent_one_says_how_to_fetch(tmp_path, vision_dirs, monkeypatch):
    cache = tmp_path / "hub"
    shutil.copytree(vision_dirs["dinov2"], cache / "models--someone--tiny-dinov2" / "snapshots" / "0123abcd")
    (cache / "models--someone--tiny-dinov2" / "refs").mkdir()
    (cache / "models--someone--tiny-dinov2" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    loaded = load_model("someone/tiny-dinov2")
    assert loaded.name == "someone--tiny-dinov2" and loaded.family == "vision"
    assert loaded.weights_sha256 == load_model(str(vision_dirs["dinov2"])).weights_sha256
    assert peek_family("someone/tiny-dinov2").timestep is False
    with pytest.raises(ModelError, match=r"never downloads.*huggingface-cli download facebook/dinov2-small"):
        peek_family("facebook/dinov2-small")


@pytest.mark.parametrize("case", ["t given", "no weights", "unsupported model_type", "diffusion without t"])
def test_bad_runs_fail_in_one_line_before_any_data_is_read(case, tmp_path, vision_dirs):
    """The dataset root does not exist: had anything read it, the error would be about the root."""
    folder = tmp_path / "model"
    shutil.copytree(vision_dirs["vit"], folder)
    args = ["extract", "--dataset", "cub", "--root", str(tmp_path / "no-such-root"), "--model", str(folder),
            "--block", "1", "--store", str(tmp_path / "s.zarr")]
    want = {"t given": r"--t 90 does not apply to .*: a vision model .* has no timestep; drop --t",
            "no weights": r"no weights \(model.safetensors or pytorch_model.bin\) beside config.json",
            "unsupported model_type": r"model_type 'siglip_vision_model', which diffeat does not take; supported "
                                      r"vision backbones: resnet, convnext, vit",
            "diffusion without t": r"give at least one --t: digits-ddpm is a pixel-unet diffusion model"}[case]
    if case == "t given":
        args += ["--t", "90"]
    elif case == "no weights":
        (folder / "model.safetensors").unlink()
    elif case == "unsupported model_type":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "siglip_vision_model"}))
    else:
        args[args.index(str(folder))] = "digits-ddpm"
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 1, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), out.output
    import re

    assert re.search(want, lines[0]), lines[0]
    assert not (tmp_path / "s.zarr").exists()


def test_blocks_command_prints_the_table():
    out = CliRunner().invoke(main, ["blocks", "--model", "random:resnet50"])
    assert out.exit_code == 0, out.output
    assert "random-resnet50 (vision): 5 blocks at 224 px" in out.output
    assert "encoder.stages.3" in out.output and "2048x7x7" in out.output
    rows = json.loads(CliRunner().invoke(main, ["blocks", "--model", "random:vit-b16", "--json"]).output)
    assert [r["block"] for r in rows] == list(range(13)) and rows[0]["module"] == "embeddings"


# -- end to end -----------------------------------------------------------------------------------------------------


def test_a_baseline_and_a_diffusion_model_in_one_store_one_cka_and_a_probe_each(tmp_path, vision_dirs,
                                                                                tiny_model_dir):
    from diffeat.cka import store_cka
    from diffeat.extract import extract
    from diffeat.probe import probe
    from diffeat.store import open_store

    store = str(tmp_path / "s.zarr")
    common = dict(dataset="digits", store=store, limit=40, batch_size=16, device="cpu", num_workers=0)
    resnet = str(vision_dirs["resnet"])
    base = extract(model=resnet, blocks=[1, 2, 4], pools=[1], **common)
    assert {s.outcome for s in base.settings} == {"written"} and {s.t for s in base.settings} == {None}
    extract(model=str(tiny_model_dir), blocks=[3, 8], ts=[90], pools=[1], **common)
    again = extract(model=resnet, blocks=[1, 2, 4], pools=[1], **common)
    assert {s.outcome for s in again.settings} == {"cached"} and again.forwards == 0

    fs = open_store(store)
    feats = fs.open_features(dataset="digits", split="test", block=2, pool=1, model="resnet")
    assert feats.info.label() == "b2/p1" and "/block2_pool1_" in feats.info.path
    settings = feats.attrs["settings"]
    assert "t" not in settings and "noise" not in settings
    assert settings["preprocess"] == load_model(resnet).model.preprocessing.identity()
    assert settings["family"]["family"] == "vision" and settings["family"]["architecture"] == "resnet"
    assert feats.attrs["model"]["preprocessing"]["processor"] == "ConvNextImageProcessor"
    # the stored features are the pooled hidden state of the model's own forward on its own preprocessing
    from transformers import AutoImageProcessor

    from diffeat.data import open_dataset

    table = open_dataset("digits").samples("test")
    pixels = AutoImageProcessor.from_pretrained(resnet)(table.load_image(5), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = load_model(resnet).unet(pixel_values=pixels, output_hidden_states=True).hidden_states[2]
    np.testing.assert_allclose(feats.array[5][:, 0, 0], hidden.mean((2, 3))[0].numpy(), rtol=2e-3, atol=2e-3)

    # one CKA matrix across both models: the U-Net's blocks (rows) against every stored ResNet block (columns)
    result = store_cka(store, "digits", "test", [f"model={tiny_model_dir},block=3,t=90,pool=1",
                                                 f"model={tiny_model_dir},block=8,t=90,pool=1"],
                       [f"model={resnet},block=*,pool=1"])
    assert result.matrix.shape == (2, 3) and np.isfinite(result.matrix).all()
    assert result.col_labels == ["resnet:b1/p1", "resnet:b2/p1", "resnet:b4/p1"]
    assert result.row_labels == ["tiny-unet:b3/t90/p1", "tiny-unet:b8/t90/p1"]
    assert sorted(result.models) == ["resnet", "tiny-unet"]

    # a probe on each model's settings
    for model, blocks, ts in ((resnet, [4], ()), ("tiny-unet", [8], (90,))):
        report = probe(store=store, dataset="digits", model=model, blocks=blocks, ts=ts,
                       out=str(tmp_path / "probe"), save_weights=True, device="cpu")
        (r,) = report.results
        assert r.block == blocks[0] and r.t == (ts[0] if ts else None) and 0 <= r.test["top1"] <= 1
    listed = CliRunner().invoke(main, ["ls", "--store", store])
    assert "b4/p1" in listed.output and "b8/t90/p1" in listed.output


def test_setting_names_and_ranges_without_t():
    from diffeat.cka.settings import SettingSpec
    from diffeat.store.layout import model_store_name, setting_label, setting_name

    assert setting_name(3, None, 2, "abcdef0123456") == "block3_pool2_abcdef0123"
    assert setting_name(24, 90, 1, "abcdef0123456") == "block24_t90_pool1_abcdef0123"  # unchanged
    assert setting_label(3, None, 1) == "b3/p1" and setting_label(24, 90, 1) == "b24/t90/p1"
    specs = SettingSpec.parse_all("model=random:resnet50,block=0-2,pool=1")
    assert [(s.block, s.t, s.pool, s.model) for s in specs] == [(b, None, 1, "random:resnet50") for b in range(3)]
    every = SettingSpec.parse("model=m,block=*,pool=1")
    assert every.all_blocks and every.block is None and str(every) == "block=*,pool=1,model=m"
    assert model_store_name("random:resnet50") == "random-resnet50"
    assert model_store_name("microsoft/resnet-50") == "microsoft--resnet-50"
    assert model_store_name("adm256") == "adm256"
