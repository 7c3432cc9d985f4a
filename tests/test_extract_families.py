"""Extraction from every model family end to end: tiny real pipeline folders, real stores, probe, CKA, pipelines.

References are computed with diffusers' own pieces (the pipeline's VAE, scheduler, ``encode_prompt`` and the
model's own forward), never with diffeat's.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from click.testing import CliRunner

from diffeat.cli import main
from diffeat.data import open_dataset, preprocess
from diffeat.errors import DiffeatError
from diffeat.extract import extract
from diffeat.models.noise import sample_noise
from diffeat.store import open_store

FIXTURE = Path(__file__).parent / "fixtures" / "store_before_families.tar.gz"


def arrays(store: str) -> dict[str, tuple[str, bytes]]:
    """Every feature array of a store: path -> (settings hash, bytes)."""
    fs = open_store(store)
    out = {}
    for s in fs.list_settings():
        array = zarr.open_array(store=fs.root.store, path=s.path)
        out[s.path] = (dict(array.attrs)["diffeat"]["settings_hash"], np.asarray(array[:]).tobytes())
    return out


def _hooked(module: torch.nn.Module, index: int = 0):
    seen = []
    handle = module.register_forward_hook(lambda _m, _a, out: seen.append(out[index] if isinstance(out, tuple)
                                                                            else out))
    return seen, handle


def _by_hand(pipe_cls, folder: Path, row: int, t: int, block_module: str, pool: int, run) -> np.ndarray:
    """Pooled block of one digits test image: preprocess -> the pipeline's VAE (posterior mean x scaling) ->
    diffusers' DDPMScheduler.add_noise with diffeat's per-sample noise -> the model's own forward, hooked."""
    from diffusers import DDPMScheduler

    pipe = pipe_cls.from_pretrained(folder, local_files_only=True)
    table = open_dataset("digits").samples("test")
    x0 = torch.from_numpy(preprocess(table.load_image(row), 64))[None]
    with torch.no_grad():
        latents = pipe.vae.encode(x0).latent_dist.mean * pipe.vae.config.scaling_factor
        eps = sample_noise(table.ids[row], t, tuple(latents.shape[1:]))[None]
        xt = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, eps, torch.tensor([t]))
        return run(pipe, xt, dict(pipe.transformer.named_modules() if hasattr(pipe, "transformer")
                                  else pipe.unet.named_modules())[block_module], pool)


def test_latent_unet_features_are_the_pooled_block_of_the_noised_latents(pipeline_dirs, store_path):
    from diffusers import StableDiffusionPipeline

    report = extract(dataset="digits", model=str(pipeline_dirs["sd"]), blocks=[5], ts=[90], pools=[2],
                     store=store_path, splits=["test"], limit=6, batch_size=4, device="cpu", num_workers=0,
                     store_dtype="float32")
    assert [s.outcome for s in report.settings] == ["written"]
    feats = open_store(store_path).open_features(dataset="digits", split="test", block=5, t=90, pool=2)
    assert feats.array.shape == (6, 64, 2, 2)

    def run(pipe, xt, module, pool):
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt("", "cpu", 1, False)
            seen, handle = _hooked(module)
            pipe.unet(xt, 90, encoder_hidden_states=embeds)
            handle.remove()
        return F.adaptive_avg_pool2d(seen[0], pool)[0].numpy()

    want = _by_hand(StableDiffusionPipeline, pipeline_dirs["sd"], 3, 90, feats.attrs["block_info"]["module"], 2, run)
    np.testing.assert_allclose(feats.array[3], want, rtol=1e-4, atol=1e-5)
    settings = feats.attrs["settings"]
    assert settings["family"]["family"] == "latent-unet" and settings["family"]["input"] == "latents"
    assert settings["noise"]["schedule"] == "scaled_linear 0.00085..0.012, 1000 steps"
    assert feats.attrs["model"]["conditioning"]["encoders"][0]["class"] == "CLIPTextModel"


