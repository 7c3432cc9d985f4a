"""Model families: one module per kind of pretrained model (diffusion models, and vision backbones), one line each.

``FAMILIES`` maps a family's name to its ``ModelFamily`` (``base.py`` says what a family gives).
A new family is a module here plus one line below.
"""

from __future__ import annotations

from diffeat.errors import ModelError
from diffeat.models.families import dit, latent_unet, pixart, pixel_unet, sd3, vision
from diffeat.models.families.base import FeatureModel, ModelFamily

FAMILIES: dict[str, ModelFamily] = {
    pixel_unet.FAMILY.name: pixel_unet.FAMILY,
    latent_unet.FAMILY.name: latent_unet.FAMILY,
    dit.FAMILY.name: dit.FAMILY,
    pixart.FAMILY.name: pixart.FAMILY,
    sd3.FAMILY.name: sd3.FAMILY,
    vision.FAMILY.name: vision.FAMILY,
}

__all__ = ["FAMILIES", "FeatureModel", "ModelFamily", "family_for", "random_architectures", "supported_families"]


def supported_families() -> str:
    """One line listing every family and the denoiser classes it takes (for error messages)."""
    return "; ".join(f"{f.name} ({', '.join(f.denoiser_classes)}{' + vae/' if f.latent else ''})"
                     for f in FAMILIES.values())


def family_for(class_name: str, has_vae: bool) -> ModelFamily:
    """The family of a denoiser class (a U-Net with a VAE beside it is latent, without one pixel-space)."""
    matches = [f for f in FAMILIES.values() if class_name in f.denoiser_classes]
    if not matches:
        raise ModelError(f"the model is a {class_name}, which no family of diffeat takes; supported: "
                         f"{supported_families()}")
    for f in matches:
        if f.latent == has_vae:
            return f
    f = matches[0]
    need = "a `vae` component" if f.latent else "no VAE"
    raise ModelError(f"a {class_name} with{'' if has_vae else 'out'} a VAE is not supported: the {f.name} family "
                     f"takes it with {need} ({f.summary})")


def random_architectures() -> dict[str, ModelFamily]:
    """``random:<arch>`` name -> the family that builds it."""
    out: dict[str, ModelFamily] = {}
    for family in FAMILIES.values():
        for arch in family.architectures:
            if arch in out:
                raise ModelError(f"internal: random:{arch} is defined by {out[arch].name} and {family.name}")
            out[arch] = family
    return out
