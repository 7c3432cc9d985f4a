"""Tiny real diffusers pipeline folders of every model family, for tests (nothing downloaded).

Each builder makes random components from the diffusers/transformers config classes (the
denoiser and VAE configs are the ``random:tiny-*`` architectures of diffeat's families), wraps
them in diffusers' own pipeline class and writes the folder with ``save_pretrained``: the
layout (``model_index.json``, one subfolder per component, safetensors) is what the hub's
pipelines have. Tokenizers are built locally: a hand-written CLIP BPE vocabulary, a small T5
unigram vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffeat.models.families import dit, latent_unet, pixart, sd3

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def clip_tokenizer(max_length: int = 8, pad_token: str = "<|endoftext|>"):
    """A CLIP BPE tokenizer over single letters and one merge ("ab"), ``model_max_length`` tokens."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["ab"], vocab["ab</w>"] = len(vocab), len(vocab) + 1
    if pad_token not in vocab:  # SD 2.x pads with "!"
        vocab[pad_token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[("a", "b"), ("a", "b</w>")], model_max_length=max_length,
                         pad_token=pad_token)


def t5_tokenizer():
    """A T5 unigram tokenizer over single letters (``</s>`` ends every prompt, ``<pad>`` pads)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in LETTERS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def clip_text_encoder(vocab_size: int, hidden: int, *, projection: int | None = None, seed: int = 0,
                      max_positions: int = 8):
    """A 2-layer CLIP text encoder (with a projection head when ``projection`` is given)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_positions,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=projection or hidden)
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def t5_encoder(vocab_size: int, d_model: int, seed: int = 0):
    """A 2-layer T5 encoder."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                                   num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()


def _vae(config: dict, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**config).eval()


def sd_pipeline(out: Path, *, sd2: bool = False) -> Path:
    """A Stable Diffusion 1.x (or 2.x: ``!`` padding, v-prediction config) pipeline folder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet_config, vae_config, _ = latent_unet.ARCHITECTURES["tiny-sd"]
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**unet_config)
    tokenizer = clip_tokenizer(pad_token="!" if sd2 else "<|endoftext|>")
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, prediction_type="v_prediction" if sd2 else "epsilon")
    pipe = StableDiffusionPipeline(vae=_vae(vae_config, 2), text_encoder=clip_text_encoder(len(tokenizer), 16, seed=3),
                                   tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


def sdxl_pipeline(out: Path) -> Path:
    """A Stable Diffusion XL pipeline folder: two CLIP encoders, pooled embeds, added time ids."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    unet_config, vae_config, _ = latent_unet.ARCHITECTURES["tiny-sdxl"]
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**unet_config)
    tok, tok2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=_vae(vae_config, 2), text_encoder=clip_text_encoder(len(tok), 16, seed=3), tokenizer=tok,
        text_encoder_2=clip_text_encoder(len(tok2), 16, projection=16, seed=4), tokenizer_2=tok2, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    pipe.save_pretrained(out)
    return out


def dit_pipeline(out: Path) -> Path:
    """A DiT pipeline folder (class-conditional transformer with a null label, DDIM linear schedule)."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    config, vae_config = dit.ARCHITECTURES["tiny-dit"]
    torch.manual_seed(1)
    transformer = DiTTransformer2DModel(**config)
    pipe = DiTPipeline(transformer=transformer, vae=_vae(vae_config, 2),
                       scheduler=DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))
    pipe.save_pretrained(out)
    return out


def pixart_pipeline(out: Path) -> Path:
    """A PixArt-α pipeline folder (T5 text encoder with its attention mask)."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtTransformer2DModel,
    )

    config, vae_config, _ = pixart.ARCHITECTURES["tiny-pixart"]
    torch.manual_seed(1)
    transformer = PixArtTransformer2DModel(**config)
    tok = t5_tokenizer()
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=t5_encoder(len(tok), config["caption_channels"], seed=3),
                               vae=_vae(vae_config, 2), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=1e-4,
                                                                     beta_end=0.02))
    pipe.save_pretrained(out)
    return out


def sd3_pipeline(out: Path) -> Path:
    """An SD3 pipeline folder: CLIP-L, CLIP-G (with projections), T5, flow matching with shift 3."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    config, vae_config, _ = sd3.ARCHITECTURES["tiny-sd3"]
    torch.manual_seed(1)
    transformer = SD3Transformer2DModel(**config)
    tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(pad_token="!"), t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(vae_config, 2),
        text_encoder=clip_text_encoder(len(tok), 16, projection=16, seed=3), tokenizer=tok,
        text_encoder_2=clip_text_encoder(len(tok2), 16, projection=16, seed=4), tokenizer_2=tok2,
        text_encoder_3=t5_encoder(len(tok3), config["joint_attention_dim"], seed=5), tokenizer_3=tok3)
    pipe.save_pretrained(out)
    return out


BUILDERS = {"sd": sd_pipeline, "sdxl": sdxl_pipeline, "dit": dit_pipeline, "pixart": pixart_pipeline,
            "sd3": sd3_pipeline}
