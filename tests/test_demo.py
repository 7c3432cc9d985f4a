"""The built-in digits-ddpm model is real and reproducible, and `diffeat demo` writes its report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from diffeat.models.loading import (
    BUILTIN_MODELS,
    build_random,
    load_model,
)

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "diffeat" / "weights" / "digits-ddpm"


@pytest.fixture(autouse=True)
def one_thread():
    """The 8-px model is tiny: one thread is as fast, and two stall when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _script():
    spec = importlib.util.spec_from_file_location("train_digits_ddpm", REPO / "scripts" / "train_digits_ddpm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_builtin_weights_are_small_safetensors_of_the_declared_architecture():
    assert BUILTIN_MODELS["digits-ddpm"] == "digits-ddpm"
    files = {p.name for p in WEIGHTS.iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in files)
    assert sum(p.stat().st_size for p in WEIGHTS.iterdir()) < 5_000_000
    loaded = load_model("digits-ddpm")
    assert (loaded.name, loaded.resolution) == ("digits-ddpm", 8)
    # random:digits-ddpm is exactly this network with other weights: the baseline compares like with like.
    def plain(config) -> dict:  # tuples (in code) and lists (from JSON) compare equal
        return {k: v for k, v in json.loads(json.dumps(dict(config))).items() if not k.startswith("_")}

    assert plain(loaded.unet.config) == plain(build_random("digits-ddpm").config)
    record = json.loads((WEIGHTS / "training.json").read_text())
    assert record["weights_sha256"] == loaded.weights_sha256


@torch.inference_mode()
def test_trained_model_predicts_the_noise_on_unseen_digits():
    """On TEST images (never trained on), the epsilon error is far below a random network's and below 1
    (the error of always predicting 0): the weights learned to denoise digits."""
    from diffeat.data import open_dataset, preprocess
    from diffeat.models.noise import q_sample

    table = open_dataset("digits").samples("test")
    x0 = torch.from_numpy(np.stack([preprocess(table.load_image(i), 8) for i in range(64)]))
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(x0.shape, generator=gen)
    errors = {}
    for spec in ("digits-ddpm", "random:digits-ddpm"):
        unet = load_model(spec).unet
        errors[spec] = {t: float(((unet(q_sample(x0, eps, t), torch.full((64,), t)).sample - eps) ** 2).mean())
                        for t in (50, 400)}
    assert errors["digits-ddpm"][50] < 0.35 and errors["digits-ddpm"][400] < 0.1, errors
    assert min(errors["random:digits-ddpm"].values()) > 0.8, errors


def test_training_script_is_seeded(tmp_path):
    """Two short runs with one seed give bitwise the same weights; another seed does not."""
    script = _script()
    digests = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / run
        assert script.main(["--steps", "3", "--batch-size", "8", "--warmup", "2", "--num-samples", "0",
                            "--log-every", "3", "--seed", str(seed), "--out", str(out)]) == 0
        digests.append(json.loads((out / "training.json").read_text())["weights_sha256"])
        assert (out / "diffusion_pytorch_model.safetensors").is_file()
    assert digests[0] == digests[1] != digests[2]


def test_ddpm_sampler_and_grid(tmp_path):
    script = _script()
    unet = load_model("digits-ddpm").unet
    x = script.ddpm_sample(unet, 4, 8, seed=0, steps=25)
    assert x.shape == (4, 3, 8, 8) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert torch.equal(x, script.ddpm_sample(unet, 4, 8, seed=0, steps=25))
    # Digits are strokes on a black background: most pixels of a sample are near -1, as in the data.
    assert float((x < -0.8).float().mean()) > 0.4
    script.save_grid(x, x, tmp_path / "g.png")
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size[0] > 0


def test_run_demo_writes_a_report_and_reuses_it(tmp_path):
    from diffeat.pipelines.demo import run_demo

    overrides = {"blocks": [4, 9], "ts": [50, 150], "defaults.limit": 150}
    result = run_demo(tmp_path / "d", overrides=overrides)
    summary = result.summary.read_text()
    assert result.best["block"] in (4, 9) and result.best["t"] in (50, 150) and 0.5 < result.best["test"] <= 1
    assert f"**Best: block {result.best['block']}" in summary and "![CKA](cka.png)" in summary
    for name in ("accuracy.png", "cka.png", "results.csv", "features.zarr"):
        assert (tmp_path / "d" / name).exists(), name
    rows = (tmp_path / "d" / "results.csv").read_text().splitlines()
    assert rows[0].startswith("dataset,model,head,pool,block,t,test_top1") and len(rows) == 1 + 4
    again = run_demo(tmp_path / "d", overrides=overrides)
    assert {s.status for s in again.report.stages} == {"skipped"} and again.best == result.best


def test_demo_command_help_and_option_check():
    from diffeat.cli.demo import demo

    assert "summary.md" in CliRunner().invoke(demo, ["--help"]).output
    bad = CliRunner().invoke(demo, ["--threads", "0"])
    assert bad.exit_code == 2 and "--threads" in bad.output


@pytest.mark.parametrize("name", ["run", "demo"])
def test_commands_import_nothing_heavy_at_module_level(name):
    import subprocess
    import sys

    code = (f"import sys; import diffeat.cli.{name}\n"
            "print(','.join(m for m in ('torch', 'diffusers', 'zarr', 'sklearn', 'yaml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
