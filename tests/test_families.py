"""Model families on real tiny pipeline folders: truncated forwards, conditioning, latents, block numbering.

Every reference comes from the library that defines the model: the model's own forward (hooked),
diffusers' own pipelines (``encode_prompt``), diffusers' own VAE.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from diffeat.errors import DiffeatError, ModelError
from diffeat.models.families import FAMILIES, family_for
from diffeat.models.families.base import tokens_to_grid
from diffeat.models.loading import load_model

#: pipeline -> (family, blocks in its table, a middle block)
EXPECTED = {"sd": ("latent-unet", 9, 5), "sdxl": ("latent-unet", 9, 5), "dit": ("dit", 4, 2),
            "pixart": ("pixart", 3, 1), "sd3": ("sd3", 3, 1)}


@pytest.fixture(scope="session")
def loaded(pipeline_dirs):
    return {name: load_model(str(path)) for name, path in pipeline_dirs.items()}


def _hook_all(model, table):
    """Forward hooks on every block's module of the model's own forward: {block: output tokens or map}."""
    modules = dict(model.denoiser.named_modules())
    seen: dict[int, torch.Tensor] = {}

    def grab(index):
        def hook(_m, _a, out):
            if isinstance(out, tuple):  # SD3 joint blocks return (text stream, image stream); U-Net attns (h,)
                out = out[1] if model.family == "sd3" else out[0]
            seen[index] = out

        return hook

    return seen, [modules[b.module].register_forward_hook(grab(b.index)) for b in table]


def _inputs(model, batch=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.input_shape(model.native_resolution), generator=gen)
    return x, torch.tensor([0, 90, 999][:batch])


@pytest.mark.parametrize("name", list(EXPECTED))
def test_truncated_forward_is_bitwise_the_models_own_forward(name, loaded):
    model = loaded[name].model
    family, n_blocks, _ = EXPECTED[name]
    assert model.family == family
    table = model.block_table()
    assert [b.index for b in table] == list(range(model.first_block, model.first_block + n_blocks))
    x, t = _inputs(model)
    seen, handles = _hook_all(model, table)
    try:
        with torch.no_grad():
            model.full_forward(x, t)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        every = model.feature_forward([b.index for b in table])(x, t)
        singles = {b.index: model.feature_forward([b.index])(x, t)[b.index] for b in table}
    for b in table:
        ref = seen[b.index]
        for got in (every[b.index], singles[b.index]):
            assert tuple(got.shape) == (3, b.channels, b.height, b.width), b
            if model.first_block == 0:  # transformers: compare the tokens the model itself computed
                got = got.flatten(2).transpose(1, 2)
            assert torch.equal(got, ref), f"{name} block {b.index}"


@pytest.mark.parametrize("name", list(EXPECTED))
def test_nothing_after_the_deepest_block_runs(name, loaded):
    model = loaded[name].model
    _, _, middle = EXPECTED[name]
    table = {b.index: b.module for b in model.block_table()}
    names = {m: n for n, m in model.denoiser.named_modules()}
    calls: list[str] = []
    handles = [m.register_forward_pre_hook(lambda m, a: calls.append(names[m])) for m in model.denoiser.modules()
               if not any(True for _ in m.children())]
    x, t = _inputs(model, 2)
    try:
        with torch.no_grad():
            model.feature_forward([middle])(x, t)
    finally:
        for h in handles:
            h.remove()
    later = [module for index, module in table.items() if index > middle]
    heads = ["conv_norm_out", "conv_out", "norm_out", "proj_out", "proj_out_1", "proj_out_2"]
    ran_later = [c for c in calls if any(c == m or c.startswith(m + ".") for m in later + heads)]
    if model.family == "latent-unet":  # the last block of a U-Net level is its whole up block: allow its prefix
        ran_later = [c for c in ran_later if not any(c.startswith(table[i] + ".") for i in table if i <= middle)]
    assert ran_later == [] and calls, (name, ran_later[:5])


def test_tokens_map_to_the_patch_grid_row_major():
    """Block 0 of a DiT is the patch embedding: a lone non-zero patch shows up at its own (row, column)."""
    model = load_model("random:tiny-dit").model
    with torch.no_grad():
        model.denoiser.pos_embed.proj.bias.zero_()
        model.denoiser.pos_embed.pos_embed.zero_()
    x = torch.zeros(1, 4, 8, 8)
    x[:, :, 2:4, 6:8] = 1.0  # latent rows 2-3, columns 6-7 = patch row 1, column 3 of the 4x4 grid
    with torch.no_grad():
        grid = model.feature_forward([0])(x, torch.tensor([5]))[0]
    assert grid.shape == (1, 16, 4, 4)
    nonzero = (grid.abs().sum(1)[0] > 0).nonzero().tolist()
    assert nonzero == [[1, 3]]
    # and the reshape is the inverse of PatchEmbed's flatten(2).transpose(1, 2)
    tokens = torch.arange(2 * 12 * 5, dtype=torch.float32).reshape(2, 12, 5)
    assert torch.equal(tokens_to_grid(tokens, 3, 4).flatten(2).transpose(1, 2), tokens)
    assert tokens_to_grid(tokens, 3, 4)[1, 2, 1, 3].item() == tokens[1, 1 * 4 + 3, 2].item()


def test_sd_and_sdxl_null_conditioning_is_the_pipelines_encode_prompt(pipeline_dirs, loaded):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    # under no_grad, as the pipelines' __call__ runs it (CPU attention picks another kernel with autograd on)
    sd = StableDiffusionPipeline.from_pretrained(pipeline_dirs["sd"], local_files_only=True)
    with torch.no_grad():
        embeds, _ = sd.encode_prompt("", "cpu", 1, False)
    cond = loaded["sd"].model.conditioning.tensors
    assert set(cond) == {"encoder_hidden_states"}
    assert torch.equal(cond["encoder_hidden_states"], embeds) and embeds.abs().sum() > 0  # never zeros

    xl = StableDiffusionXLPipeline.from_pretrained(pipeline_dirs["sdxl"], local_files_only=True)
    with torch.no_grad():
        embeds, _, pooled, _ = xl.encode_prompt("", device="cpu", do_classifier_free_guidance=False)
    cond = loaded["sdxl"].model.conditioning.tensors
    assert torch.equal(cond["encoder_hidden_states"], embeds) and torch.equal(cond["text_embeds"], pooled)
    from diffeat.models.families.latent_unet import sdxl_time_ids

    want = xl._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=torch.float32, text_encoder_projection_dim=16)
    assert torch.equal(sdxl_time_ids(torch.zeros(2, 4, 8, 8), 8, torch.float32), want.expand(2, -1))


def test_pixart_and_sd3_null_conditioning_is_the_pipelines_encode_prompt(pipeline_dirs, loaded):
    from diffusers import PixArtAlphaPipeline, StableDiffusion3Pipeline

    pixart = PixArtAlphaPipeline.from_pretrained(pipeline_dirs["pixart"], local_files_only=True)
    with torch.no_grad():  # as the pipelines' __call__ runs it
        embeds, mask, _, _ = pixart.encode_prompt("", do_classifier_free_guidance=False, device="cpu",
                                                  clean_caption=False)
    cond = loaded["pixart"].model.conditioning.tensors
    assert torch.equal(cond["encoder_hidden_states"], embeds) and torch.equal(cond["encoder_attention_mask"], mask)
    assert mask.sum().item() == 1  # only "</s>" is attended

    sd3 = StableDiffusion3Pipeline.from_pretrained(pipeline_dirs["sd3"], local_files_only=True)
    with torch.no_grad():
        embeds, _, pooled, _ = sd3.encode_prompt("", "", "", device="cpu", do_classifier_free_guidance=False)
    cond = loaded["sd3"].model.conditioning.tensors
    assert torch.equal(cond["encoder_hidden_states"], embeds) and torch.equal(cond["pooled_projections"], pooled)


@pytest.mark.parametrize("name", ["sd", "dit", "sd3"])
def test_latents_are_the_vaes_posterior_mean_times_scaling_factor(name, pipeline_dirs, loaded):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(pipeline_dirs[name], subfolder="vae", local_files_only=True).eval()
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        shift = vae.config.shift_factor
        want = (mean - shift) * vae.config.scaling_factor if shift is not None else mean * vae.config.scaling_factor
        got = loaded[name].model.encode(x)
    assert (shift is not None) == (name == "sd3")
    assert got.shape == (3, *loaded[name].model.input_shape(64)) and torch.equal(got, want)
    with torch.no_grad():  # deterministic, and independent of the batch it is in (per-row kernels on CPU)
        assert torch.equal(loaded[name].model.encode(x), got)


def test_identity_names_everything_that_determines_the_values(loaded, tiny_model_dir):
    pixel = load_model(str(tiny_model_dir))
    assert pixel.family == "pixel-unet" and pixel.model.identity() == {}
    assert pixel.model.schedule.describe() == "linear 1e-4..0.02, 1000 steps"  # what stores always recorded
    assert set(pixel.describe()) == {"name", "source", "class", "weights_sha256", "native_resolution"}
    from diffeat.models.components import weights_sha256

    sd = loaded["sd"].model
    ident = sd.identity(64)
    assert ident["family"] == "latent-unet" and ident["schedule"] == "scaled_linear 0.00085..0.012, 1000 steps"
    assert ident["vae"]["encoder_weights_sha256"] == weights_sha256(sd.vae.vae)
    assert ident["vae"]["scaling_factor"] == 0.18215
    assert ident["conditioning"]["encoders"][0]["class"] == "CLIPTextModel"
    assert loaded["sdxl"].model.identity(128)["conditioning"]["time_ids"] == [128, 128, 0, 0, 128, 128]
    assert loaded["dit"].model.identity()["conditioning"]["class_label"] == 10  # num_embeds_ada_norm: the CFG row
    assert "flow matching" in loaded["sd3"].model.identity()["schedule"]
    assert loaded["dit"].describe()["family"] == "dit"


def test_random_benchmark_architectures_on_the_meta_device():
    from diffeat.models.flops import count_model_flops, count_model_parameters

    sd15 = load_model("random:sd15-unet", device="meta")
    table = sd15.model.block_table()
    assert (sd15.family, sd15.resolution, len(table), sd15.weights_sha256) == ("latent-unet", 512, 25, "")
    assert table[18 - 1].as_dict() | {} == {"index": 18, "module": "up_blocks.1.attentions.1",
                                            "adm_name": "output_blocks.4", "channels": 1280, "height": 16, "width": 16}
    assert count_model_parameters(sd15.model) == 859_520_964  # SD-1.5's U-Net
    dit = load_model("random:dit-xl2", device="meta")
    table = dit.model.block_table()
    assert (dit.family, dit.resolution, [b.index for b in table]) == ("dit", 256, list(range(29)))
    assert {(b.channels, b.height, b.width) for b in table} == {(1152, 16, 16)}
    # DiT-XL/2: 118.6 "Gflops" in the paper (multiply-adds) = 237.3 GFLOP here (2 per multiply-add)
    assert count_model_flops(dit.model) / 2e9 == pytest.approx(118.6, rel=1e-3)


@pytest.mark.parametrize("arch", ["tiny-sd", "tiny-sdxl", "tiny-dit", "tiny-pixart", "tiny-sd3"])
def test_random_tiny_architectures_run(arch):
    m = load_model(f"random:{arch}")
    assert len(m.weights_sha256) == 64
    x = torch.randn(2, *m.model.input_shape(64))
    last = m.model.block_table()[-1]
    with torch.no_grad():
        out = m.model.feature_forward([last.index])(x, torch.tensor([3, 400]))
    assert out[last.index].shape == (2, last.channels, last.height, last.width)


# -- bad input: one line, before any data is read ------------------------------------------------------------------


def test_a_missing_component_is_named(pipeline_dirs, tmp_path):
    broken = tmp_path / "sd"
    shutil.copytree(pipeline_dirs["sd"], broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(ModelError, match=r"declares `text_encoder` but the folder .* is missing"):
        load_model(str(broken))
    shutil.rmtree(broken / "scheduler")
    (broken / "model_index.json").write_text((broken / "model_index.json").read_text().replace(
        '"scheduler"', '"no_scheduler"'))
    with pytest.raises(ModelError, match="no `scheduler` component"):
        load_model(str(broken))


def test_unknown_classes_list_the_families(tmp_path):
    (tmp_path / "vq").mkdir()
    (tmp_path / "vq" / "config.json").write_text('{"_class_name": "VQModel"}')
    with pytest.raises(ModelError, match=r"VQModel; diffeat supports: pixel-unet .*latent-unet.*dit.*pixart.*sd3"):
        load_model(str(tmp_path / "vq"))
    with pytest.raises(ModelError, match="FluxTransformer2DModel, which no family"):
        family_for("FluxTransformer2DModel", True)


def test_bare_transformer_folders(pipeline_dirs, tmp_path):
    inside = load_model(str(pipeline_dirs["dit"] / "transformer"))  # the pipeline around it is meant
    assert inside.family == "dit" and inside.model.vae is not None
    shutil.copytree(pipeline_dirs["dit"] / "transformer", tmp_path / "lone")
    with pytest.raises(ModelError, match="bare DiTTransformer2DModel folder: a dit model also needs"):
        load_model(str(tmp_path / "lone"))


def test_weights_load_strictly(pipeline_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "sd"
    shutil.copytree(pipeline_dirs["sd"], broken)
    path = broken / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    weights.pop("encoder.conv_in.bias")
    save_file(weights, path)
    with pytest.raises(ModelError, match=r"weight `encoder.conv_in.bias` of the AutoencoderKL is missing"):
        load_model(str(broken))
    weights["encoder.conv_in.bias"] = torch.zeros(8)
    weights["encoder.extra.weight"] = torch.zeros(1)
    save_file(weights, path)
    with pytest.raises(ModelError, match=r"`encoder.extra.weight` of the AutoencoderKL is in the weight files but not"):
        load_model(str(broken))
    path = broken / "text_encoder" / "model.safetensors"
    shutil.copy(pipeline_dirs["sd"] / "vae" / "diffusion_pytorch_model.safetensors",
                broken / "vae" / "diffusion_pytorch_model.safetensors")
    weights = load_file(path)
    weights.pop("final_layer_norm.weight")  # transformers 5 writes CLIP text keys without `text_model.`
    save_file(weights, path)
    with pytest.raises(ModelError, match=r"final_layer_norm.weight` of the CLIPTextModel is missing"):
        load_model(str(broken))


def test_bad_timestep_resolution_and_null_label(loaded):
    sd3 = loaded["sd3"].model
    with pytest.raises(DiffeatError, match=r"--t 1000 is out of range: .* 0\.\.999 \(flow matching"):
        sd3.schedule.check_timestep(1000)
    with pytest.raises(DiffeatError, match=r"--resolution 72 does not fit .* multiple of 16 \(the VAE downsamples 8x"):
        loaded["dit"].model.check_resolution(72)
    with pytest.raises(DiffeatError, match="multiple of 16"):
        loaded["sd"].model.block_table(40)
    with pytest.raises(DiffeatError, match=r"too large .* 16x16 patches, i\.e\. at most 256 px"):
        sd3.check_resolution(512)
    with pytest.raises(DiffeatError, match=r"--block 4 does not exist: this model has blocks 0\.\.3 \(block 0 = the "
                                           r"patch embedding"):
        loaded["dit"].model.feature_forward([1, 4])
    from diffeat.models.families.dit import null_label

    no_null = load_model("random:tiny-dit").model.denoiser
    embedder = no_null.transformer_blocks[0].norm1.emb.class_embedder
    embedder.embedding_table = torch.nn.Embedding(embedder.num_classes, 16)  # no classifier-free-guidance row
    with pytest.raises(ModelError, match="class-conditional without a null label: its class embedding has 10 rows"):
        null_label(no_null)


def test_every_family_is_registered_once():
    from diffeat.models.families import random_architectures

    assert list(FAMILIES) == ["pixel-unet", "latent-unet", "dit", "pixart", "sd3", "vision"]
    assert [f.name for f in FAMILIES.values() if not f.timestep] == ["vision"]
    archs = random_architectures()
    assert {"tiny", "adm256", "sd15-unet", "dit-xl2", "tiny-sd", "tiny-sdxl", "tiny-dit", "tiny-pixart",
            "tiny-sd3", "resnet50", "vit-b16", "dinov2-s14", "tiny-resnet"} <= set(archs)


def test_the_family_block_tables_in_the_docs_are_computed():
    """docs/blocks.md's family section has scripts/family_block_tables.py's tables (computed on the meta device)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("family_block_tables", root / "scripts" / "family_block_tables.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    page = (root / "docs" / "blocks.md").read_text().split(script.BEGIN)[1].split(script.END)[0]
    for _heading, arch, _model, _note in script.SECTIONS:
        assert "\n".join(script.table_lines(arch)) in page, f"docs/blocks.md is stale for {arch}"
    assert script.schedule_table() in page
