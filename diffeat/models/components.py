"""The parts of a diffusers pipeline folder, loaded locally and strictly, and what diffeat computes with them.

A pipeline folder (``model_index.json`` plus one subfolder per component) is read component by
component, only the ones a family needs:

* every component loads with ``local_files_only`` (nothing is ever downloaded), from safetensors
  or diffusers'/transformers' ``weights_only`` loaders, never an open pickle;
* loading is strict: a weight the model expects but the files lack, a weight the files hold but
  the model does not know, or a shape that differs is an error naming the key (both libraries
  would otherwise initialise the missing weight randomly and only log a warning);
* only known classes are instantiated (``ALLOWED_CLASSES``): ``model_index.json`` cannot make
  diffeat import arbitrary code.

What diffeat computes with them: the empty prompt's embeddings through the pipeline's own text
encoders (exactly the pipelines' ``encode_prompt("")``, tested against them), and latents as the
VAE's posterior mean (``vae.encode(x).latent_dist.mean``, minus ``shift_factor`` when the VAE has
one, times ``scaling_factor``): deterministic, no sampling.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffeat.errors import ModelError
from diffeat.models.json_files import read_json

logger = logging.getLogger(__name__)

#: Classes a pipeline folder may name, by library (anything else is refused before importing it).
ALLOWED_CLASSES: dict[str, frozenset[str]] = {
    "diffusers": frozenset({
        "UNet2DModel", "UNet2DConditionModel", "AutoencoderKL", "DiTTransformer2DModel",
        "PixArtTransformer2DModel", "SD3Transformer2DModel",
    }),
    "transformers": frozenset({
        "CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel",
        "CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast",
    }),
}


def weights_sha256(module: nn.Module) -> str:
    """sha256 over every tensor of the state dict (name, dtype, shape, bytes), in name order.

    Independent of the file format the weights came from, so a converted checkpoint
    and a re-saved copy have the same identity.
    """
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        # reshape(-1): a 0-d tensor (BatchNorm's num_batches_tracked) has bytes too; same bytes for every other shape
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_model_index(folder: Path) -> dict:
    """``model_index.json`` of a pipeline folder."""
    return read_json(folder / "model_index.json")


def declared(index: dict, name: str) -> tuple[str, str] | None:
    """(library, class) the pipeline declares for component ``name``, or None when it has none."""
    entry = index.get(name)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[0] is None or entry[1] is None:
        return None
    return str(entry[0]), str(entry[1])


def check_components(folder: Path, index: dict, needed: tuple[str, ...], family: str) -> None:
    """Raise one line naming the first component ``family`` needs that the folder lacks."""
    for name in needed:
        if declared(index, name) is None and not (folder / name).is_dir():
            raise ModelError(f"{folder}: the pipeline has no `{name}` component, which a {family} model needs "
                             f"(components needed: {', '.join(needed)})")
        if not (folder / name).is_dir():
            raise ModelError(f"{folder}: model_index.json declares `{name}` but the folder {folder / name} is missing "
                             f"(a {family} model needs: {', '.join(needed)})")


def _class(folder: Path, index: dict, name: str) -> tuple[str, type]:
    decl = declared(index, name)
    if decl is None:  # a component folder model_index.json does not list: its config names the class
        config = folder / name / "config.json"
        cls_name = read_json(config).get("_class_name") if config.is_file() else None
        decl = ("diffusers", cls_name) if cls_name else None
    if decl is None:
        raise ModelError(f"{folder}: cannot tell the class of component `{name}` (no model_index.json entry)")
    library, cls_name = decl
    if library not in ALLOWED_CLASSES or cls_name not in ALLOWED_CLASSES[library]:
        allowed = "; ".join(f"{lib}: {', '.join(sorted(c))}" for lib, c in ALLOWED_CLASSES.items())
        raise ModelError(f"{folder}: component `{name}` is a {library}.{cls_name}, which diffeat does not load "
                         f"(known classes: {allowed})")
    import importlib

    cls = getattr(importlib.import_module(library), cls_name, None)
    if cls is None:
        raise ModelError(f"{folder}: {library} {importlib.import_module(library).__version__} has no {cls_name} "
                         f"(component `{name}`)")
    return library, cls


def load_component(folder: Path, index: dict, name: str, *, dtype: torch.dtype | None = None) -> object:
    """Component ``name`` of a pipeline folder, locally and strictly (see the module docstring).

    Models come back frozen and in eval mode; tokenizers as they are.
    """
    library, cls = _class(folder, index, name)
    sub = folder / name
    if cls.__name__.endswith(("Tokenizer", "TokenizerFast")):
        try:
            return cls.from_pretrained(str(sub), local_files_only=True)
        except ImportError as e:  # a folder with only spiece.model needs sentencepiece to build the fast tokenizer
            raise ModelError(f"could not load the tokenizer in {sub}: {e} (a T5 tokenizer folder without "
                             "tokenizer.json needs `pip install sentencepiece protobuf`)") from e
        except (OSError, ValueError, TypeError) as e:
            raise ModelError(f"could not load the tokenizer in {sub}: {e}") from e
    kwargs: dict = {"local_files_only": True, "output_loading_info": True}
    if library == "diffusers":
        kwargs["low_cpu_mem_usage"] = False
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
    else:
        kwargs["dtype"] = dtype if dtype is not None else torch.float32
    try:
        model, info = cls.from_pretrained(str(sub), **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"could not load component `{name}` ({cls.__name__}) in {sub}: {e}") from e
    check_loading_info(sub, cls.__name__, info)
    model.eval().requires_grad_(False)
    return model


def check_loading_info(folder: Path, cls_name: str, info: dict) -> None:
    """Strict loading: refuse missing, unexpected and mismatched weights, naming the first key."""
    for kind, what in (("missing_keys", "is missing from the weight files"),
                       ("unexpected_keys", "is in the weight files but not in the model"),
                       ("mismatched_keys", "has another shape in the weight files")):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or ())
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ModelError(f"{folder}: weight `{keys[0]}` of the {cls_name} {what}{more}: the folder does not match "
                             "its config (diffeat loads weights strictly)")


@dataclass
class Conditioning:
    """The inputs of an unconditional feature forward besides x_t and t, batch dimension 1.

    ``tensors`` are expanded to the batch at each call; ``identity`` says how they were made
    (the rule, the encoders' weights hashes, the token ids' hash) and enters the settings hash.
    """

    tensors: dict[str, torch.Tensor]
    identity: dict

    def to(self, device: torch.device | str) -> Conditioning:
        """The same conditioning on ``device``."""
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self

    def expanded(self, batch: int) -> dict[str, torch.Tensor]:
        """Every tensor with its leading dimension expanded to ``batch`` (a view: no copy)."""
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self.tensors.items()}

    def on_meta(self) -> Conditioning:
        """Shape-only copies (for forwards on the meta device)."""
        return Conditioning({k: torch.empty_like(v, device="meta") for k, v in self.tensors.items()}, self.identity)


def tensor_sha256(*tensors: torch.Tensor) -> str:
    """sha256 over dtype, shape and bytes of ``tensors`` (e.g. token ids), in order."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# -- the empty prompt, through the pipeline's own text encoders ---------------------------------------------------


