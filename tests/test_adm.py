"""ADM conversion, proven against guided-diffusion's own UNetModel (the oracle).

Every test builds real guided-diffusion models (reduced width), randomises every
weight (including the zero-initialised output convs, which would otherwise hide
wrong mappings), saves them with torch.save and converts them through the real
code path.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

with warnings.catch_warnings():  # guided-diffusion uses deprecated torch.cuda.amp decorators
    warnings.simplefilter("ignore", FutureWarning)
    from guided_diffusion.script_util import create_gaussian_diffusion, create_model
    from guided_diffusion.unet import UNetModel

from diffeat.cli.convert_adm import convert_adm
from diffeat.errors import ModelError
from diffeat.models.adm import (
    CONVERSION_FILE,
    build_unet,
    convert_adm_checkpoint,
    convert_adm_state_dict,
    infer_adm_config,
    read_conversion_record,
)
from diffeat.models.blocks import block_table, capture_blocks
from diffeat.models.flops import count_flops, count_parameters
from diffeat.models.loading import ARCHITECTURES, load_model
from diffeat.models.noise import q_sample

TOL = 1e-5  # max |diffusers - guided-diffusion| / max |guided-diffusion|, per block
T = torch.tensor([0, 90, 150, 999])  # one timestep per sample: several t in one forward


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small models on a shared 2-core machine: OpenMP threads that spin-wait under contention
    made this module 5x slower (46 s vs 8 s measured), so run it single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Give every parameter a random, non-degenerate value (norm scales near 1)."""
    gen = torch.Generator().manual_seed(seed)
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.GroupNorm)}
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() > 1:
                p.copy_(noise * p[0].numel() ** -0.5)
            elif id(p) in norm_weights:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    assert all(p.abs().sum() > 0 for p in model.parameters())
    return model.eval()


def adm_mini() -> UNetModel:
    """The ADM-256 layout (README flags) at 1/8 width and 64 px: 37 blocks, 4-8 heads per attention."""
    model = create_model(
        image_size=64,
        num_channels=32,
        num_res_blocks=2,
        channel_mult="1,1,2,2,4,4",
        learn_sigma=True,
        attention_resolutions="8,4,2",  # ds 8, 16, 32, as 32,16,8 at 256 px
        num_head_channels=16,
        resblock_updown=True,
        use_scale_shift_norm=True,
    )
    return randomize(model, seed=1)


def other_layout() -> UNetModel:
    """Class-conditional, conv resampling, no scale-shift, eps only, 1 res block, new attention order."""
    model = create_model(
        image_size=32,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2,2",
        class_cond=True,
        attention_resolutions="16,8",  # ds 2 and 4: levels 1 and 2
        num_head_channels=8,
        use_new_attention_order=True,
    )
    return randomize(model, seed=2)


def gd_blocks(model: UNetModel, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
    """Every block's output (1-based, the paper's numbering) and the final output of guided-diffusion."""
    modules = [*model.input_blocks, model.middle_block, *model.output_blocks]
    acts: dict[int, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, out, k=k: acts.__setitem__(k, out)) for k, m in enumerate(modules, 1)
    ]
    try:
        with torch.no_grad():
            out = model(x, t, y)
    finally:
        for h in handles:
            h.remove()
    return acts, out


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape
    return ((got - ref).abs().max() / ref.abs().max()).item()


