"""Tiny real transformers vision-backbone folders, for tests (nothing downloaded).

Each builder makes the model a hub repository holds, from the ``random:tiny-*`` configs of
diffeat's vision family, with seeded random weights, and writes it with ``save_pretrained``
(``config.json`` naming its class in ``architectures``, ``model.safetensors``) beside the
``preprocessor_config.json`` that transformers' own image-processor class writes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffeat.models.families.vision import RANDOM, build_config


def _processor(name: str, folder: Path) -> None:
    import transformers

    from diffeat.models.preprocessing import PROCESSOR_CLASSES

    config = dict(RANDOM[name].processor)
    kind = config.pop("image_processor_type")
    getattr(transformers, PROCESSOR_CLASSES[kind])(**config).save_pretrained(folder)


def _save(model, name: str, folder: Path) -> Path:
    model.eval().save_pretrained(folder)
    _processor(name, folder)
    return folder


def resnet_classifier(folder: Path) -> Path:
    """A ResNet with its classification head, as microsoft/resnet-50 is stored (``resnet.`` + ``classifier.``)."""
    from transformers import ResNetForImageClassification

    config = build_config("tiny-resnet")
    config.num_labels = 3
    torch.manual_seed(1)
    return _save(ResNetForImageClassification(config), "tiny-resnet", folder)


def vit(folder: Path) -> Path:
    """A bare ViTModel with its pooler, as google/vit-base-patch16-224-in21k is stored."""
    from transformers import ViTModel

    torch.manual_seed(2)
    return _save(ViTModel(build_config("tiny-vit")), "tiny-vit", folder)


def dinov2(folder: Path) -> Path:
    """A Dinov2Model, as facebook/dinov2-small is stored (position embeddings of 56 px, interpolated to 32)."""
    from transformers import Dinov2Model

    torch.manual_seed(3)
    return _save(Dinov2Model(build_config("tiny-dinov2")), "tiny-dinov2", folder)


def clip(folder: Path) -> Path:
    """A whole CLIPModel (text and vision towers), as openai/clip-vit-base-patch32 is stored."""
    from transformers import CLIPConfig, CLIPModel

    vision = build_config("tiny-clip").to_dict()
    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(4)
    return _save(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)), "tiny-clip",
                 folder)


BUILDERS = {"resnet": resnet_classifier, "vit": vit, "dinov2": dinov2, "clip": clip}