@torch.no_grad()
def clip_prompt(tokenizer, encoder: nn.Module, prompt: str = "", *, penultimate: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """A CLIP text encoder's embeddings of ``prompt`` as Stable Diffusion pipelines compute them.

    SD 1.x/2.x (``penultimate=False``): the last hidden state (after the final layer norm),
    with the attention mask only if the encoder's config asks for it. SDXL and SD3
    (``penultimate=True``): ``hidden_states[-2]``, plus the pooled projection when the
    encoder has one (``CLIPTextModelWithProjection``). Returns (embeds (1, L, D), pooled
    (1, P) or None, identity).
    """
    inputs = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    ids = inputs.input_ids
    if penultimate:
        out = encoder(ids, output_hidden_states=True)
        pooled = out[0] if out[0].ndim == 2 else None
        hidden = out.hidden_states[-2]
    else:
        mask = inputs.attention_mask if getattr(encoder.config, "use_attention_mask", False) else None
        hidden, pooled = encoder(ids, attention_mask=mask)[0], None
    identity = {"class": type(encoder).__name__, "weights_sha256": weights_sha256(encoder),
                "tokens_sha256": tensor_sha256(ids),
                "output": "hidden_states[-2]" if penultimate else "last_hidden_state"}
    return hidden.float(), None if pooled is None else pooled.float(), identity


@torch.no_grad()
def t5_prompt(tokenizer, encoder: nn.Module, max_length: int, prompt: str = "", *, masked: bool
              ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A T5 encoder's embeddings of ``prompt``, padded to ``max_length``, as PixArt (``masked``) and SD3 compute them.

    Returns (embeds (1, L, D), attention mask (1, L), identity).
    """
    inputs = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    mask = inputs.attention_mask
    hidden = encoder(inputs.input_ids, attention_mask=mask if masked else None)[0]
    identity = {"class": type(encoder).__name__, "weights_sha256": weights_sha256(encoder),
                "tokens_sha256": tensor_sha256(inputs.input_ids, mask), "max_length": max_length, "masked": masked}
    return hidden.float(), mask, identity


def random_conditioning(shapes: dict[str, tuple[int, ...]], arch: str, seed: int = 0, *, device: str = "cpu"
                        ) -> Conditioning:
    """Seeded N(0, 1) stand-ins for text embeddings of a ``random:<arch>`` model (it has no text encoder)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: (torch.empty(s, device="meta") if device == "meta" else torch.randn(s, generator=gen).to(device))
               for k, s in sorted(shapes.items())}
    return Conditioning(tensors, {"rule": f"random:{arch}: seeded N(0, 1) text embeddings (no text encoder)",
                                  "seed": seed})


# -- latents --------------------------------------------------------------------------------------------------------


def encode_latents(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> the model's latents: (posterior mean − shift_factor) × scaling_factor, in float32.

    The VAE runs in float32 outside any autocast: latents are computed once per image and
    shared by every t and noise draw, and the SD-XL VAE overflows in float16.
    """
    config = vae.config
    device = pixels.device.type
    off = torch.autocast(device, enabled=False) if device in ("cpu", "cuda") else contextlib.nullcontext()
    with off:
        mean = vae.encode(pixels.float()).latent_dist.mean
    shift = getattr(config, "shift_factor", None)
    if shift is not None:
        mean = mean - shift
    return mean * config.scaling_factor


class LatentEncoder:
    """A pipeline's VAE as diffeat uses it: the encoder only, posterior mean, scaled.

    The decoder is dropped (feature extraction never decodes; ~50M parameters of the SD VAE).
    The identity hashes the weights that remain, so two VAEs that share an encoder and differ
    only in a fine-tuned decoder (sd-vae-ft-mse and sd-vae-ft-ema) give the same latents and
    the same identity.
    """

    def __init__(self, vae: nn.Module):
        for name in ("decoder", "post_quant_conv"):
            if getattr(vae, name, None) is not None:
                setattr(vae, name, None)
        self.vae = vae.eval().requires_grad_(False)
        self.scale = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent, per side (8 for SD)
        self.channels = int(vae.config.latent_channels)
        meta = any(p.is_meta for p in vae.parameters())
        config = vae.config
        self.identity = {
            "class": type(vae).__name__, "encoder_weights_sha256": "" if meta else weights_sha256(vae),
            "latent": "posterior mean", "scaling_factor": float(config.scaling_factor),
            "shift_factor": None if getattr(config, "shift_factor", None) is None else float(config.shift_factor),
            "dtype": "float32",
        }

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents (``encode_latents``)."""
        return encode_latents(self.vae, pixels)

    def on_meta(self) -> LatentEncoder:
        """The same encoder on the meta device (shapes only), with this one's identity."""
        with torch.device("meta"):
            copy = LatentEncoder(type(self.vae).from_config(self.vae.config))
        copy.identity = self.identity
        return copy

    def to(self, device: torch.device | str) -> LatentEncoder:
        """Move the VAE (it always stays float32)."""
        self.vae.to(device)
        return self


def load_vae(folder: Path, index: dict) -> LatentEncoder:
    """The pipeline's ``vae`` component (float32, strict), as a ``LatentEncoder``."""
    return LatentEncoder(load_component(folder, index, "vae", dtype=torch.float32))