def compare(gd: UNetModel, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
    """Worst per-block and output relative error of ``unet`` (diffusers) vs ``gd``, and the block count."""
    ref_blocks, ref_out = gd_blocks(gd, x, t, y)
    extra = {} if y is None else {"class_labels": y}
    with torch.no_grad():
        got = capture_blocks(unet, x, t, list(ref_blocks), **extra)
        out = unet(x, t, **extra).sample
    assert sorted(got) == sorted(ref_blocks)
    return max(rel_err(got[k], ref_blocks[k]) for k in ref_blocks), rel_err(out, ref_out), len(got)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """(guided-diffusion model, checkpoint path, converted folder) for the ADM-256 layout."""
    root = tmp_path_factory.mktemp("adm_mini")
    gd = adm_mini()
    ckpt = root / "mini.pt"
    torch.save(gd.state_dict(), ckpt)
    out = convert_adm_checkpoint(ckpt, root / "converted", image_size=64, num_head_channels=16)
    return gd, ckpt, out


def test_adm_layout_matches_guided_diffusion_at_every_block(mini):
    from diffusers import UNet2DModel

    gd, _, out = mini
    unet = UNet2DModel.from_pretrained(str(out), low_cpu_mem_usage=False).eval()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    worst_block, worst_out, n = compare(gd, unet, x, T)
    assert n == 37
    assert worst_block < TOL and worst_out < TOL
    # a plain int t (one timestep for the batch) goes through the same path
    worst_block, worst_out, _ = compare(gd, unet, x[:2], torch.tensor([90, 90]))
    assert worst_block < TOL and worst_out < TOL
    # the paper's block 24 is output_blocks[4] = up_blocks[1].attentions[1], 8x the base width, 1/16 resolution
    info = block_table(unet)[23]
    assert (info.adm_name, info.module) == ("output_blocks.4", "up_blocks.1.attentions.1")
    assert (info.channels, info.height) == (128, 4)


def test_converted_folder_loads_with_diffusers_and_diffeat(mini):
    from diffusers import UNet2DModel

    gd, ckpt, out = mini
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    # Frozen like diffeat's copy: on CPU, torch picks other kernels for parameters that require grad
    # (measured 1.2e-6 apart with diffusers 0.42), even under no_grad.
    plain = UNet2DModel.from_pretrained(str(out), low_cpu_mem_usage=False).eval().requires_grad_(False)
    loaded = load_model(str(out))
    assert loaded.resolution == 64 and loaded.unet.dtype == torch.float32
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(plain(x, 90).sample, loaded.unet(x, 90).sample)
    record = read_conversion_record(out)
    assert record["source"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert record["parameters"] == sum(p.numel() for p in gd.parameters())
    assert record["guided_diffusion_args"]["attention_ds"] == [8, 16, 32]
    assert record["guided_diffusion_args"]["attention_resolutions"] == "8,4,2"  # create_model's flag at 64 px
    assert record["qkv_order"].startswith("legacy")
    # a second conversion into the same folder must be asked for
    with pytest.raises(ModelError, match="not empty"):
        convert_adm_checkpoint(ckpt, out, image_size=64, num_head_channels=16)


def test_plain_chunk_split_of_legacy_qkv_is_wrong(mini):
    """The trap: diffusers' consistency-model converter splits qkv with chunk(3); for ADM that is a different net."""
    gd, _, _ = mini
    sd = gd.state_dict()
    config = infer_adm_config(sd, 64, 16)
    wrong = build_unet(config, convert_adm_state_dict(sd, config, legacy_attention=False))
    right = build_unet(config, convert_adm_state_dict(sd, config, legacy_attention=True))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([90, 150])
    _, right_out, _ = compare(gd, right, x, t)
    worst_block, wrong_out, _ = compare(gd, wrong, x, t)
    assert right_out < TOL
    assert worst_block > 0.1 and wrong_out > 1e-2


def test_other_layout_class_conditional_new_attention_order(tmp_path):
    gd = other_layout()
    ckpt = tmp_path / "cond.pt"
    torch.save(gd.state_dict(), ckpt)
    out = convert_adm_checkpoint(ckpt, tmp_path / "out", image_size=32, num_head_channels=8, legacy_attention=False)
    unet = load_model(str(out)).unet
    assert unet.config.num_class_embeds == 1000 and unet.config.resnet_time_scale_shift == "default"
    assert unet.config.down_block_types == ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 3, 500, 999])
    worst_block, worst_out, n = compare(gd, unet, x, T, y)
    assert n == 13  # 2 * 3 levels * (1 + 1) + 1
    assert worst_block < TOL and worst_out < TOL
    # the legacy order is wrong for this model (the flag matters both ways)
    sd = gd.state_dict()
    config = infer_adm_config(sd, 32, 8)
    wrong = build_unet(config, convert_adm_state_dict(sd, config, legacy_attention=True))
    assert compare(gd, wrong, x, T, y)[1] > 1e-2


def test_fp16_checkpoint_is_written_as_fp32(tmp_path):
    from safetensors import safe_open

    gd = other_layout()
    ckpt = tmp_path / "half.pt"
    torch.save({k: v.half() for k, v in gd.state_dict().items()}, ckpt)
    out = convert_adm_checkpoint(ckpt, tmp_path / "out", image_size=32, num_head_channels=8, legacy_attention=False)
    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert read_conversion_record(out)["source"]["dtypes"] == ["float16"]
    # the oracle holds the same half-rounded weights, in fp32
    gd.load_state_dict({k: v.half().float() for k, v in gd.state_dict().items()})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    _, worst_out, _ = compare(gd, load_model(str(out)).unet, x, T[:2], torch.tensor([1, 2]))
    assert worst_out < TOL


