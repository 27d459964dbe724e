"""The library is typed for its users (PEP 561): mypy checks code against its API.

* ``names.py``'s ``Literal`` types are the runtime tables' keys (one home, no drift);
* ``mypy --strict`` passes over ``examples/typed_example.py`` and ``jaxrnn/__init__.py``
  (configuration: ``[tool.mypy]`` in pyproject.toml), and the example runs;
* a misspelt method (``method="bpt"``) fails the check: the ``Literal`` types bite.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

import pytest

import jaxrnn
from jaxrnn._src import names
from jaxrnn.extend import CELLS, METHODS, TRAIN_METHODS
from jaxrnn._src.estimators import ESTIMATORS
from jaxrnn._src.losses import LOSSES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "typed_example.py"


def test_literals_are_the_runtime_names():
    assert typing.get_args(names.ScanMethod) == METHODS == ("bptt", "autodiff")
    assert typing.get_args(names.EstimatorName) == tuple(ESTIMATORS)
    assert typing.get_args(names.Method) == TRAIN_METHODS == METHODS + tuple(ESTIMATORS)
    assert set(typing.get_args(names.LossName)) == set(LOSSES)
    assert set(typing.get_args(names.CellName)) == set(CELLS)
    assert jaxrnn.Method is names.Method and jaxrnn.CellName is names.CellName


@pytest.fixture(scope="module")
def mypy_cache():
    """A cache kept between runs (mypy validates it): a cold check of jax takes ~40 s."""
    path = Path(tempfile.gettempdir()) / "jaxrnn-test-mypy-cache"
    path.mkdir(exist_ok=True)
    return path


def mypy(cache: Path, *paths: Path | str) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` with the project's configuration, run from the repository root."""
    cmd = [sys.executable, "-m", "mypy", "--strict", "--config-file",
           str(ROOT / "pyproject.toml"), "--cache-dir", str(cache), "--no-color-output",
           *map(str, paths)]
    env = {**os.environ, "MYPY_FORCE_COLOR": "0"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_example_and_public_api_pass_mypy_strict(mypy_cache):
    out = mypy(mypy_cache, EXAMPLE, ROOT / "jaxrnn" / "__init__.py")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success" in out.stdout


def test_misspelt_method_fails_mypy(mypy_cache, tmp_path):
    snippet = tmp_path / "typo.py"
    snippet.write_text(
        "import jax\n"
        "import jaxrnn\n\n"
        "model = jaxrnn.RNN(cell='elman', input_size=2, hidden_size=3, output_size=1)\n"
        "params = model.init(jax.random.key(0))\n"
        "xs = jax.numpy.zeros((4, 2, 2))\n"
        "ys = jax.numpy.zeros((4, 2, 1))\n"
        "model.loss_and_grad(params, xs, ys, method='bpt')\n"
        "jaxrnn.RNN(cell='lsmt', input_size=2, hidden_size=3, output_size=1)\n")
    out = mypy(mypy_cache, snippet)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Literal['bpt']" in out.stdout and "'bptt'" in out.stdout, out.stdout
    assert "Literal['lsmt']" in out.stdout, out.stdout
    assert out.stdout.count("typo.py:") == 2, out.stdout  # those two lines, nothing else


def test_typed_example_runs(capsys):
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert "loss" in capsys.readouterr().out
