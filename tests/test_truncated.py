"""The explicit truncated forward: bitwise the hook capture, stops early, keeps only the skips it needs."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F

from diffeat.errors import DiffeatError
from diffeat.models.blocks import block_modules, capture_blocks
from diffeat.models.loading import build_random
from diffeat.models.truncated import (
    HookedForward,
    TruncatedUNet,
    feature_forward,
    unsupported_reason,
)
from tiny_models import tiny_sd_unet


@pytest.fixture(scope="module")
def mini_adm():
    return build_random("mini-adm").eval()


@pytest.mark.parametrize("make, res", [
    (lambda: build_random("tiny").eval(), 32),
    ("mini_adm", 64),
    (tiny_sd_unet, 16),
])
def test_every_block_is_bitwise_the_hook_capture(make, res, request):
    unet = request.getfixturevalue(make) if isinstance(make, str) else make()
    n = len(block_modules(unet))
    x = torch.randn(3, unet.config.in_channels, res, res, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5, 90, 500])
    with torch.inference_mode():
        ref = capture_blocks(unet, x, t, range(1, n + 1))
        for b in range(1, n + 1):
            got = TruncatedUNet(unet, [b])(x, t)
            assert list(got) == [b]
            assert torch.equal(got[b], ref[b]), f"block {b}"
        every = TruncatedUNet(unet, range(n, 0, -1))(x, t)
    assert sorted(every) == list(range(1, n + 1))
    for b in every:
        assert torch.equal(every[b], ref[b]), f"block {b} (all blocks in one pass)"


def test_nothing_after_the_deepest_block_runs(mini_adm):
    fwd = TruncatedUNet(mini_adm, [24, 10, 19])
    names = {m: n for n, m in mini_adm.named_modules()}
    calls: list[str] = []
    # Leaf modules: the containers (down_blocks[i]) are called by diffusers' forward but not here.
    handles = [m.register_forward_pre_hook(lambda m, a: calls.append(names[m])) for m in mini_adm.modules()
               if not any(True for _ in m.children())]
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([90, 90])
    try:
        with torch.inference_mode():
            out = fwd(x, t)
            ran_truncated = set(calls)
            calls.clear()
            ref = capture_blocks(mini_adm, x, t, [10, 19, 24])
            ran_hooks = set(calls)
    finally:
        for h in handles:
            h.remove()
    # Exactly the modules the hook capture runs before it stops, and none of the later blocks or the head.
    assert ran_truncated == ran_hooks
    # Block 24 is up_blocks.1.attentions.1: the rest of that level, the later levels and the head never run.
    later = ["up_blocks.1.resnets.2", "up_blocks.1.attentions.2", "up_blocks.1.upsamplers",
             *[f"up_blocks.{u}" for u in range(2, 6)], "conv_norm_out", "conv_out"]
    assert not {n for n in ran_truncated if any(n == m or n.startswith(m + ".") for m in later)}
    assert "up_blocks.1.attentions.1.to_out.0" in ran_truncated
    assert sorted(out) == [10, 19, 24] and all(torch.equal(out[b], ref[b]) for b in out)


def test_skips_no_executed_layer_uses_are_freed_at_once(mini_adm):
    # Block 24 = output_blocks[4]: the five up layers that run pop the last five of the 18 skip
    # activations; the other 13 (the large high-resolution maps) must not be held on to.
    down = [m for m, adm in block_modules(mini_adm) if adm.startswith("input_blocks")]
    assert len(down) == 18
    modules = dict(mini_adm.named_modules())

    def alive_at_mid(run) -> int:
        refs: list[weakref.ref] = []
        counted: list[int] = []
        handles = [modules[m].register_forward_hook(lambda _m, _a, o: refs.append(weakref.ref(o))) for m in down]
        handles.append(modules["mid_block"].register_forward_pre_hook(
            lambda _m, _a: counted.append(sum(r() is not None for r in refs))))
        try:
            with torch.inference_mode():
                run()
        finally:
            for h in handles:
                h.remove()
        return counted[0]

    x, t = torch.randn(2, 3, 64, 64), torch.tensor([90, 90])
    fwd = TruncatedUNet(mini_adm, [24])
    assert fwd.kept_skips == 5
    assert alive_at_mid(lambda: fwd(x, t)) == 5
    assert alive_at_mid(lambda: capture_blocks(mini_adm, x, t, [24])) == 18  # diffusers keeps them all
    assert TruncatedUNet(mini_adm, [19]).kept_skips == 0  # nothing after the middle block pops a skip


def test_bf16_autocast_features_agree_with_fp32(mini_adm):
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    t = torch.full((4,), 90)
    fwd = TruncatedUNet(mini_adm, [19, 24, 30])
    with torch.inference_mode():
        ref = fwd(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fwd(x, t)
    for b in ref:
        for a, r in ((low[b].float(), ref[b]), (F.adaptive_avg_pool2d(low[b].float(), 2),
                                                 F.adaptive_avg_pool2d(ref[b], 2))):
            cos = F.cosine_similarity(a.flatten(1), r.flatten(1), dim=1)
            assert cos.min().item() >= 0.999, (b, cos.tolist())


def test_conditional_unet_gets_a_null_conditioning():
    unet = tiny_sd_unet()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 700])
    with torch.inference_mode():
        default = TruncatedUNet(unet, [5])(x, t)[5]
        explicit = TruncatedUNet(unet, [5])(x, t, encoder_hidden_states=torch.zeros(2, 1, 16))[5]
        other = TruncatedUNet(unet, [5])(x, t, encoder_hidden_states=torch.ones(2, 1, 16))[5]
    assert torch.equal(default, explicit) and not torch.equal(default, other)


def test_unknown_layouts_fall_back_to_hooks_with_the_same_values():
    unet = tiny_sd_unet()
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)  # FreeU rewrites skips inside the up blocks
    assert "FreeU" in unsupported_reason(unet)
    fwd = feature_forward(unet, [8])
    assert isinstance(fwd, HookedForward)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 700])
    with torch.inference_mode():
        assert torch.equal(fwd(x, t)[8], capture_blocks(unet, x, t, [8])[8])
    with pytest.raises(DiffeatError, match="no truncated forward"):
        TruncatedUNet(unet, [8])


def test_bad_blocks_name_the_valid_range():
    unet = build_random("tiny")
    with pytest.raises(DiffeatError, match=r"--block 14 does not exist.*1\.\.13"):
        TruncatedUNet(unet, [3, 14])
    with pytest.raises(DiffeatError, match="no block"):
        TruncatedUNet(unet, [])
