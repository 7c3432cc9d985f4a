"""Versions and devices: recorded with results and printed by ``diffeat env``."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

PACKAGES = ("torch", "diffusers", "zarr", "numcodecs", "numpy", "dask", "scikit-learn", "click")


def environment() -> dict[str, str]:
    """A flat dict of versions and devices."""
    import torch

    from diffeat import __version__

    info = {"diffeat": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = "not installed"
    if torch.cuda.is_available():
        info["cuda"] = f"{torch.version.cuda}, " + ", ".join(
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        info["cuda"] = "not available"
    info["cpu_threads"] = str(torch.get_num_threads())
    return info
