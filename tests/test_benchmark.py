"""jaxrnn_lab.bench (jaxrnn_lab/bench, jaxrnn bench): its quick mode runs every contender and writes its outputs.

The benchmark is run once (quick mode, in-process through ``main``) and its
outputs are checked: every contender at every grid point (one unidirectional
layer and two bidirectional ones), positive finite times, the same first-step
loss on every side (same weights, same data), memory figures, the product floor
(its products, kernel times and sum), and the markdown tables and PNG chart.
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest


def _load():
    import jaxrnn_lab.bench

    return jaxrnn_lab.bench


@pytest.fixture(scope="module")
def bench():
    return _load()


# Two runs: the quick grid (every cell, one layer, bfloat16 steps too) and two
# bidirectional LSTM layers (without the bfloat16 steps: the "not run" path, no cost).
RUNS = {"quick": [], "bidirectional": ["--cells", "lstm", "--grid", "10,2,8,2,bi", "--variants",
                                       "--no-bf16"]}


@pytest.fixture(scope="module")
def runs(bench, tmp_path_factory):
    """``runs(name)``: ``(out_dir, benchmark.json)`` of the run ``RUNS[name]``, run once."""
    done = {}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp(f"bench-{name}")
            status = bench.main(["--quick", "--repeats", "3", "--no-progress", "--out",
                                 str(out)] + RUNS[name])
            assert status == 0
            done[name] = out, json.loads((out / "benchmark.json").read_text())
        return done[name]

    return get


@pytest.fixture(params=list(RUNS))
def run(request, runs):
    return runs(request.param)


def _key(p):
    return (p["cell"], p["T"], p["B"], p["H"], p["num_layers"], p["bidirectional"])


def test_cell_variants_time_bptt_against_autodiff(bench, runs):
    out, results = runs("quick")
    variants = results["variants"]
    assert [v["variant"] for v in variants] == list(bench.QUICK.variants)
    for v in variants:
        m = v["methods"]
        assert set(m) == {"bptt", "autodiff"}
        for name in m:
            assert len(m[name]["times_ms"]) == 3
            assert all(math.isfinite(t) and t > 0 for t in m[name]["times_ms"])
        # the same model and data: the same first loss (float32 rounding)
        assert m["bptt"]["first_loss"] == pytest.approx(m["autodiff"]["first_loss"], rel=1e-5)
        assert v["bptt_speedup_vs_autodiff"] == pytest.approx(
            m["autodiff"]["median_ms"] / m["bptt"]["median_ms"])
    proj = [v for v in variants if v["variant"] == "lstm_proj"][0]
    assert proj["options"] == {"cell": "lstm", "proj_size": proj["H"] // 4}
    md = (out / "benchmark.md").read_text()
    assert "## Cell variants: bptt against autodiff" in md and "| lstm_proj |" in md
    assert runs("bidirectional")[1]["variants"] == []


def test_every_contender_and_grid_point_has_positive_finite_times(bench, run):
    _, results = run
    grid, cells = results["settings"]["grid"], results["settings"]["cells"]
    expected = {(c, *g) for c in cells for g in grid}
    assert {_key(p) for p in results["results"]} == expected
    assert expected in ({(c, *g) for c in bench.QUICK.cells for g in bench.QUICK.grid},
                        {("lstm", 10, 2, 8, 2, True)})
    assert results["contenders"] == list(bench.CONTENDERS)
    for p in results["results"]:
        assert list(p["methods"]) == list(bench.METHODS)
        for name in bench.CONTENDERS:
            m = p["methods"][name]
            if name == "flax" and m["status"] == "not installed":
                continue
            if name in bench.MIXED_PRECISION and not results["settings"]["bf16"]:
                assert m == {"status": "not run"}
                continue
            assert m["status"] == "ok", (_key(p), name, m["status"])
            assert len(m["times_ms"]) == m["repeats"] == 3
            assert all(math.isfinite(t) and t > 0 for t in m["times_ms"]), (name, m["times_ms"])
            assert 0 < m["median_ms"] < math.inf
            assert m["q1_ms"] <= m["median_ms"] <= m["q3_ms"]
        for name in ("bptt", "autodiff", "xla_chain"):
            assert p["methods"][name]["compile_s"] > 0


def test_first_step_losses_agree_on_every_side(run):
    # The same initial weights and data everywhere: the first step's loss (computed
    # before the update) must agree to float32 rounding, for two bidirectional layers too.
    _, results = run
    for p in results["results"]:
        m = p["methods"]
        ref = m["bptt"]["first_loss"]
        assert ref > 0
        assert m["autodiff"]["first_loss"] == pytest.approx(ref, rel=1e-6)
        for name in ("torch", "torch_1t", "flax"):
            if m[name]["status"] == "ok":
                assert m[name]["first_loss"] == pytest.approx(ref, rel=1e-5), (_key(p), name)


def test_memory_figures(run):
    _, results = run
    for p in results["results"]:
        H, D, O, G = p["H"], p["input_size"], p["output_size"], p["gates"]
        dirs = 2 if p["bidirectional"] else 1
        n_params = O * (dirs * H + 1)  # readout
        for layer in range(p["num_layers"]):
            d_in = D if layer == 0 else dirs * H
            n_params += dirs * G * H * (d_in + H + 2)
        batch_bytes = 4 * p["T"] * p["B"] * (D + O)
        for name in ("bptt", "autodiff"):
            mem = p["methods"][name]["memory"]
            # the arguments hold the parameters, Adam's two moments and the batch
            assert mem["argument_size_in_bytes"] >= 4 * 3 * n_params + batch_bytes
            assert mem["peak_bytes"] >= mem["argument_size_in_bytes"]
        torch_mem = p["methods"]["torch"]["memory"]
        if "peak_bytes" in torch_mem:  # a private torch API; "unavailable" is allowed
            assert torch_mem["peak_bytes"] >= torch_mem["preexisting_bytes"] > 0


def test_bf16_steps_time_and_memory_beside_float32(bench, runs):
    # The bfloat16-compute steps ran in the same rounds as the float32 ones, from the
    # same float32 weights, Adam state and batch (the same argument bytes), and their
    # bf16/f32 ratios are the medians' and the memory figures' ratios.
    out, results = runs("quick")
    assert bench.MIXED_PRECISION == {"bptt_bf16": ("bptt", "bfloat16"),
                                     "autodiff_bf16": ("autodiff", "bfloat16")}
    for p in results["results"]:
        m, r = p["methods"], p["ratios"]
        for name, (method, dtype) in bench.MIXED_PRECISION.items():
            mixed, plain = m[name], m[method]
            assert mixed["compute_dtype"] == dtype and "compute_dtype" not in plain
            assert mixed["compile_s"] > 0
            assert mixed["memory"]["argument_size_in_bytes"] == \
                plain["memory"]["argument_size_in_bytes"]  # float32 master weights
            # bf16 gate math: the same first loss to bf16's rounding, not float32's
            assert mixed["first_loss"] == pytest.approx(plain["first_loss"], rel=2 ** -6)
            for key, value in (("time", mixed["median_ms"] / plain["median_ms"]),
                               ("peak", mixed["memory"]["peak_bytes"]
                                / plain["memory"]["peak_bytes"]),
                               ("temp", mixed["memory"]["temp_size_in_bytes"]
                                / plain["memory"]["temp_size_in_bytes"])):
                ratio = r[f"{method}_bf16_over_f32_{key}"]
                assert math.isfinite(ratio) and ratio > 0
                assert ratio == pytest.approx(value), (_key(p), name, key)
    md = (out / "benchmark.md").read_text()
    table = md.split("## bfloat16 compute against float32")[1].split("## ")[0]
    rows = [line.split(" | ") for line in table.splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(results["results"])
    for row in rows:  # bptt's and autodiff's bf16/f32 time, peak (temp): positive numbers
        for cell in (row[8], row[11], row[13].split()[0], row[15].split()[0]):
            assert 0 < float(cell) < math.inf, row
    assert "in bfloat16 was faster than in float32 at" in table  # the plain verdict
    assert results["environment"]["cpu_bf16_flags"] is not None or not Path(
        "/proc/cpuinfo").exists()
    assert "## bfloat16" not in (runs("bidirectional")[0] / "benchmark.md").read_text()


def test_product_floor_is_the_sum_of_each_products_fastest_kernel(run):
    _, results = run
    for p in results["results"]:
        floor = p["methods"]["floor"]
        assert floor["status"] == "ok"
        assert floor["kernels"] == results["floor_kernels"]
        assert {"xla", "numpy"} <= set(floor["kernels"])
        total = 0.0
        for prod in floor["products"]:
            times = prod["kernels_ms"]
            assert set(times) == set(floor["kernels"]), prod["name"]
            assert all(math.isfinite(t) and t > 0 for t in times.values()), (prod["name"], times)
            assert prod["best"] == min(times, key=times.get)
            assert prod["best_ms"] == min(times.values())
            for kernel, runs in prod["runs_ms"].items():  # every timed run, positive
                assert runs and all(t > 0 for t in runs), (prod["name"], kernel)
                assert times[kernel] == pytest.approx(float(np.median(runs)) / prod["calls"])
            total += prod["count"] * min(times.values())
        assert floor["floor_ms"] > 0
        assert floor["floor_ms"] == pytest.approx(total, rel=1e-12)
        assert floor["chains_ms"] + floor["big_products_ms"] == pytest.approx(total)
        assert sum(floor["wins"].values()) == len(floor["products"])


def test_product_list_of_one_unidirectional_lstm_layer(bench, runs):
    # C = A (M, K) @ B (K, N), count times; T=20, B=4, H=16, G=4, D=O=4, T*B=80.
    expected = [
        ("fwd_chain_l0", 4, 16, 64, 20),  # h_{t-1} W_hh^T, T dependent products
        ("bwd_chain_l0", 4, 64, 16, 20),  # dg_t W_hh, T dependent products
        ("input_proj_l0", 80, 4, 64, 1),  # x W_ih^T over all T*B rows
        ("dW_ih_l0", 64, 80, 4, 1),  # dg^T x
        ("dW_hh_l0", 64, 80, 16, 1),  # dg^T h_prev
        ("readout", 80, 16, 4, 1),  # h W_hy^T
        ("readout_dx", 80, 4, 16, 1),  # dy W_hy
        ("dW_hy", 4, 80, 16, 1),  # dy^T h
    ]
    import jaxrnn

    model = jaxrnn.RNN(cell="lstm", input_size=4, hidden_size=16, output_size=4)
    assert [tuple(p) for p in bench.step_products(model, 20, 4)] == expected
    _, results = runs("quick")
    (point,) = [p for p in results["results"] if _key(p) == ("lstm", 20, 4, 16, 1, False)]
    got = [(r["name"], r["M"], r["K"], r["N"], r["count"])
           for r in point["methods"]["floor"]["products"]]
    assert got == expected


def test_product_list_of_two_bidirectional_layers(bench):
    import jaxrnn

    model = jaxrnn.RNN(cell="gru", input_size=3, hidden_size=8, output_size=5, num_layers=2,
                       bidirectional=True)
    products = {p.name: tuple(p[1:]) for p in bench.step_products(model, 7, 2)}
    assert len(products) == 2 * 5 + 2 * 6 + 3  # dx only above the first layer
    assert products["input_proj_l0_reverse"] == (14, 3, 24, 1)
    assert products["input_proj_l1"] == (14, 16, 24, 1)  # D_1 = dirs*H
    assert products["dW_ih_l1_reverse"] == (24, 14, 16, 1)
    assert products["dx_l1"] == (14, 24, 16, 1)
    assert "dx_l0" not in products and "dx_l0_reverse" not in products
    assert products["fwd_chain_l1_reverse"] == (2, 8, 24, 7)
    assert products["readout"] == (14, 16, 5, 1)
    assert products["dW_hy"] == (5, 14, 16, 1)


def test_ratios_are_the_medians_ratios(run):
    _, results = run
    for p in results["results"]:
        m, r = p["methods"], p["ratios"]
        bptt, torch = m["bptt"]["median_ms"], m["torch"]["median_ms"]
        floor = m["floor"]["floor_ms"]
        assert r["bptt_speedup_vs_autodiff"] == pytest.approx(m["autodiff"]["median_ms"] / bptt)
        assert r["bptt_speedup_vs_torch"] == pytest.approx(torch / bptt)
        assert r["floor_over_bptt"] == pytest.approx(floor / bptt)
        assert r["floor_over_torch"] == pytest.approx(floor / torch)
        assert not any("chain" in key for key in r)  # no target refers to the XLA chain


def test_environment_is_recorded(run):
    _, results = run
    env = results["environment"]
    for lib in ("jax", "jaxlib", "torch", "flax", "numpy_blas"):
        assert env["versions"][lib]
    assert env["cpu"]
    assert env["threads"]["torch_intra_op"] == env["threads"]["jax_xla_cpu"] >= 1
    # the machine's load (what uptime prints) and the command that reproduces the run
    for load in (env["load_average_start"], results["load_average_end"]):
        assert len(load) == 3 and all(x >= 0 for x in load)
    assert results["command"].startswith("python -m jaxrnn_lab.bench --quick --repeats 3")
    # the memory-page settings that move the step time (jaxrnn_lab/perf/huge_pages.py)
    assert env["glibc_tunables"] == os.environ.get("GLIBC_TUNABLES", "")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists():
        assert f"[{env['transparent_hugepages']}]" in thp.read_text()


def test_markdown_and_png_are_written(bench, run):
    out, results = run
    md = (out / "benchmark.md").read_text()
    tables = md.split("## ")
    if results["variants"]:
        assert tables[-1].startswith("Cell variants: bptt against autodiff")
        tables = tables[:-1]
    if results["settings"]["bf16"]:
        assert tables[-1].startswith("bfloat16 compute against float32")
    # the main table, the product floor by part (and bfloat16 against float32)
    assert len(tables) == 2 + results["settings"]["bf16"]
    for table in tables:
        rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
        assert len(rows) == 1 + len(results["results"])  # header + one row per grid point
        for p in results["results"]:
            bidir = "yes" if p["bidirectional"] else "no"
            assert any(row.startswith(f"| {p['cell']} | {p['T']} | {p['B']} | {p['H']} "
                                      f"| {p['num_layers']} | {bidir} |") for row in rows)
    head = tables[0].splitlines()[2]
    for column in ("product floor ms", "floor/bptt", "floor/torch", "xla_chain ms",
                   "bptt bf16 ms (/ f32)"):
        assert f"| {column} |" in head
    assert "floor" not in md.replace("product floor", "").replace("floor/", "").replace(
        "methods.floor", "").lower()  # nothing else is called a floor
    png = (out / "benchmark.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


# Each cell's mapping on one layer; the stacking and the reverse direction (which
# do not depend on the cell) on two bidirectional GRU layers (the "bidirectional"
# benchmark run checks the LSTM's first loss against jaxrnn's and PyTorch's).
@pytest.mark.parametrize("num_layers, bidirectional, cells",
                         [(1, False, ("elman", "lstm", "gru")), (2, True, ("gru",))])
def test_flax_weights_give_jaxrnn_outputs(bench, num_layers, bidirectional, cells):
    # The weight mapping behind the Flax contender: same function, same outputs.
    flax = pytest.importorskip("flax")  # noqa: F841
    import jax
    import jax.numpy as jnp

    import jaxrnn

    xs = jnp.asarray(np.random.default_rng(0).standard_normal((7, 3, 2)), jnp.float32)
    for cell in cells:
        model = jaxrnn.RNN(cell=cell, input_size=2, hidden_size=5, output_size=3,
                           num_layers=num_layers, bidirectional=bidirectional)
        params = model.init(jax.random.key(1), jnp.float32)
        net = bench.flax_rnn_class()(cell, 5, 3, num_layers, bidirectional)
        ys_flax = net.apply({"params": bench.flax_params(model, params)}, xs)
        ys, _ = model.apply(params, xs)
        np.testing.assert_allclose(ys_flax, ys, rtol=1e-5, atol=1e-6, err_msg=cell)


def test_init_params_draws_every_layer_and_direction(bench):
    import jaxrnn

    model = jaxrnn.RNN(cell="lstm", input_size=3, hidden_size=4, output_size=2, num_layers=2,
                       bidirectional=True)
    params = bench.init_params(model, np.random.default_rng(0))
    rnn_sd, readout_sd = model.to_torch(params)
    assert list(rnn_sd) == model.torch_names()
    assert rnn_sd["weight_ih_l0_reverse"].shape == (16, 3)
    assert rnn_sd["weight_ih_l1"].shape == (16, 8)
    assert readout_sd["weight"].shape == (2, 8)
    for name, a in rnn_sd.items():  # PyTorch's U(-1/sqrt(H), 1/sqrt(H)), all distinct draws
        assert a.dtype == np.float32 and np.abs(a).max() <= 0.5, name
    assert len({a.tobytes() for a in rnn_sd.values()}) == len(rnn_sd)
    assert np.abs(readout_sd["weight"]).max() <= 1 / math.sqrt(8)


def test_grid_points_accept_triples_and_reject_bad_ones(bench):
    s = bench.Settings(grid=((10, 2, 8), (10, 2, 8, 3, True)))
    assert s.grid == (bench.GridPoint(10, 2, 8, 1, False), bench.GridPoint(10, 2, 8, 3, True))
    for bad in ((10, 2), (10, 2, 8, 0, False), (10, 2, 8, 2, 1), (10, 2.5, 8)):
        with pytest.raises(ValueError, match="grid point"):
            bench.Settings(grid=(bad,))


def test_bad_settings_exit_2(bench, capsys):
    assert bench.main(["--quick", "--repeats", "0", "--no-progress"]) == 2
    assert "repeats must be >= 1" in capsys.readouterr().err
    assert bench.main(["--quick", "--grid", "10,2", "--no-progress"]) == 2
    assert "--grid points must be T,B,H[,L[,bi|uni]], got '10,2'" in capsys.readouterr().err
