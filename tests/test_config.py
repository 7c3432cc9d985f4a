"""One options record per stage: the CLI, the pipeline stages and the docs name exactly its fields.

A field added to ``ExtractConfig``/``ProbeConfig``/``CkaConfig`` without its CLI option, its
pipeline option or its line in docs/pipelines.md fails here, so the layers cannot drift.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import click
import pytest

from diffeat.cka.config import CkaConfig
from diffeat.cli.cka import cka as cka_command
from diffeat.cli.extract import extract as extract_command
from diffeat.cli.options import OUTPUT_PARAMS
from diffeat.cli.probe import HEAD_FLAGS
from diffeat.cli.probe import probe as probe_command
from diffeat.errors import DiffeatError
from diffeat.extract.config import ExtractConfig
from diffeat.pipelines.stages import KINDS
from diffeat.probe.config import ProbeConfig

DOCS = Path(__file__).resolve().parent.parent / "docs" / "pipelines.md"

#: record, its command, CLI parameters folded into one field (param -> field)
STAGES = [
    (ExtractConfig, extract_command, {}),
    (ProbeConfig, probe_command, {p: "head_options" for p in HEAD_FLAGS}),
    (CkaConfig, cka_command, {}),
]


def cli_fields(command: click.Command, folded: dict[str, str]) -> set[str]:
    """The record fields a command's parameters stand for."""
    names = {p.name for p in command.params} - OUTPUT_PARAMS
    return {folded.get(n, n) for n in names}


def docs_fields(stage: str) -> set[str]:
    """The option names listed under ``#### `stage``` → ``Options:`` in docs/pipelines.md."""
    text = DOCS.read_text()
    section = text[text.index(f"#### `{stage}`"):]
    options = section[section.index("Options:") + len("Options:"):].strip().split("\n\n", 1)[0]
    return set(re.findall(r"`([a-z_]+)`", options))


def drift(record: type, command: click.Command, folded: dict[str, str]) -> dict[str, set[str]]:
    """What the CLI, the pipeline stage and the docs lack or add, against the record's fields."""
    fields = set(record.field_names())
    stage = set(KINDS[record.stage].options)
    out = {
        "missing in CLI": fields - cli_fields(command, folded),
        "extra in CLI": cli_fields(command, folded) - fields,
        "missing in pipeline": fields - stage,
        "missing in docs": fields - docs_fields(record.stage),
        "extra in docs": docs_fields(record.stage) - fields,
    }
    return {k: v for k, v in out.items() if v}


@pytest.mark.parametrize("record, command, folded", STAGES, ids=lambda x: getattr(x, "stage", ""))
def test_cli_pipeline_and_docs_name_exactly_the_record_fields(record, command, folded):
    assert drift(record, command, folded) == {}


def test_a_field_without_its_cli_option_is_caught():
    @dataclasses.dataclass(frozen=True)
    class Grown(ExtractConfig):
        new_option: int = 0

    problems = drift(Grown, extract_command, {})
    assert problems["missing in CLI"] == {"new_option"}
    assert problems["missing in docs"] == {"new_option"}


@pytest.mark.parametrize("record, command, folded", STAGES, ids=lambda x: getattr(x, "stage", ""))
def test_cli_defaults_are_the_record_defaults(record, command, folded):
    defaults = {f.name: f.default for f in dataclasses.fields(record) if f.default is not dataclasses.MISSING}
    for param in command.params:
        if param.name in OUTPUT_PARAMS or param.name in folded or param.multiple or param.required:
            continue
        default = None if type(param.default).__name__ == "Sentinel" else param.default  # click's "unset"
        assert default == defaults[param.name], param.name


def test_records_check_themselves_in_one_line():
    with pytest.raises(DiffeatError, match=r"--t 5000 is out of range: timesteps are integers 0\.\.999"):
        ExtractConfig(dataset="digits", model="digits-ddpm", blocks=[3], ts=[5000], store="s.zarr")
    with pytest.raises(DiffeatError, match="--dtype 'float8' is invalid: choose one of float32, bfloat16, float16"):
        ExtractConfig(dataset="digits", model="digits-ddpm", blocks=[3], ts=[50], store="s.zarr", dtype="float8")
    with pytest.raises(DiffeatError, match="--memory-budget 'lots' is not a size"):
        ProbeConfig(store="s.zarr", dataset="digits", memory_budget="lots")
    with pytest.raises(DiffeatError, match="--route 'fast' is invalid"):
        CkaConfig(store="s.zarr", dataset="digits", blocks=[3], route="fast")
    with pytest.raises(DiffeatError, match="unknown extract option"):
        ExtractConfig.from_options({"dataset": "digits", "bogus": 1})


def test_records_normalise_and_round_trip_as_json():
    c = ExtractConfig(dataset="digits", model="digits-ddpm", blocks=[7, 3, 3], ts=90, store="s.zarr")
    assert c.blocks == (3, 7) and c.ts == (90,) and c.pools == (1,)
    assert ExtractConfig(**c.as_dict()) == c and ExtractConfig(**c.as_dict()).key() == c.key()
    assert c.for_workers().store == str(Path("s.zarr").resolve())
