"""The house's three parts and their one-way imports: library <- run application <- lab.

* ``import jaxrnn`` loads jax, optax and numpy, and none of the application's or the
  lab's heavy dependencies (orbax, matplotlib, tqdm, torch, flax).
* The library (``jaxrnn/``) imports nothing from the application (``jaxrnn_app``) or
  the lab (``jaxrnn_lab``); the application imports nothing from the lab statically
  (``jaxrnn bench`` reaches the lab by name, only when it runs).
* Outside the library, code uses the public API (``jaxrnn``, ``jaxrnn.extend``), not
  ``jaxrnn._src``, and no module imports or reads another module's underscore names.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY, APP, LAB, EXPERIMENTS = "jaxrnn", "jaxrnn_app", "jaxrnn_lab", "experiments"

# The one lab script that patches the library's internals on purpose: it times
# alternative formulations of the scan and the cells' math (docs: performance).
INTERNALS_ALLOWED = {Path("jaxrnn_lab/perf/step_formulations.py")}


def python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def imported_modules(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import statement in ``path``, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


def offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in python_files(folder):
        for line, module, _ in imported_modules(path):
            if module.split(".")[0] in forbidden:
                found.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    return found


def test_import_jaxrnn_loads_no_application_dependency():
    code = ("import sys, jaxrnn, jaxrnn.extend; "
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = set(ast.literal_eval(out.strip()))
    assert {"jax", "optax", "numpy"} <= loaded
    heavy = {"orbax", "matplotlib", "tqdm", "torch", "flax", "equinox", "tensorstore",
             "jaxrnn_app", "jaxrnn_lab"}
    assert not heavy & loaded, f"import jaxrnn loaded {sorted(heavy & loaded)}"


def test_library_imports_neither_the_application_nor_the_lab():
    assert offenders(LIBRARY, (APP, LAB)) == []


def test_application_imports_not_the_lab():
    assert offenders(APP, (LAB,)) == []


@pytest.mark.parametrize("folder", [APP, LAB, EXPERIMENTS, "examples"])
def test_outside_the_library_only_the_public_api(folder):
    found = []
    for path in python_files(folder):
        if path.relative_to(ROOT) in INTERNALS_ALLOWED:
            continue
        for line, module, names in imported_modules(path):
            if module.startswith("jaxrnn._src") or module == "jaxrnn" and "_src" in names:
                found.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    assert found == []


def _private_reads(path: Path) -> list[str]:
    """Imports of ``_name`` from jaxrnn modules, and ``module._name`` reads of them."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = set()  # local names bound to jaxrnn* modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxrnn"):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno}: imports {a.name}")
                aliases.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("jaxrnn"):
                    aliases.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__") and node.attr != "_src"
                and isinstance(node.value, ast.Name) and node.value.id in aliases):
            found.append(f"{path.name}:{node.lineno}: reads {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("folder", [LIBRARY, APP, LAB, EXPERIMENTS])
def test_no_module_reads_another_modules_private_names(folder):
    found = []
    for path in python_files(folder):
        found += _private_reads(path)
    assert found == []


def test_private_read_finder_finds_one():
    """The finder above is not vacuous: it sees both kinds of private read."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.py"
        p.write_text("from jaxrnn._src.cells import _x\nfrom jaxrnn._src import scan\n"
                     "scan._y(1)\n")
        assert _private_reads(p) == ["m.py:1: imports _x", "m.py:3: reads scan._y"]


# --- functions with one job ------------------------------------------------------

MAX_LINES = 60  # of a function's code, its docstring not counted

# Library functions over the limit, with their length when this list was last cut
# (empty since issue 20 split backward_scan, train_loop and _rtrl by role). The test
# fails when one listed here grows, when another function passes the limit, and when
# one listed here has been split (so that its entry is deleted).
STILL_LONG: dict[str, int] = {}


def code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the last."""
    body = node.body
    if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        body = body[1:]
    return 0 if not body else body[-1].end_lineno - body[0].lineno + 1


def long_functions(folder: str) -> dict[str, int]:
    out = {}
    for path in python_files(folder):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = code_lines(node)
                if n > MAX_LINES:
                    out[f"{path.relative_to(ROOT).as_posix()}::{node.name}"] = n
    return out


def test_library_functions_fit_on_a_screen():
    found = long_functions(LIBRARY)
    new = {k: v for k, v in found.items() if k not in STILL_LONG}
    grown = {k: (STILL_LONG[k], v) for k, v in found.items() if k in STILL_LONG
             and v > STILL_LONG[k]}
    split = sorted(set(STILL_LONG) - set(found))
    assert new == {}, f"functions over {MAX_LINES} lines: {new}"
    assert grown == {}, f"long functions grew (was, now): {grown}"
    assert split == [], f"now within {MAX_LINES} lines: delete {split} from STILL_LONG"
