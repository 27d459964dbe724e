"""The documentation runs: every ```python block of README.md and docs/**/*.md.

The blocks run in two fresh subprocesses (JAX on the CPU, one import of JAX for
each, the files split between them), each block in a fresh namespace, so a block that leans on an
earlier block fails; every failure is reported with the file and the line of
its block. Blocks that need an extra say
so on their first line (``# needs: torch``); the test extra installs them all.
Also: README.md stays a front door (at most 300 lines), CHANGELOG.md has its
release sections, and the API reference site builds in mkdocs' strict mode.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```", re.S | re.M)

RUNNER = r"""
import json, sys, traceback
failures = []
for path, line, source in json.load(sys.stdin):
    try:
        exec(compile(source, f"{path}:{line}", "exec"), {"__name__": "__docs__"})
    except BaseException:
        failures.append(f"{path}:{line}\n{traceback.format_exc()}")
print("\n".join(failures), file=sys.stderr)
sys.exit(1 if failures else 0)
"""


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(path: Path) -> list[tuple[str, int, str]]:
    text = path.read_text()
    rel = str(path.relative_to(ROOT))
    return [(rel, text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


DOC_FILES = [p for p in markdown_files() if python_blocks(p)]


def test_there_are_python_blocks():
    assert len(DOC_FILES) >= 3


# the files' blocks in two groups, each in its own subprocess, so that the suite's two
# workers run them side by side (one group took 67 s of a 12-minute suite alone)
GROUPS = 2


@pytest.mark.parametrize("group", range(GROUPS))
def test_python_blocks_run(group):
    import json

    blocks = [block for k, path in enumerate(DOC_FILES) if k % GROUPS == group
              for block in python_blocks(path)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(blocks),
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900,
    )
    assert proc.returncode == 0, f"python blocks failed:\n{proc.stderr[-12000:]}"


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_keeps_the_ci_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in (ROOT / "README.md").read_text()


def test_changelog_has_release_sections():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(r"^## \[(Unreleased|0\.2\.0)\]", text, re.M)
    assert re.search(r"^## \[0\.1\.0\]", text, re.M)


def test_docs_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
