"""What an extract run reports: per setting, what happened (cached, written, resumed ...), and the totals."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SettingResult:
    """What happened to one setting in an extract run."""

    split: str
    block: int
    t: int | None  # None: a model without a timestep (a vision backbone)
    pool: int
    path: str
    shape: tuple[int, ...]
    outcome: str  # "cached" | "written" | "resumed" | "shared" | "incomplete"
    units_written: int = 0  # units this run (or its cluster) wrote

    def as_dict(self) -> dict:
        """JSON-friendly dict."""
        return {**self.__dict__, "shape": list(self.shape)}


@dataclass
class ExtractReport:
    """Summary of an extract run."""

    model: str
    dataset: str
    store: str
    settings: list[SettingResult] = field(default_factory=list)
    images: int = 0
    forwards: int = 0
    seconds: float = 0.0
    workers: list[str] = field(default_factory=list)  # host:pid of cluster workers that ran tasks
    model_loads: dict[str, int] = field(default_factory=dict)  # cluster worker host:pid -> models it loaded
    config: dict = field(default_factory=dict)  # the ExtractConfig, as run
    skipped: list[dict] = field(default_factory=list)  # images that could not be decoded: split, row, id, reason

    @property
    def images_per_second(self) -> float:
        """Images through the whole loop per second."""
        return self.images / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        """JSON-friendly dict (``diffeat extract --json``)."""
        return {"model": self.model, "dataset": self.dataset, "store": self.store, "images": self.images,
                "forwards": self.forwards, "seconds": round(self.seconds, 3), "workers": self.workers,
                "model_loads": self.model_loads, "settings": [s.as_dict() for s in self.settings],
                "skipped": self.skipped, "config": self.config}