def test_dit_features_are_the_pooled_tokens_on_the_patch_grid(pipeline_dirs, store_path):
    from diffusers import DiTPipeline

    extract(dataset="digits", model=str(pipeline_dirs["dit"]), blocks=[0, 2], ts=[500], pools=[1, 4],
            store=store_path, splits=["test"], limit=5, batch_size=4, device="cpu", num_workers=0,
            store_dtype="float32")
    feats = open_store(store_path).open_features(dataset="digits", split="test", block=2, t=500, pool=4)
    assert feats.array.shape == (5, 16, 4, 4) and feats.attrs["block_info"]["module"] == "transformer_blocks.1"

    def run(pipe, xt, module, pool):
        null = pipe.transformer.config.num_embeds_ada_norm  # the classifier-free-guidance row (1000 on ImageNet)
        with torch.no_grad():
            seen, handle = _hooked(module)
            pipe.transformer(xt, timestep=torch.tensor([500]), class_labels=torch.tensor([null]))
            handle.remove()
        tokens = seen[0]  # (1, h*w, C), row-major over the patch grid
        grid = tokens.reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        return F.adaptive_avg_pool2d(grid, pool)[0].numpy()

    want = _by_hand(DiTPipeline, pipeline_dirs["dit"], 1, 500, "transformer_blocks.1", 4, run)
    np.testing.assert_allclose(feats.array[1], want, rtol=1e-4, atol=1e-5)
    assert feats.attrs["settings"]["family"]["conditioning"]["class_label"] == 10


def test_latent_features_do_not_depend_on_the_batch_size(pipeline_dirs, tmp_path):
    kwargs = dict(dataset="digits", model=str(pipeline_dirs["sdxl"]), blocks=[3, 6], ts=[50, 700], pools=[1],
                  splits=["test"], limit=11, device="cpu", num_workers=0, noise_draws=2)
    extract(store=str(tmp_path / "a.zarr"), batch_size=3, **kwargs)
    extract(store=str(tmp_path / "b.zarr"), batch_size=16, **kwargs)
    a, b = arrays(str(tmp_path / "a.zarr")), arrays(str(tmp_path / "b.zarr"))
    assert len(a) == 4 and a == b


def test_a_store_written_before_model_families_is_reused_as_cached(tmp_path):
    """The fixture was written by diffeat at 8ee3ca5 (before model families): digits, random:tiny, blocks 3 and 7."""
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    old = str(tmp_path / "fixture_store.zarr")
    before = arrays(old)
    kwargs = dict(dataset="digits", model="random:tiny", blocks=[3, 7], ts=[90], pools=[1, 2], splits=["test"],
                  limit=8, batch_size=8, device="cpu", num_workers=0, store_dtype="float16")
    again = extract(store=old, **kwargs)
    assert [s.outcome for s in again.settings] == ["cached"] * 4 and again.forwards == 0
    assert arrays(old) == before
    fresh = str(tmp_path / "fresh.zarr")
    extract(store=fresh, **kwargs)
    assert arrays(fresh) == before  # same array paths (they carry the settings hash), hashes and bytes
    fs = open_store(fresh)
    settings = fs.open_features(dataset="digits", split="test", block=3, t=90, pool=1).attrs["settings"]
    assert "family" not in settings and settings["noise"]["schedule"] == "linear 1e-4..0.02, 1000 steps"


def test_sd_through_probe_and_cka_by_the_demo_pipeline(pipeline_dirs, tmp_path):
    from diffeat.pipelines import load_pipeline, run_pipeline

    out = tmp_path / "sd"
    values = {"out": str(out), "model": str(pipeline_dirs["sd"]), "blocks": [5, 8], "ts": [50],
              "defaults.limit": 48, "probe.recipe": "paper", "probe.min_steps": 20, "probe.lr": [0.1],
              "probe.wd": [0.0]}
    report = run_pipeline(load_pipeline("demo", values, environ={}))
    assert [s.status for s in report.stages] == ["ran"] * 6
    cka = np.load(out / "cka.npy")
    assert cka.shape == (2, 2) and np.allclose(np.diag(cka), 1)
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) > 1 and "sd" in (out / "summary.md").read_text()


