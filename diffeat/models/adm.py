"""Convert guided-diffusion (ADM) checkpoints into stock diffusers ``UNet2DModel`` folders.

The paper's model is OpenAI's ``256x256_diffusion_uncond.pt`` from guided-diffusion.
diffusers ships no converter for it, but a plain ``UNet2DModel`` reproduces the
network exactly once three things are right (see ``docs/adm.md``):

* the config: ``resnet_time_scale_shift="scale_shift"``, resnet up/down-sampling,
  ``attn_norm_num_groups=32`` (else the middle attention has no group norm) and one
  head width for every attention layer;
* the key renaming (``input_blocks.i`` -> ``down_blocks[level]...``; the last layer of
  an output level also holds the upsampler);
* the attention weights: guided-diffusion's default ``QKVAttentionLegacy`` stores the
  fused ``qkv`` rows per head as ``(heads, 3, head_dim)``; a plain ``chunk(3)`` (right
  only for ``use_new_attention_order=True``) silently gives a different network.

Everything about the architecture is inferred from the tensors themselves; only
the head width (not stored anywhere in a checkpoint) and the attention order are
taken from the caller. Checkpoints are pickles, so they are read with
``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from diffeat import __version__
from diffeat.errors import ModelError

logger = logging.getLogger(__name__)

#: Name of the provenance file written next to ``config.json``.
CONVERSION_FILE = "diffeat_conversion.json"
CONVERSION_FORMAT = "diffeat-adm-conversion/1"

# guided-diffusion's GroupNorm32 (normalization()) always uses 32 groups, eps 1e-5.
_NORM_GROUPS = 32
_NORM_EPS = 1e-5

# ResBlock sub-module names: guided-diffusion -> diffusers ResnetBlock2D.
_RESBLOCK_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_TOP_LEVEL = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.", "output_blocks.", "out.")


@dataclass(frozen=True)
class AdmLayout:
    """The guided-diffusion ``UNetModel`` arguments recovered from a state dict."""

    model_channels: int
    channels: tuple[int, ...]  # width of each level (model_channels * channel_mult)
    num_res_blocks: int
    attention_levels: tuple[int, ...]  # 0-based levels with attention (ds = 2**level)
    in_channels: int
    out_channels: int
    num_classes: int | None
    resblock_updown: bool
    use_scale_shift_norm: bool

    @property
    def channel_mult(self) -> tuple[float, ...]:
        """guided-diffusion's ``channel_mult`` (ints where they are whole, as usual)."""
        mc = self.model_channels
        return tuple(c // mc if c % mc == 0 else c / mc for c in self.channels)

    def as_adm_args(self, image_size: int, num_head_channels: int, legacy_attention: bool) -> dict:
        """The equivalent guided-diffusion ``UNetModel`` keyword arguments (for provenance)."""
        args = asdict(self)
        levels = args.pop("attention_levels")
        del args["channels"]
        args.update(
            image_size=image_size,
            attention_ds=[2**level for level in levels],  # what UNetModel(attention_resolutions=...) takes
            # the README / create_model flag: resolutions in pixels, e.g. "32,16,8" at 256 px
            attention_resolutions=",".join(str(image_size // 2**level) for level in levels),
            learn_sigma=self.out_channels == 2 * self.in_channels,
            num_head_channels=num_head_channels,
            use_new_attention_order=not legacy_attention,
        )
        args["channel_mult"] = list(self.channel_mult)
        return args


# --------------------------------------------------------------------------- reading


def load_adm_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Read a guided-diffusion checkpoint as a plain ``{name: tensor}`` dict.

    Uses ``torch.load(map_location="cpu", weights_only=True)``: a pickle holding
    anything but tensors and plain containers is refused, never executed.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ModelError(f"{checkpoint}: no such checkpoint file")
    try:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError (not a zip), EOFError ...
        raise ModelError(_load_failure(checkpoint, e)) from e
    if not isinstance(obj, Mapping):
        raise ModelError(
            f"{checkpoint}: holds a {type(obj).__name__}, not a state dict (a dict of tensor names to tensors)"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(
            f"{checkpoint}: is not a plain state dict: entry {bad[0]!r} is of type "
            f"{type(obj[bad[0]]).__name__}, not a tensor ({len(bad)} such entries)"
        )
    return dict(obj)


def _load_failure(checkpoint: Path, error: Exception) -> str:
    """A one-line reason why ``torch.load(weights_only=True)`` refused ``checkpoint``."""
    text = str(error)
    if m := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return (
            f"{checkpoint}: refused: the pickle references `{m.group(1)}`, which "
            "torch.load(weights_only=True) does not allow (unpickling it could run code from the file). "
            "diffeat reads only plain state dicts of tensors, which is what guided-diffusion saves"
        )
    if m := re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S):
        reason = " ".join(m.group(1).split())
    else:
        reason = " ".join(text.split()[:30]) or type(error).__name__
    return (
        f"{checkpoint}: cannot be read with torch.load(weights_only=True) ({reason}); "
        "expected a guided-diffusion checkpoint: a plain dict of tensors saved with torch.save"
    )


def file_sha256(path: Path, chunk_size: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in chunks (checkpoints are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- inference


def _child_indices(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    """Sorted integer children of ``prefix`` (``input_blocks`` -> [0, 1, ...])."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def _kind(sd: Mapping[str, torch.Tensor], prefix: str) -> str:
    """What the module at ``prefix`` is: "res", "attn", "downconv", "upconv" or "?"."""
    if f"{prefix}.in_layers.0.weight" in sd:
        return "res"
    if f"{prefix}.qkv.weight" in sd:
        return "attn"
    if f"{prefix}.op.weight" in sd:
        return "downconv"
    if f"{prefix}.conv.weight" in sd:
        return "upconv"
    return "?"


def _need(sd: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise ModelError(f"not a guided-diffusion UNetModel state dict: {what} `{key}` is missing")
    return sd[key]


def infer_adm_layout(state_dict: Mapping[str, torch.Tensor]) -> AdmLayout:
    """Recover the guided-diffusion ``UNetModel`` architecture from the tensors alone.

    Raises ``ModelError`` if the dict is not an ADM U-Net or uses a layout that a
    stock ``UNet2DModel`` cannot express.
    """
    sd = state_dict
    odd = sorted({k.split(".")[0] for k in sd if not k.startswith(_TOP_LEVEL)})
    if odd:
        raise ModelError(
            "not a guided-diffusion UNetModel state dict: unexpected top-level entries "
            f"{odd[:5]} (expected only time_embed, label_emb, input_blocks, middle_block, output_blocks, out)"
        )
    conv_in = _need(sd, "input_blocks.0.0.weight", "the input convolution")
    time_in = _need(sd, "time_embed.0.weight", "the time embedding")
    out_conv = _need(sd, "out.2.weight", "the output convolution")
    _need(sd, "middle_block.1.qkv.weight", "the middle attention")
    if conv_in.dim() != 4 or time_in.dim() != 2 or out_conv.dim() != 4:
        raise ModelError("not a 2-D guided-diffusion UNetModel state dict: unexpected tensor ranks")
    model_channels = int(time_in.shape[1])
    if int(time_in.shape[0]) != 4 * model_channels:
        raise ModelError(f"time embedding is {tuple(time_in.shape)}; guided-diffusion uses 4*model_channels")
    ch0 = int(conv_in.shape[0])
    if ch0 != model_channels:
        raise ModelError(
            f"channel_mult[0] = {ch0}/{model_channels} != 1 (as in ADM-512, channel_mult 0.5,...): "
            "UNet2DModel ties the timestep-embedding width to block_out_channels[0], so this layout "
            "cannot be expressed as a stock UNet2DModel"
        )

    n_in, n_out = _child_indices(sd, "input_blocks"), _child_indices(sd, "output_blocks")
    if not n_out or n_in != list(range(len(n_in))) or n_out != list(range(len(n_out))) or len(n_in) != len(n_out):
        raise ModelError(
            f"input_blocks {n_in[:3]}..{n_in[-1:]} / output_blocks {n_out[:3]}..{n_out[-1:]} are not two "
            "contiguous lists of equal length (a down-sampler without weights, conv_resample=False, "
            "is not supported)"
        )
    # The output blocks that end a level carry one extra child: the upsampler.
    up_positions = []
    for m in n_out:
        children = _child_indices(sd, f"output_blocks.{m}")
        kinds = [_kind(sd, f"output_blocks.{m}.{c}") for c in children]
        if children != list(range(len(children))) or not kinds or kinds[0] != "res" or "?" in kinds:
            raise ModelError(f"output_blocks.{m} has an unexpected structure {kinds}")
        if kinds[-1] == "upconv" or (len(kinds) > 1 and kinds[-1] == "res"):
            up_positions.append(m)
    per_level = up_positions[0] + 1 if up_positions else len(n_out)
    n_levels = len(n_out) // per_level
    num_res_blocks = per_level - 1
    expected_ups = [per_level * u + num_res_blocks for u in range(n_levels - 1)]
    if num_res_blocks < 1 or len(n_out) % per_level or up_positions != expected_ups:
        raise ModelError(
            f"cannot split {len(n_out)} output blocks into levels (upsamplers at {up_positions}); "
            "not a guided-diffusion UNetModel"
        )

    channels, attention, resamplers = [], [], set()
    for level in range(n_levels):
        first = 1 + level * per_level
        up_first = _level_index(n_levels, level) * per_level
        level_ch, level_attn = set(), set()
        for slot in range(num_res_blocks):
            prefix = f"input_blocks.{first + slot}"
            kinds = [_kind(sd, f"{prefix}.{c}") for c in _child_indices(sd, prefix)]
            if kinds not in (["res"], ["res", "attn"]):
                raise ModelError(f"{prefix} has an unexpected structure {kinds}")
            level_ch.add(int(sd[f"{prefix}.0.out_layers.3.weight"].shape[0]))
            level_attn.add(len(kinds) == 2)
        for slot in range(per_level):  # the up side must agree (ADM decides attention by ds)
            level_attn.add(_kind(sd, f"output_blocks.{up_first + slot}.1") == "attn")
        if len(level_ch) != 1 or len(level_attn) != 1:
            raise ModelError(f"level {level} mixes widths {sorted(level_ch)} or attention on/off")
        channels.append(level_ch.pop())
        attention.append(level_attn.pop())
        if level < n_levels - 1:
            # the level's down-sampler, and the up-sampler that returns to this level's resolution
            up = f"output_blocks.{_level_index(n_levels, level + 1) * per_level + num_res_blocks}"
            up_child = len(_child_indices(sd, up)) - 1
            resamplers.add((_kind(sd, f"input_blocks.{first + num_res_blocks}.0"), _kind(sd, f"{up}.{up_child}")))
    if not resamplers <= {("res", "res")} and resamplers != {("downconv", "upconv")}:
        raise ModelError(f"unexpected down/up-samplers {sorted(resamplers)}; not a guided-diffusion UNetModel")
    resblock_updown = resamplers != {("downconv", "upconv")}

    emb_rows = int(sd["input_blocks.1.0.emb_layers.1.weight"].shape[0])
    if emb_rows not in (channels[0], 2 * channels[0]):
        raise ModelError(f"input_blocks.1.0.emb_layers.1 has {emb_rows} rows for {channels[0]} channels")
    label = sd.get("label_emb.weight")
    return AdmLayout(
        model_channels=model_channels,
        channels=tuple(channels),
        num_res_blocks=num_res_blocks,
        attention_levels=tuple(i for i, a in enumerate(attention) if a),
        in_channels=int(conv_in.shape[1]),
        out_channels=int(out_conv.shape[0]),
        num_classes=int(label.shape[0]) if label is not None else None,
        resblock_updown=resblock_updown,
        use_scale_shift_norm=emb_rows == 2 * channels[0],
    )


def _level_index(n_levels: int, level: int) -> int:
    """Index of ``level`` (0 = full resolution) among the up blocks, which run in reverse."""
    return n_levels - 1 - level


def _check_heads(channels: list[int], num_head_channels: int) -> None:
    if num_head_channels <= 0:
        raise ModelError(
            f"num_head_channels={num_head_channels}: checkpoints trained with a fixed head count "
            "(--num_heads, num_head_channels=-1; ADM-128 and the upsamplers) have a different head "
            "width per level, which UNet2DModel (one attention_head_dim) cannot express"
        )
    bad = [c for c in channels if c % num_head_channels]
    if bad:
        raise ModelError(
            f"attention layers of {bad[0]} channels do not split into heads of num_head_channels="
            f"{num_head_channels}; pass the --num-head-channels the model was trained with"
        )


def layout_to_config(layout: AdmLayout, image_size: int, num_head_channels: int) -> dict:
    """The ``UNet2DModel`` config that computes exactly the network ``layout`` describes."""
    channels = list(layout.channels)
    attn_channels = [channels[i] for i in layout.attention_levels] + [channels[-1]]  # + middle block
    _check_heads(attn_channels, num_head_channels)
    factor = 2 ** (len(channels) - 1)
    if image_size <= 0 or image_size % factor:
        raise ModelError(f"image_size {image_size} is not a positive multiple of {factor} (the model downsamples)")
    res_type = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D")
    plain_type = ("DownBlock2D", "UpBlock2D")
    down, up = [], []
    for level in range(len(channels)):
        if level in layout.attention_levels:
            d, u = "AttnDownBlock2D", "AttnUpBlock2D"
        else:
            d, u = res_type if layout.resblock_updown else plain_type
        down.append(d)
        up.append(u)
    resample = "resnet" if layout.resblock_updown else "conv"
    return dict(
        sample_size=image_size,
        in_channels=layout.in_channels,
        out_channels=layout.out_channels,
        center_input_sample=False,
        time_embedding_type="positional",
        flip_sin_to_cos=True,  # guided-diffusion's timestep_embedding is [cos, sin]
        freq_shift=0,
        down_block_types=tuple(down),
        mid_block_type="UNetMidBlock2D",
        up_block_types=tuple(reversed(up)),
        block_out_channels=tuple(channels),
        layers_per_block=layout.num_res_blocks,
        mid_block_scale_factor=1,
        downsample_padding=1,
        downsample_type=resample,
        upsample_type=resample,
        dropout=0.0,
        act_fn="silu",
        attention_head_dim=num_head_channels,
        norm_num_groups=_NORM_GROUPS,
        attn_norm_num_groups=_NORM_GROUPS,  # without it UNetMidBlock2D drops the attention norm
        norm_eps=_NORM_EPS,
        resnet_time_scale_shift="scale_shift" if layout.use_scale_shift_norm else "default",
        add_attention=True,
        num_class_embeds=layout.num_classes,
    )


def infer_adm_config(
    state_dict: Mapping[str, torch.Tensor], image_size: int = 256, num_head_channels: int = 64
) -> dict:
    """Return the ``UNet2DModel`` config equivalent to the ADM U-Net in ``state_dict``."""
    return layout_to_config(infer_adm_layout(state_dict), image_size, num_head_channels)


# --------------------------------------------------------------------------- renaming


def _module_map(config: dict) -> list[tuple[str, str, str]]:
    """``(ADM prefix, diffusers prefix, kind)`` for every weight-holding ADM module."""
    L = config["layers_per_block"]
    n = len(config["block_out_channels"])
    k = L + 1
    attn = [t.startswith("Attn") for t in config["down_block_types"]]
    resample = "res" if config["downsample_type"] == "resnet" else "conv"
    out = [
        ("time_embed.0", "time_embedding.linear_1", "plain"),
        ("time_embed.2", "time_embedding.linear_2", "plain"),
        ("input_blocks.0.0", "conv_in", "plain"),
        ("out.0", "conv_norm_out", "plain"),
        ("out.2", "conv_out", "plain"),
        ("middle_block.0", "mid_block.resnets.0", "res"),
        ("middle_block.1", "mid_block.attentions.0", "attn"),
        ("middle_block.2", "mid_block.resnets.1", "res"),
    ]
    if config.get("num_class_embeds"):
        out.append(("label_emb", "class_embedding", "plain"))
    for i in range(1, n * k):
        level, slot = divmod(i - 1, k)
        if slot < L:
            out.append((f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{slot}", "res"))
            if attn[level]:
                out.append((f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{slot}", "attn"))
        else:
            out.append((f"input_blocks.{i}.0", f"down_blocks.{level}.downsamplers.0", resample + "_down"))
    for m in range(n * k):
        u, slot = divmod(m, k)
        level_attn = attn[_level_index(n, u)]
        out.append((f"output_blocks.{m}.0", f"up_blocks.{u}.resnets.{slot}", "res"))
        if level_attn:
            out.append((f"output_blocks.{m}.1", f"up_blocks.{u}.attentions.{slot}", "attn"))
        if slot == L and u < n - 1:
            child = 2 if level_attn else 1
            out.append((f"output_blocks.{m}.{child}", f"up_blocks.{u}.upsamplers.0", resample + "_up"))
    return out


def _split_qkv(t: torch.Tensor, heads: int, legacy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split fused qkv rows (weight [3C, C] or bias [3C]) into q, k, v.

    Legacy order (QKVAttentionLegacy) lays rows out as (heads, 3, head_dim); the new
    order (QKVAttention) as (3, heads, head_dim). diffusers wants each of q, k, v
    with rows (heads, head_dim).
    """
    rows = t.shape[0]
    d = rows // (3 * heads)
    rest = t.shape[1:]
    if legacy:
        parts = t.reshape(heads, 3, d, *rest).unbind(1)
    else:
        parts = t.reshape(3, heads, d, *rest).unbind(0)
    # clone: safetensors refuses tensors that share storage
    return tuple(p.reshape(heads * d, *rest).clone() for p in parts)  # type: ignore[return-value]


def convert_adm_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: dict,
    *,
    legacy_attention: bool = True,
    dtype: torch.dtype | None = torch.float32,
) -> dict[str, torch.Tensor]:
    """Rename (and reshape) an ADM state dict into ``UNet2DModel`` keys for ``config``.

    ``legacy_attention`` selects the qkv row order (True: guided-diffusion's default
    ``QKVAttentionLegacy``). Tensors are cast to ``dtype`` (None keeps them). Every
    source tensor must be consumed; leftovers raise ``ModelError``.
    """
    head_dim = config["attention_head_dim"]
    todo = dict(state_dict)
    out: dict[str, torch.Tensor] = {}

    def take(src: str) -> torch.Tensor:
        if src not in todo:
            raise ModelError(f"state dict lacks `{src}`, which the inferred architecture needs")
        t = todo.pop(src)
        return t if dtype is None else t.to(dtype)

    for adm, hf, kind in _module_map(config):
        keys = sorted(k[len(adm) + 1 :] for k in todo if k.startswith(adm + "."))
        if kind == "plain":
            for key in keys:
                out[f"{hf}.{key}"] = take(f"{adm}.{key}")
        elif kind in ("res", "res_down", "res_up"):
            for key in keys:
                sub, _, param = key.rpartition(".")
                if sub not in _RESBLOCK_NAMES:
                    raise ModelError(f"unexpected ResBlock tensor `{adm}.{key}`")
                out[f"{hf}.{_RESBLOCK_NAMES[sub]}.{param}"] = take(f"{adm}.{key}")
        elif kind in ("conv_down", "conv_up"):
            src = "op" if kind == "conv_down" else "conv"
            for param in ("weight", "bias"):
                out[f"{hf}.conv.{param}"] = take(f"{adm}.{src}.{param}")
        elif kind == "attn":
            for param in ("weight", "bias"):
                out[f"{hf}.group_norm.{param}"] = take(f"{adm}.norm.{param}")
                qkv = take(f"{adm}.qkv.{param}")
                if param == "weight":
                    qkv = qkv.squeeze(-1)  # Conv1d [3C, C, 1] -> Linear [3C, C]
                heads = qkv.shape[0] // 3 // head_dim
                q, k, v = _split_qkv(qkv, heads, legacy_attention)
                out[f"{hf}.to_q.{param}"], out[f"{hf}.to_k.{param}"], out[f"{hf}.to_v.{param}"] = q, k, v
                proj = take(f"{adm}.proj_out.{param}")
                out[f"{hf}.to_out.0.{param}"] = proj.squeeze(-1) if param == "weight" else proj
        else:  # pragma: no cover - _module_map only produces the kinds above
            raise AssertionError(kind)
    if todo:
        raise ModelError(
            f"{len(todo)} tensors of the checkpoint have no place in the inferred UNet2DModel, "
            f"e.g. {sorted(todo)[:3]}"
        )
    return {k: v.contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------- the whole job


def build_unet(config: dict, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Build a ``UNet2DModel`` from ``config`` holding exactly ``state_dict`` (strict).

    The model is created on the meta device and the tensors are assigned, so a
    2.2 GB model is never allocated twice.
    """
    from diffusers import UNet2DModel

    with torch.device("meta"):
        unet = UNet2DModel(**config)
    try:
        unet.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelError(f"converted weights do not fit the inferred UNet2DModel: {e}") from e
    return unet.eval()


def convert_adm_checkpoint(
    checkpoint: Path,
    output_dir: Path,
    *,
    image_size: int = 256,
    num_head_channels: int = 64,
    legacy_attention: bool | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Convert a guided-diffusion checkpoint into a diffusers ``UNet2DModel`` folder.

    ``legacy_attention=None`` means guided-diffusion's default
    (``use_new_attention_order=False``), which every 256/512 and LSUN checkpoint uses;
    pass False for models trained with ``--use_new_attention_order True`` (ADM-64).
    The folder (``config.json``, ``diffusion_pytorch_model.safetensors`` and
    ``diffeat_conversion.json`` with the source's sha256) is written to a temporary
    sibling and renamed into place, so a failed run never leaves a half model.
    Returns ``output_dir``.
    """
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ModelError(f"{output_dir}: exists and is not a folder")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ModelError(f"{output_dir}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    legacy = True if legacy_attention is None else bool(legacy_attention)
    if legacy_attention is None and image_size == 64:
        logger.warning(
            "%s: assuming the legacy qkv order; OpenAI's 64x64_diffusion.pt was trained with "
            "--use_new_attention_order True and needs legacy_attention=False (--new-attention-order)",
            checkpoint,
        )
    sd = load_adm_state_dict(checkpoint)
    try:
        layout = infer_adm_layout(sd)
        config = layout_to_config(layout, image_size, num_head_channels)
        source_dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in sd.values()})
        converted = convert_adm_state_dict(sd, config, legacy_attention=legacy, dtype=dtype)
        del sd
        unet = build_unet(config, converted)
    except ModelError as e:
        raise ModelError(f"{checkpoint}: {e}") from e
    n_params = sum(p.numel() for p in unet.parameters())
    logger.info("%s: %s, %d parameters", checkpoint, layout, n_params)
    record = {
        "format": CONVERSION_FORMAT,
        "source": {
            "file": checkpoint.name,
            "sha256": file_sha256(checkpoint),
            "bytes": checkpoint.stat().st_size,
            "dtypes": source_dtypes,
        },
        "guided_diffusion_args": layout.as_adm_args(image_size, num_head_channels, legacy),
        "qkv_order": "legacy (heads, 3, head_dim)" if legacy else "new (3, heads, head_dim)",
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": n_params,
        "diffeat_version": __version__,
        "diffusers_version": _version("diffusers"),
        "torch_version": torch.__version__,
    }
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # a hidden sibling (same filesystem, so the final rename is atomic); mkdir honours the umask
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        unet.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s (source sha256 %s)", output_dir, record["source"]["sha256"])
    return output_dir


def read_conversion_record(model_dir: Path) -> dict | None:
    """The ``diffeat_conversion.json`` of a converted folder, or None if it has none."""
    path = Path(model_dir) / CONVERSION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