def test_full_width_adm256_config_parameters_and_flops():
    """The real ADM-256 uncond layout (README flags), built on the meta device: no memory, no weights."""
    with torch.device("meta"):
        gd = create_model(
            image_size=256,
            num_channels=256,
            num_res_blocks=2,
            learn_sigma=True,
            attention_resolutions="32,16,8",
            num_head_channels=64,
            resblock_updown=True,
            use_scale_shift_norm=True,
        )
    sd = gd.state_dict()
    assert len(sd) == 566
    config = infer_adm_config(sd)
    assert {k: config[k] for k in ARCHITECTURES["adm256"]} == ARCHITECTURES["adm256"]
    converted = convert_adm_state_dict(sd, config)
    assert len(converted) == 630  # 16 attention layers: qkv -> to_q, to_k, to_v
    unet = build_unet(config, converted)  # strict load on meta
    assert count_parameters(unet) == sum(p.numel() for p in gd.parameters()) == 552_814_086
    assert count_parameters(unet, block=24) == 415_471_616
    full, b24 = count_flops(unet, 256), count_flops(unet, 256, block=24)
    assert abs(full / 1e9 - 2239.7) < 1.0  # = 1119.8 GMAC, DiT's ~1120 "Gflops" for ADM
    assert abs(b24 / 1e9 - 639.3) < 1.0
    assert count_flops(unet, 256, block=19) < b24 < count_flops(unet, 256, block=25) < full


def test_q_sample_matches_guided_diffusion():
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    gen = torch.Generator().manual_seed(5)
    x0 = torch.rand(6, 3, 8, 8, generator=gen) * 2 - 1
    eps = torch.randn(6, 3, 8, 8, generator=gen)
    t = torch.tensor([0, 1, 90, 150, 500, 999])
    ref = diffusion.q_sample(x0, t, noise=eps)
    assert ref.dtype == torch.float32
    torch.testing.assert_close(q_sample(x0, eps, t), ref, rtol=0, atol=1e-6)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(q_sample(x0[i : i + 1], eps[i : i + 1], ti), ref[i : i + 1], rtol=0, atol=1e-6)


class _RunsCode:
    """A pickled object whose unpickling would write a marker file (it must never run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_refuses_files_that_are_not_adm_state_dicts(tmp_path):
    from diffusers import UNet2DModel

    # a pickle holding a class: weights_only refuses it, nothing is executed
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": _RunsCode(marker)}, evil)
    with pytest.raises(ModelError, match=r"evil\.pt.*weights_only=True"):
        convert_adm_checkpoint(evil, tmp_path / "o1")
    assert not marker.exists()

    # a state dict of another architecture
    other = tmp_path / "diffusers.pt"
    torch.save(UNet2DModel(**ARCHITECTURES["tiny"]).state_dict(), other)
    with pytest.raises(ModelError, match=r"diffusers\.pt.*not a guided-diffusion UNetModel"):
        convert_adm_checkpoint(other, tmp_path / "o2")

    # not a dict of tensors / not a torch file at all
    torch.save({"step": 3, "w": torch.zeros(1)}, tmp_path / "mixed.pt")
    with pytest.raises(ModelError, match=r"mixed\.pt.*'step' is of type int"):
        convert_adm_checkpoint(tmp_path / "mixed.pt", tmp_path / "o3")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ModelError, match=r"text\.pt"):
        convert_adm_checkpoint(tmp_path / "text.pt", tmp_path / "o4")
    assert not any(p.name.startswith(("o", ".o")) for p in tmp_path.iterdir())


def test_refuses_layouts_unet2dmodel_cannot_express(tmp_path):
    # ADM-512 style: channel_mult[0] = 0.5
    half = UNetModel(
        image_size=32,
        in_channels=3,
        model_channels=64,
        out_channels=3,
        num_res_blocks=1,
        attention_resolutions=(4,),
        channel_mult=(0.5, 1, 2),
        num_head_channels=32,
    )
    ckpt = tmp_path / "adm512like.pt"
    torch.save(half.state_dict(), ckpt)
    with pytest.raises(ModelError, match=r"adm512like\.pt.*channel_mult\[0\]"):
        convert_adm_checkpoint(ckpt, tmp_path / "o", image_size=32, num_head_channels=32)
    # heads that do not divide the attention width, and per-level heads (--num_heads)
    sd = create_model(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2").state_dict()
    with pytest.raises(ModelError, match="num_head_channels=48"):
        infer_adm_config(sd, 32, 48)
    with pytest.raises(ModelError, match="head width per level"):
        infer_adm_config(sd, 32, -1)


def test_cli_convert_adm(tmp_path):
    gd = other_layout()
    ckpt = tmp_path / "cond.pt"
    torch.save(gd.state_dict(), ckpt)
    runner = CliRunner()
    args = [str(ckpt), str(tmp_path / "out"), "--image-size", "32", "--num-head-channels", "8"]
    result = runner.invoke(convert_adm, [*args, "--new-attention-order", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["output_dir"] == str(tmp_path / "out")
    assert record["qkv_order"].startswith("new")
    assert (tmp_path / "out" / CONVERSION_FILE).is_file()
    # user errors surface as ModelError, which the `diffeat` group prints as one line
    again = runner.invoke(convert_adm, args)
    assert isinstance(again.exception, ModelError) and "not empty" in str(again.exception)
