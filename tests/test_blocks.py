"""The block table is computed from the model and agrees with real hook outputs."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from diffeat.errors import DiffeatError
from diffeat.models.blocks import block_table, capture_blocks, check_resolution
from diffeat.models.loading import ARCHITECTURES, build_random
from tiny_models import tiny_sd_unet


@pytest.mark.parametrize("make, n_blocks", [
    (lambda: build_random("tiny"), 13),
    (lambda: build_random("mini-adm"), 37),
    (tiny_sd_unet, 9),
])
def test_table_matches_real_activations(make, n_blocks):
    unet = make().eval()
    table = block_table(unet)
    assert [b.index for b in table] == list(range(1, n_blocks + 1))
    res = table[0].height
    x = torch.randn(2, unet.config.in_channels, res, res)
    with torch.no_grad():
        acts = capture_blocks(unet, x, torch.tensor([10, 500]), range(1, n_blocks + 1))
    for b in table:
        assert tuple(acts[b.index].shape) == (2, b.channels, b.height, b.width), b


def test_adm256_block_24_is_the_papers_block():
    with torch.device("meta"):
        unet = UNet2DModel(**ARCHITECTURES["adm256"])
    table = block_table(unet)
    assert len(table) == 37
    b24 = table[23]
    assert (b24.module, b24.adm_name, b24.channels, b24.height, b24.width) == (
        "up_blocks.1.attentions.1", "output_blocks.4", 1024, 16, 16)
    # ADM's output block that ends a level includes the upsampler: the whole up block, not its last layer.
    assert (table[21].module, table[21].height) == ("up_blocks.0", 16)
    assert (table[18].module, table[18].adm_name) == ("mid_block", "middle_block")
    # At another resolution the table scales.
    assert block_table(unet, 128)[23].height == 8


def test_capture_equals_full_forward_hooks_and_stops_early():
    unet = build_random("mini-adm").eval()
    table = block_table(unet)
    x = torch.randn(2, 3, 64, 64)
    t = torch.tensor([90, 90])
    modules = dict(unet.named_modules())
    full, calls = {}, []
    handles = [modules[b.module].register_forward_hook(
        lambda m, a, o, i=b.index: full.__setitem__(i, o if torch.is_tensor(o) else o[0])) for b in table]
    with torch.no_grad():
        unet(x, t)
    for h in handles:
        h.remove()
    later = modules["up_blocks.1.resnets.2"].register_forward_hook(lambda *a: calls.append("ran"))
    out_hook = modules["conv_out"].register_forward_hook(lambda *a: calls.append("conv_out"))
    with torch.no_grad():
        got = capture_blocks(unet, x, t, [19, 24, 10])
    later.remove(), out_hook.remove()
    assert calls == [], "modules after the deepest requested block must not run"
    assert sorted(got) == [10, 19, 24]
    for i in got:
        assert torch.equal(got[i], full[i])


def test_bad_block_and_resolution_name_the_valid_range():
    unet = build_random("tiny")
    with pytest.raises(DiffeatError, match=r"--block 14 does not exist: this model has blocks 1\.\.13"):
        capture_blocks(unet, torch.zeros(1, 3, 32, 32), 1, [14])
    with pytest.raises(DiffeatError, match="--block 0"):
        capture_blocks(unet, torch.zeros(1, 3, 32, 32), 1, [0])
    with pytest.raises(DiffeatError, match="multiple of 4"):
        check_resolution(unet, 30)
