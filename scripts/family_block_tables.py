"""Write the model-family section of docs/blocks.md: the block table of a real configuration of every family.

Every number is computed on the meta device (no weights, no memory) from the architecture's
config (``random:<arch>`` builds it): module, shape, parameters, FLOPs; and the schedules'
coefficients. Nothing is typed in. The section sits between ``<!-- families:begin -->`` and
``<!-- families:end -->``; tests/test_families.py checks its tables are this script's.

    python scripts/family_block_tables.py            # rewrite the section of docs/blocks.md
    python scripts/family_block_tables.py --check    # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

#: (family heading, random:<arch>, the published model whose config it is, a note)
SECTIONS = [
    ("Pixel U-Nets: the paper's ADM-256", "adm256", "guided-diffusion 256x256_diffusion_uncond.pt, converted",
     "The paper's block 24 is `output_blocks.4` = `up_blocks[1].attentions[1]`; FLOPs per block: [adm.md](adm.md)."),
    ("Latent U-Nets: Stable Diffusion 1.x / 2.x", "sd15-unet", "runwayml/stable-diffusion-v1-5",
     "The same rule as ADM's, with the original LDM code's names (`input_blocks`, `middle_block` = block "
     "{mid_block}, `output_blocks`). Shapes are in latent space (the VAE downsamples 8×)."),
    ("", "sd21-unet", "stabilityai/stable-diffusion-2-1",
     "DIFT's default model; DIFT's `up_ft_index=1` (the output of `up_blocks[1]`) is block {up_blocks.1} here."),
    ("Latent U-Nets: Stable Diffusion XL", "sdxl-unet", "stabilityai/stable-diffusion-xl-base-1.0",
     "Three levels (`mid_block` = block {mid_block}); the null conditioning adds the pooled text embeds and "
     "`time_ids` (R, R, 0, 0, R, R)."),
    ("Diffusion transformers: DiT", "dit-xl2", "facebook/DiT-XL-2-256",
     "Block 0 is the patch embedding, block N the output of transformer block N; tokens are reshaped "
     "row-major to the patch grid. diffusers' DiT keeps a copy of the timestep/label embedder in every "
     "block, hence more parameters than the paper's 675M for the same network."),
    ("Diffusion transformers: PixArt-α", "pixart-alpha-1024", "PixArt-alpha/PixArt-XL-2-1024-MS", ""),
    ("Diffusion transformers: Stable Diffusion 3", "sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers",
     "Blocks are the image stream after each joint (MM-DiT) block."),
    ("Vision backbones: the paper's baselines", "resnet50", "microsoft/resnet-50",
     "Block 0 is the stem (7×7 convolution and max-pool), block N the output of stage N: transformers' "
     "`hidden_states[N]`."),
    ("", "vit-b16", "google/vit-base-patch16-224",
     "Block 0 is the patch embedding (with the position embedding), block N the output of transformer layer N "
     "(`hidden_states[N]`, before the final layer norm); the class token is dropped and the 196 patch tokens "
     "reshaped row-major to the 14×14 grid."),
    ("Vision backbones: today's", "dinov2-s14", "facebook/dinov2-small",
     "The position embedding (for 518 px) is interpolated to the 16×16 grid of a 224 px crop, as the model "
     "always does."),
    ("", "clip-b32", "openai/clip-vit-base-patch32",
     "CLIP's vision tower (a `CLIPModel` folder loads whole, strictly, and keeps it); block 0 is the patch "
     "embedding after its `pre_layrnorm`."),
]


def table_lines(arch: str) -> list[str]:
    """The block table of ``random:<arch>`` at its native resolution, as markdown rows."""
    from diffeat.models.loading import load_model

    fm = load_model(f"random:{arch}", device="meta").model
    lines = ["| block | ADM/LDM name | module | C×H×W |", "|---|---|---|---|"]
    for b in fm.block_table():
        lines.append(f"| {b.index} | {b.adm_name or '–'} | `{b.module}` | {b.channels}×{b.height}×{b.width} |")
    return lines


def section(heading: str, arch: str, model: str, note: str) -> str:
    """One family's section: a sentence of totals and the block table."""
    from diffeat.models.flops import (
        count_model_flops,
        count_model_parameters,
        count_vae_flops,
    )
    from diffeat.models.loading import load_model

    fm = load_model(f"random:{arch}", device="meta").model
    res = fm.native_resolution
    # "{module}" in a note names the block whose module that is (numbers are never typed in)
    index = {b.module: b.index for b in fm.block_table()}
    note = re.sub(r"\{([\w.]+)\}", lambda m: str(index[m.group(1)]), note)
    vae = (f"; the VAE encoder adds {count_vae_flops(fm) / 1e9:,.1f} GFLOP per image (once per image, whatever "
           "the number of t)") if fm.latent else ""
    if fm.preprocessing is not None:  # a vision backbone: its own preprocessing, from its processor config
        p = fm.preprocessing
        size = (f"shorter side to {p.resize[1]}" if p.resize[0] == "shortest_edge"
                else f"to {p.resize[1]}×{p.resize[2]}")
        crop = f", center crop {p.crop[0]}×{p.crop[1]}" if p.crop else ""
        norm = ", ".join(f"{m:.3f}/{s:.3f}" for m, s in zip(p.mean, p.std))
        note += (f" Input: the image resized ({p.identity()['resample']}) {size}{crop}, scaled to [0, 1], "
                 f"normalised by mean/std {norm} ({p.processor}); no noise, no t.")
    lines = [f"### {heading}", ""] if heading else []
    lines += [
        f"`{model}` (`diffeat blocks --model random:{arch}`), {res} px: {type(fm.denoiser).__name__}, "
        f"{count_model_parameters(fm) / 1e6:,.1f}M parameters, {count_model_flops(fm) / 1e9:,.1f} GFLOP per image "
        f"for the full forward{vae}. {note}".rstrip(),
        "",
        *table_lines(arch),
    ]
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"

