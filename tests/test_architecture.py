"""The package's floors: each folder imports only from its own floor or the floors below, with no circles.

Floors (docs/architecture.md): errors, runtime, output -> data, models, store, heads ->
extract, probe, cka -> pipelines -> cli. Imports inside functions count; imports under
``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "diffeat"

FLOORS = {
    "errors": 0, "runtime": 0, "output": 0, "__init__": 0, "__main__": 4,
    "data": 1, "models": 1, "store": 1, "heads": 1,
    "extract": 2, "probe": 2, "cka": 2,
    "pipelines": 3,
    "cli": 4,
}


def modules() -> dict[str, Path]:
    return {".".join(("diffeat", *p.relative_to(PACKAGE).with_suffix("").parts)): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """diffeat modules imported by ``path`` (lazy ones included, ``TYPE_CHECKING`` blocks skipped)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
               for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("diffeat"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffeat") and not node.level:
            out.add(node.module)
    return out


def floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS[parts[1] if len(parts) > 1 else "__init__"]


def test_every_folder_has_a_floor():
    assert {m.split(".")[1] for m in modules() if m != "diffeat"} <= set(FLOORS)


def test_no_import_reaches_a_higher_floor():
    upward = [f"{m} (floor {floor(m)}) imports {i} (floor {floor(i)})"
              for m, p in modules().items() for i in imports(p) if i != "diffeat" and floor(i) > floor(m)]
    assert upward == []


def test_no_import_circles():
    mods = modules()
    edges = {m: {i for i in imports(p) if i in mods and i != m} for m, p in mods.items()
             if not m.endswith("__init__")}
    seen: set[str] = set()

    def reaches(start: str, goal: str) -> bool:
        stack, visited = list(edges.get(start, ())), set()
        while stack:
            m = stack.pop()
            if m == goal:
                return True
            if m not in visited:
                visited.add(m)
                stack.extend(edges.get(m, ()))
        return False

    circles = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if b in edges and reaches(b, a)
                     and (b, a) not in seen and not seen.add((a, b)))
    assert circles == []
