"""Versions, host and devices: recorded with every result (``run.json``) and printed by ``diffeat env``."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

#: Packages whose versions results depend on.
PACKAGES = ("torch", "numpy", "zarr", "numcodecs", "scikit-learn", "scipy", "dask", "distributed", "diffusers",
            "transformers", "safetensors", "click")


def package_versions(extra: Sequence[str] = ()) -> dict[str, str | None]:
    """Versions of Python, diffeat and the packages results depend on (None when not installed).

    Read from package metadata, so nothing heavy is imported.
    """
    from diffeat import __version__

    out: dict[str, str | None] = {"python": platform.python_version(), "diffeat": __version__}
    for name in (*PACKAGES, *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def host_info() -> dict[str, Any]:
    """Where a run happened: platform, machine, CPU count, GPU name when torch sees one."""
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "node": platform.node(), "cpus": os.cpu_count()}
    torch = sys.modules.get("torch")  # only report a GPU if the stage already imported torch
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def environment() -> dict[str, str]:
    """A flat dict of versions and devices (``diffeat env``)."""
    import torch

    info = {k: v or "not installed" for k, v in package_versions().items()}
    info["platform"] = platform.platform()
    if torch.cuda.is_available():
        info["cuda"] = f"{torch.version.cuda}, " + ", ".join(
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        info["cuda"] = "not available"
    info["cpu_threads"] = str(torch.get_num_threads())
    return info