#: (name, scheduler config) of the training schedules the families use.
SCHEDULES = [
    ("ADM, DiT, PixArt: linear", {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}),
    ("Stable Diffusion 1.x/2.x/XL: scaled_linear", {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                    "beta_end": 0.012}),
    ("cosine (improved DDPM): squaredcos_cap_v2", {"beta_schedule": "squaredcos_cap_v2"}),
    ("SD3: flow matching, shift 3", {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}),
]
SCHEDULE_TS = (0, 10, 90, 150, 300, 500, 999)


def schedule_table() -> str:
    """Signal and noise coefficients (x_t = a·x0 + b·ε) of each schedule at a few ``--t``."""
    from diffeat.models.schedules import schedule_from_config

    lines = ["### What `--t` means per schedule", "",
             "x_t = a·x0 + b·ε; each cell is a / b (DDPM: a = √ᾱ_t, b = √(1−ᾱ_t); "
             "flow matching: a = 1−σ_t, "
             "b = σ_t with σ_t = shift·s/(1+(shift−1)·s), s = (t+1)/1000).", "",
             "| schedule | " + " | ".join(f"t={t}" for t in SCHEDULE_TS) + " |",
             "|---|" + "---|" * len(SCHEDULE_TS)]
    for name, config in SCHEDULES:
        sched = schedule_from_config(config)
        cells = [f"{a:.3f} / {b:.3f}" for a, b in (sched.coefficients(t) for t in SCHEDULE_TS)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def page() -> str:
    """The whole generated page."""
    head = ("<!-- generated by scripts/family_block_tables.py: do not edit by hand -->\n"
            "## Block tables of every model family\n\n"
            "Computed on the meta device from each architecture's configuration; FLOPs count a multiply-add "
            "as 2. How to point diffeat at each family offline: [models.md](models.md).\n\n")
    return head + "\n".join(section(*s) for s in SECTIONS) + "\n" + schedule_table()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs from the output")
    args = parser.parse_args()
    out = Path(__file__).resolve().parent.parent / "docs" / "blocks.md"
    before, rest = out.read_text().split(BEGIN + "\n", 1)
    old, after = rest.split(END, 1)
    text = page()
    if args.check:
        same = old == text
        print("up to date" if same else f"{out} is out of date: run scripts/family_block_tables.py")
        return 0 if same else 1
    out.write_text(before + BEGIN + "\n" + text + END + after)
    print(f"wrote the family section of {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
