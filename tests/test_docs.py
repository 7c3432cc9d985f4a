"""The documentation: its Python snippets run, its references match the code, and the site builds strictly.

Every fenced ```python block of docs/*.md runs, page by page in one namespace (a later
block may use an earlier one's names), in a fresh working directory. A block that needs
data, weights or a GPU is skipped by putting the line ``<!-- no-test -->`` right before it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
_BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)```", re.DOTALL)
NO_TEST = "<!-- no-test -->"


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line number, code, skipped)`` of every ```python block; skipped when the line before is NO_TEST."""
    out = []
    for m in _BLOCK.finditer("\n" + text):
        line = text[:max(0, m.start("code") - 1)].count("\n") + 1
        previous = m.group("before").strip()
        # Allow one blank line between the marker and the fence.
        if not previous:
            before = text[:max(0, m.start() - 1)].rstrip("\n").rsplit("\n", 1)[-1].strip()
            previous = before
        out.append((line, m.group("code"), previous == NO_TEST))
    return out


def test_block_finder_honours_the_marker():
    text = "a\n```python\nx = 1\n```\n<!-- no-test -->\n```python\nraise SystemExit\n```\n"
    assert [(code, skipped) for _, code, skipped in python_blocks(text)] == [("x = 1\n", False),
                                                                              ("raise SystemExit\n", True)]


@pytest.mark.parametrize("page", [p for p in PAGES if "```python" in p.read_text()], ids=lambda p: p.name)
def test_python_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the snippets use the 8-px demo model: one thread is faster on a busy CPU
    namespace: dict = {"__name__": "__docs__"}
    try:
        for line, code, skipped in python_blocks(page.read_text()):
            if skipped:
                continue
            try:
                exec(compile(code, f"{page.name}:{line}", "exec"), namespace)  # noqa: S102 - the docs' own code
            except Exception as e:  # noqa: BLE001 - report which snippet failed
                pytest.fail(f"{page.name}, the python block at line {line} failed: {type(e).__name__}: {e}\n"
                            f"(mark it with {NO_TEST} on the line before if it needs data, weights or a GPU)")
    finally:
        torch.set_num_threads(threads)


def test_cli_page_lists_every_command():
    from diffeat.cli import COMMANDS, SUMMARIES

    text = (DOCS / "cli.md").read_text()
    for name in {*COMMANDS, *SUMMARIES, "run", "demo"}:
        assert f"`diffeat {name}`" in text, name


def test_pipelines_page_lists_every_stage_option():
    from diffeat.pipelines import KINDS

    text = (DOCS / "pipelines.md").read_text()
    for kind in KINDS.values():
        section = text.split(f"#### `{kind.name}`", 1)[1].split("####", 1)[0]
        for option in kind.options:
            if option in kind.axes.values():
                continue  # set through `matrix:`
            assert f"`{option}`" in section, f"{kind.name}: {option}"
        for axis in kind.axes:
            assert f"`{axis}`" in section, f"{kind.name}: matrix axis {axis}"


def test_every_image_a_page_shows_exists():
    for page in PAGES:
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text()):
            assert (DOCS / target).is_file(), f"{page.name}: {target}"


def test_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f",
                             str(REPO / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                            capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "pipelines" / "index.html").is_file()