def test_dit_through_the_cli_extract_probe_and_cka(pipeline_dirs, tmp_path):
    store = str(tmp_path / "feats.zarr")
    runner = CliRunner()
    res = runner.invoke(main, ["extract", "--dataset", "digits", "--model", str(pipeline_dirs["dit"]),
                               "--block", "0", "--block", "3", "--t", "90", "--pool", "1", "--limit", "40",
                               "--store", store, "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert {(s["block"], s["outcome"]) for s in json.loads(res.stdout)["settings"] if s["split"] == "test"} == {
        (0, "written"), (3, "written")}
    res = runner.invoke(main, ["probe", "--store", store, "--dataset", "digits", "--block", "0", "--block", "3",
                               "--t", "90", "--pool", "1", "--head", "linear", "--min-steps", "10",
                               "--out", str(tmp_path / "probe"), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    results = json.loads(res.stdout)
    assert sorted(r["block"] for r in results) == [0, 3] and all(0 <= r["top1"] <= 1 for r in results)
    res = runner.invoke(main, ["cka", "--store", store, "--dataset", "digits", "--split", "test", "--blocks", "0,3",
                               "--t", "90", "--pool", "1", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["labels"] == ["b0/t90/p1", "b3/t90/p1"] and np.allclose(np.diag(np.array(doc["matrix"])), 1)
    res = runner.invoke(main, ["blocks", "--model", str(pipeline_dirs["dit"]), "--json"])
    assert res.exit_code == 0, res.output
    assert [b["block"] for b in json.loads(res.stdout)] == [0, 1, 2, 3]


@pytest.mark.slow
def test_a_dask_cluster_writes_the_same_latent_features(pipeline_dirs, tmp_path):
    kwargs = dict(dataset="digits", model=str(pipeline_dirs["sd3"]), blocks=[1], ts=[90], pools=[1, 2],
                  splits=["test"], limit=24, batch_size=8, device="cpu", chunk_rows=8)
    extract(store=str(tmp_path / "one.zarr"), num_workers=0, **kwargs)
    report = extract(store=str(tmp_path / "dask.zarr"), workers=2, **kwargs)
    assert report.workers and arrays(str(tmp_path / "one.zarr")) == arrays(str(tmp_path / "dask.zarr"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(resolution=72), r"--resolution 72 does not fit this model: it must be a positive multiple of 16"),
    (dict(blocks=[4]), r"--block 4 does not exist: this model has blocks 0\.\.3"),
    (dict(pools=[8]), r"--pool 8 is larger than block 2's 4x4 map"),
])
def test_bad_options_are_refused_before_any_image_is_read(pipeline_dirs, store_path, kwargs, match):
    options = dict(dataset="digits", model=str(pipeline_dirs["dit"]), blocks=[2], ts=[90], store=store_path,
                   limit=4, device="cpu") | kwargs
    with pytest.raises(DiffeatError, match=match):
        extract(**options)
    assert not any(Path(store_path).glob("features/*"))


def test_bench_runs_a_latent_transformer_and_counts_its_vae(tmp_path):
    from diffeat.cli.bench import format_result
    from diffeat.extract.bench import bench
    from diffeat.models.flops import count_model_flops, count_vae_flops
    from diffeat.models.loading import load_model

    r = bench(arch="tiny-dit", device="cpu", images=16, batch_size=8, warmup=0, iters=1, image_size=(80, 60))
    model = load_model("random:tiny-dit", device="meta").model
    assert (r["family"], r["block"], r["module"], r["block_shape"]) == ("dit", 2, "transformer_blocks.1", [16, 4, 4])
    assert r["gflop_per_image"] == count_model_flops(model, 64, 2) / 1e9 < r["gflop_per_image_full"]
    assert r["gflop_per_image_vae"] == count_vae_flops(model, 64) / 1e9 > 0
    assert r["loop"]["batches"] == 2 and r["loop"]["truncated"] and r["naive"]["images_per_s"] > 0
    assert "VAE encoder (in the loop only)" in format_result(r)


@pytest.mark.parametrize("name, arch, expect", [
    ("sd21_fgvc", "sd21-unet", {19: "up_blocks.1", 13: "mid_block"}),  # DIFT's up_ft_index=1, the middle block
    ("dit_imagenet50", "dit-xl2", {14: "transformer_blocks.13", 28: "transformer_blocks.27"}),
])
def test_the_family_pipelines_name_blocks_their_models_have(name, arch, expect):
    from diffeat.models.families.base import block_info, check_table_blocks
    from diffeat.models.loading import load_model
    from diffeat.pipelines import load_pipeline

    path = Path(__file__).resolve().parent.parent / "pipelines" / f"{name}.yaml"
    nulls = {k: f"/dummy/{k}" for k, v in load_pipeline(path, environ={}).variables.items() if v is None}
    extracts = [i.arguments() for i in load_pipeline(path, nulls, environ={}).instances() if i.kind.name == "extract"]
    assert extracts
    table = load_model(f"random:{arch}", device="meta").model.block_table(extracts[0].get("resolution"))
    for args in extracts:
        check_table_blocks(args["blocks"], table)
    for block, module in expect.items():
        assert block_info(table, block).module == module
