"""The command line: every command has help, help is instant, and results print as JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from diffeat.cli import COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from diffeat.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "print('HEAVY:' + ','.join(m for m in ('torch', 'diffusers', 'zarr', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "HEAVY:"


def test_blocks_json():
    result = CliRunner().invoke(main, ["blocks", "--model", "random:tiny", "--json"])
    assert result.exit_code == 0, result.output
    table = json.loads(result.output)
    assert len(table) == 13 and table[6] == {"block": 7, "module": "mid_block", "adm_name": "middle_block",
                                             "channels": 64, "height": 8, "width": 8}


def test_user_errors_are_one_line_without_traceback(store_path):
    result = CliRunner().invoke(main, ["extract", "--dataset", "digits", "--model", "random:tiny", "--block",
                                       "99", "--t", "90", "--store", store_path, "--limit", "2"])
    assert result.exit_code == 1
    assert "Error: --block 99 does not exist" in result.output and "Traceback" not in result.output
    bad = CliRunner().invoke(main, ["extract", "--dataset", "digits", "--model", "random:tiny", "--block",
                                    "x", "--t", "90", "--store", store_path])
    assert bad.exit_code == 2 and "'x' is not an integer" in bad.output


def test_ls_json_fields(store_path):
    from diffeat.extract import extract

    extract(dataset="digits", model="random:tiny", blocks=[3], ts=[90], store=store_path, splits=["test"],
            limit=4, device="cpu", num_workers=0)
    (entry,) = json.loads(CliRunner().invoke(main, ["ls", "--store", store_path, "--json"]).output)
    assert {"model", "dataset", "split", "block", "t", "pool", "shape", "dtype", "status", "path"} <= set(entry)
    assert entry["status"] == "complete" and entry["shape"] == [4, 32, 1, 1]
