"""jaxrnn.bench (experiments/benchmark.py, jaxrnn bench): its quick mode runs every contender and writes its outputs.

The benchmark is run once (quick mode, in-process through ``main``) and its
outputs are checked: every contender at every grid point, positive finite times,
the same first-step loss on every side (same weights, same data), memory figures,
and the markdown table and PNG chart.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

def _load():
    import jaxrnn.bench

    return jaxrnn.bench


@pytest.fixture(scope="module")
def bench():
    return _load()


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    status = bench.main(["--quick", "--repeats", "3", "--no-progress", "--out", str(out)])
    assert status == 0
    return out, json.loads((out / "benchmark.json").read_text())


def test_every_contender_and_grid_point_has_positive_finite_times(bench, run):
    _, results = run
    expected = {(c, *g) for c in bench.QUICK.cells for g in bench.QUICK.grid}
    got = {(p["cell"], p["T"], p["B"], p["H"]) for p in results["results"]}
    assert got == expected
    for p in results["results"]:
        assert set(p["methods"]) == set(bench.CONTENDERS), p["methods"].keys()
        for name, m in p["methods"].items():
            if name == "flax" and m["status"] == "not installed":
                continue
            assert m["status"] == "ok", (p["cell"], name, m["status"])
            assert len(m["times_ms"]) == m["repeats"] == 3
            assert all(math.isfinite(t) and t > 0 for t in m["times_ms"]), (name, m["times_ms"])
            assert 0 < m["median_ms"] < math.inf
            assert m["q1_ms"] <= m["median_ms"] <= m["q3_ms"]
        for name in ("bptt", "autodiff", "floor", "floor_chain"):
            assert p["methods"][name]["compile_s"] > 0


def test_first_step_losses_agree_on_every_side(run):
    # The same initial weights and data everywhere: the first step's loss (computed
    # before the update) must agree to float32 rounding.
    _, results = run
    for p in results["results"]:
        m = p["methods"]
        ref = m["bptt"]["first_loss"]
        assert ref > 0
        assert m["autodiff"]["first_loss"] == pytest.approx(ref, rel=1e-6)
        for name in ("torch", "torch_1t", "flax"):
            if m[name]["status"] == "ok":
                assert m[name]["first_loss"] == pytest.approx(ref, rel=1e-5), (p["cell"], name)


def test_memory_figures(run):
    _, results = run
    for p in results["results"]:
        H, D, O = p["H"], p["input_size"], p["output_size"]
        G = p["gates"]
        n_params = G * H * (D + H + 2) + O * (H + 1)
        batch_bytes = 4 * p["T"] * p["B"] * (D + O)
        for name in ("bptt", "autodiff"):
            mem = p["methods"][name]["memory"]
            # the arguments hold the parameters, Adam's two moments and the batch
            assert mem["argument_size_in_bytes"] >= 4 * 3 * n_params + batch_bytes
            assert mem["peak_bytes"] >= mem["argument_size_in_bytes"]
        torch_mem = p["methods"]["torch"]["memory"]
        if "peak_bytes" in torch_mem:  # a private torch API; "unavailable" is allowed
            assert torch_mem["peak_bytes"] >= torch_mem["preexisting_bytes"] > 0


def test_ratios_are_the_medians_ratios(run):
    _, results = run
    for p in results["results"]:
        m, r = p["methods"], p["ratios"]
        assert r["bptt_speedup_vs_autodiff"] == pytest.approx(
            m["autodiff"]["median_ms"] / m["bptt"]["median_ms"])
        assert r["bptt_speedup_vs_torch"] == pytest.approx(
            m["torch"]["median_ms"] / m["bptt"]["median_ms"])
        assert r["floor_over_bptt"] == pytest.approx(
            m["floor"]["median_ms"] / m["bptt"]["median_ms"])


def test_environment_is_recorded(run):
    _, results = run
    env = results["environment"]
    for lib in ("jax", "jaxlib", "torch", "flax"):
        assert env["versions"][lib]
    assert env["cpu"]
    assert env["threads"]["torch_intra_op"] == env["threads"]["jax_xla_cpu"] >= 1


def test_markdown_and_png_are_written(bench, run):
    out, results = run
    md = (out / "benchmark.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(results["results"])  # header + one row per grid point
    for p in results["results"]:
        assert any(row.startswith(f"| {p['cell']} | {p['T']} | {p['B']} | {p['H']} |")
                   for row in rows)
    png = (out / "benchmark.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_flax_weights_give_jaxrnn_outputs(bench):
    # The weight mapping behind the Flax contender: same function, same outputs.
    flax = pytest.importorskip("flax")  # noqa: F841
    import jax
    import jax.numpy as jnp

    import jaxrnn

    xs = jnp.asarray(np.random.default_rng(0).standard_normal((7, 3, 2)), jnp.float32)
    for cell in ("elman", "lstm", "gru"):
        model = jaxrnn.RNN(cell=cell, input_size=2, hidden_size=5, output_size=3)
        params = model.init(jax.random.key(1), jnp.float32)
        net = bench._flax_modules()(cell, 5, 3)
        ys_flax = net.apply({"params": bench.flax_params(model, params)}, xs)
        ys, _ = model.apply(params, xs)
        np.testing.assert_allclose(ys_flax, ys, rtol=1e-5, atol=1e-6, err_msg=cell)


def test_bad_settings_exit_2(bench, capsys):
    assert bench.main(["--quick", "--repeats", "0", "--no-progress"]) == 2
    assert "repeats must be >= 1" in capsys.readouterr().err
