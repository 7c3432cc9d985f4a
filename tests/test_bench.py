"""``diffeat bench``: one run measures the forward, the whole extract loop and the naive baseline (no timed asserts)."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from diffeat.cli import main
from diffeat.errors import DiffeatError


def test_bench_json_on_cpu_reports_every_rate_and_ratio(tmp_path):
    result = CliRunner().invoke(main, [
        "bench", "--arch", "tiny", "--device", "cpu", "--block", "7", "--batch-size", "16", "--images", "48",
        "--warmup", "1", "--iters", "2", "--dtype", "bfloat16", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    assert (r["model"], r["block"], r["module"], r["block_shape"]) == ("random:tiny", 7, "mid_block", [64, 8, 8])
    assert (r["device"], r["dtype"], r["compiled"], r["batch_size"], r["micro_batch"]) == (
        "cpu", "bfloat16", False, 16, 8)
    # FLOPs are counted on the truncated forward: block 7 of 13 costs a fraction of the full forward.
    from diffeat.models.flops import count_flops
    from diffeat.models.loading import build_random

    assert r["gflop_per_image"] == count_flops(build_random("tiny"), 32, 7) / 1e9
    assert 0 < r["gflop_per_image"] < r["gflop_per_image_full"]
    rates = {k: r[k]["images_per_s"] for k in ("forward", "loop", "naive")}
    assert all(math.isfinite(v) and v > 0 for v in rates.values()), rates
    assert math.isclose(r["ratios"]["loop_over_forward"], rates["loop"] / rates["forward"])
    assert math.isclose(r["ratios"]["forward_over_naive"], rates["forward"] / rates["naive"])
    assert math.isclose(r["ratios"]["loop_over_naive"], rates["loop"] / rates["naive"])
    assert math.isclose(r["achieved_tflops"], r["gflop_per_image"] * rates["forward"] / 1e3)
    assert math.isclose(r["naive_tflops"], r["gflop_per_image_full"] * rates["naive"] / 1e3)
    # The loop is the real extract() over 48 JPEG files: 3 batches, truncated forward, nothing left out.
    assert r["images"] == 48 and r["loop"]["batches"] == 3 and r["loop"]["truncated"]
    assert r["naive"]["batch_size"] == 16 and r["peak_tflops"] is None and r["fraction_of_peak"] is None
    # bf16 autocast features agree with float32 per sample.
    assert r["cosine"]["samples"] == 16 and r["cosine"]["min"] >= 0.999 and r["cosine"]["passed"]


def test_bench_auto_batch_float32_and_ablation():
    from diffeat.extract.bench import bench
    from diffeat.cli.bench import format_result
    from diffeat.extract.forward import CPU_AUTO_BATCH

    r = bench(arch="tiny", device="cpu", block=3, images=40, warmup=0, iters=1, ablation=True,
              image_size=(40, 40))
    assert r["batch_size"] == CPU_AUTO_BATCH and r["dtype"] == "float32" and r["cosine"] is None
    assert r["images"] == 40 and r["image_size"] == [40, 40] and r["loop"]["batches"] == 2
    steps = [row["step"] for row in r["ablation"]]
    assert steps[0].startswith("naive") and steps[1].startswith("+ early exit") and len(steps) == 4
    assert r["ablation"][0]["images_per_s"] == r["naive"]["images_per_s"]
    assert r["ablation"][-1]["images_per_s"] == r["forward"]["images_per_s"]
    text = format_result(r)
    assert "whole extract loop" in text and "naive (full fp32 + hook)" in text and "early exit" in text


@pytest.mark.parametrize("args, match", [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "lots"], "'lots' is not an integer >= 1 or 'auto'"),
    (["--block", "14"], r"--block 14 does not exist"),
    (["--iters", "0"], "--iters 0 is invalid"),
    (["--image-size", "64"], "WIDTHxHEIGHT"),
])
def test_bench_bad_options_name_the_option(args, match):
    result = CliRunner().invoke(main, ["bench", "--arch", "tiny", "--device", "cpu", *args])
    assert result.exit_code in (1, 2), result.output
    assert match.replace("\\", "") in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("value", [0, -3, "lots", 2.5, True])
def test_extract_batch_size_is_an_integer_or_auto(value, store_path):
    from diffeat.extract import extract

    with pytest.raises(DiffeatError, match=r"--batch-size .* integer >= 1 or 'auto'"):
        extract(dataset="digits", model="random:tiny", blocks=[3], ts=[90], store=store_path, limit=4,
                device="cpu", batch_size=value)
