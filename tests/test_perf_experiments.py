"""The performance experiments in their quick modes.

profile_step, step_formulations, xla_flags, input_projection, weight_gradient,
huge_pages and lean_bptt: each runs, writes its outputs and refuses bad options.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# The performance investigations live in the lab; lean_bptt is a research experiment.
PERF = {"profile_step", "step_formulations", "xla_flags", "input_projection",
        "weight_gradient", "huge_pages"}


def _script(name: str) -> list[str]:
    """The command that runs experiment or investigation ``name``."""
    return ["-m", f"jaxrnn_lab.perf.{name}"] if name in PERF else [f"experiments/{name}.py"]


def run_quick(name: str, out: Path, *args: str) -> dict:
    """Runs investigation or experiment NAME with ``--quick --out OUT [ARGS]``; returns its JSON record."""
    proc = subprocess.run([sys.executable, *_script(name), "--quick", "--out",
                           str(out), "--no-progress", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / f"{name}.json").read_text())


def test_profile_step_quick(tmp_path):
    record = run_quick("profile_step", tmp_path, "--points", "lstm:20:4:16")
    rows = {r["method"]: r for r in record["results"]["rows"]}
    assert set(rows) == {"bptt", "autodiff"}
    for r in rows.values():
        groups = r["groups_ms"]
        assert set(groups) == {"loop products", "loop elementwise", "big products", "other"}
        assert abs(sum(groups.values()) - r["ops_ms"]) < 1e-6 * max(1.0, r["ops_ms"])
        assert groups["loop products"] > 0 and groups["big products"] > 0
        assert r["wall_ms"] > 0
    # The handwritten backward keeps one product per step in each loop (forward and
    # reverse scan); jax.grad also accumulates the weight gradients inside its loop.
    assert len(rows["bptt"]["loop_products"]) == 2
    assert len(rows["autodiff"]["loop_products"]) > 2
    assert (tmp_path / "profile_step.png").stat().st_size > 1000
    md = (tmp_path / "profile_step.md").read_text()
    assert "| lstm | 20 | 4 | 16 | bptt |" in md and "* lstm (20, 4, 16) bptt: `" in md
    # every top op names its result type, read from the compiled HLO
    shapes = [o["shape"] for o in rows["bptt"]["top_ops"]]
    assert all(re.fullmatch(r"(\(.*\)|[a-z0-9]+\[[0-9,]*\])", t) for t in shapes), shapes


def test_profile_step_reads_an_ops_result_type():
    mod = _experiment_module("profile_step")
    hlo = ("  %ynn_fusion.7 = f32[80,64]{1,0} fusion(f32[80,4]{1,0} %p0), kind=kCustom\n"
           "  ROOT %tuple.3 = (f32[2]{0}, s32[]) tuple(f32[2]{0} %a, s32[] %b)\n"
           "  %ynn_fusion.70 = f32[9]{0} fusion(f32[9]{0} %p1)\n")
    assert mod._result_shape("ynn_fusion.7", hlo) == "f32[80,64]"
    assert mod._result_shape("ynn_fusion.70", hlo) == "f32[9]"
    assert mod._result_shape("tuple.3", hlo) == "(f32[2], s32[])"
    assert mod._result_shape("absent", hlo) == ""


def test_profile_step_rejects_a_file_as_out(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    proc = subprocess.run([sys.executable, "jaxrnn_lab/perf/profile_step.py", "--quick", "--out",
                           str(f)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--out" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_profile_step_refuses_a_bad_point(tmp_path, capsys):
    mod = _experiment_module("profile_step")
    out = tmp_path / "p"
    for bad in ("gru:6:x:8", "tree:6:2:8", "gru:6:2", "gru:0:2:8"):
        status = main_in_process(mod, out, "--points", f"lstm:5:2:8,{bad}")
        assert status == 2 and not out.exists()
        assert f"--points: {bad!r} is not cell:T:B:H" in capsys.readouterr().err
    assert mod.parse_points("gru:200:64:256,elman:1:1:1") == (("gru", 200, 64, 256),
                                                              ("elman", 1, 1, 1))


def _experiment_module(name: str):
    """Imports the investigation ``jaxrnn_lab.perf.NAME``."""
    import importlib

    return importlib.import_module(f"jaxrnn_lab.perf.{name}")


def main_in_process(mod, out: Path, *args: str) -> int:
    """``NAME --quick --out OUT [ARGS]`` through ``harness.main``, in this process."""
    name = Path(mod.__file__).stem
    return mod.common.main(name, mod.__doc__, mod.FULL, mod.QUICK, mod.run,
                           argv=["--quick", "--out", str(out), *args],
                           options=getattr(mod, "OPTIONS", ()))


def test_xla_flags_sweep_runs_a_setting_and_reports_a_bad_flag():
    mod = _experiment_module("xla_flags")
    good = mod.sweep_one("", mod.QUICK)
    assert good["status"] == "ok", good
    (row,) = good["rows"]
    assert (row["cell"], row["T"]) == ("lstm", 10)
    assert row["bptt_ms"] > 0 and row["autodiff_ms"] > 0 and row["xla_chain_ms"] > 0
    bad = mod.sweep_one("--xla_cpu_no_such_flag=1", mod.QUICK)
    assert bad["status"].startswith("failed")
    table = mod.markdown([good, bad])
    assert "| (defaults) |" in table and "failed" in table


def test_lean_bptt_quick(tmp_path):
    record = run_quick("lean_bptt", tmp_path)
    rows = {r["cell"]: r for r in record["results"]["rows"]}
    assert set(rows) == {"lstm", "elman"}
    for r in rows.values():
        assert 0 < r["temp_ratio"] < 1  # storing every k-th carry needs less memory
    lstm = rows["lstm"]
    assert lstm["same_loss_and_grad_norm"] is True
    assert lstm["time_ratio"] > 0
    assert "| lstm |" in (tmp_path / "lean_bptt.md").read_text()


def test_step_formulations_quick(tmp_path):
    record = run_quick("step_formulations", tmp_path, "--variants", "chosen,head,unroll_2")
    rows = record["results"]["rows"]
    assert {(r["cell"], r["variant"]) for r in rows} == {
        (c, v) for c in ("elman", "lstm", "gru") for v in ("chosen", "head", "unroll_2")}
    # two steps per iteration: more ops in each loop body than the library's one step
    for r in rows:
        if r["variant"] == "unroll_2":
            chosen = next(c for c in rows if c["cell"] == r["cell"] and c["variant"] == "chosen")
            assert all(u > c for u, c in zip(r["loop_ops"], chosen["loop_ops"])), (r, chosen)
    for r in rows:
        assert r["fwd_ms"] > 0 and r["bptt_ms"] > 0
        # head (the formulation before issue #10) computes the same gradients
        assert r["max_rel_diff"] < 1e-5, r
        assert len(r["loop_ops"]) == 2 and min(r["loop_ops"]) > 0  # forward, reverse loop
        assert r["bptt_vs_chosen"] == r["bptt_ms"] / next(
            c["bptt_ms"] for c in rows if c["cell"] == r["cell"] and c["variant"] == "chosen")
    table = (tmp_path / "step_formulations.md").read_text()
    assert "| lstm | 8 | 2 | 8 | chosen |" in table and "| gru | 8 | 2 | 8 | head |" in table
    assert (tmp_path / "step_formulations.png").stat().st_size > 1000


def test_step_formulations_refuses_an_unknown_variant(tmp_path, capsys):
    mod = _experiment_module("step_formulations")
    out = tmp_path / "sf"
    status = main_in_process(mod, out, "--variants", "chosen,bogus")
    assert status == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "--variants: unknown variant(s) ['bogus']" in err and "unroll_2" in err


def test_input_projection_quick(tmp_path):
    record = run_quick("input_projection", tmp_path)
    (sweep,) = record["results"]["sweep"]
    assert sweep["flags"] == "" and sweep["status"] == "ok"
    (row,) = sweep["rows"]
    assert (row["T"], row["B"], row["D"], row["GH"]) == (10, 4, 8, 32)
    assert {"x@w.T", "x@wT", "flat@wT", "per_step", "chunks", "numpy"} <= set(row["ms"])
    assert all(t > 0 for t in row["ms"].values())
    md = (tmp_path / "input_projection.md").read_text()
    assert "| (defaults) | (10, 4, 8, 32) |" in md


def test_weight_gradient_quick(tmp_path):
    record = run_quick("weight_gradient", tmp_path)
    (row,) = record["results"]["rows"]
    assert (row["name"], row["T"], row["B"], row["GH"], row["K"]) == ("lstm dW_hh", 8, 2, 32, 8)
    assert set(row["ms"]) >= {"sum_outer", "folded", "flat", "chunks", "per_step", "callback",
                              "numpy"}
    assert all(t > 0 for t in row["ms"].values())
    assert row["gflop"] == 2 * 8 * 2 * 32 * 8 / 1e9
    assert "| lstm dW_hh | (8, 2, 32, 8) |" in (tmp_path / "weight_gradient.md").read_text()


def test_weight_gradient_forms_compute_the_product():
    # each XLA form against a float64 product computed here with numpy, on a shape
    # whose time axis the chunks divide
    mod = _experiment_module("weight_gradient")
    rng = np.random.default_rng(1)
    dg, a = rng.standard_normal((6, 3, 10)), rng.standard_normal((6, 3, 4))
    ref = np.einsum("tbg,tbk->gk", dg, a)
    forms = mod.xla_forms(chunks=3)
    forms["callback"] = mod.callback_form()
    for name, f in forms.items():
        np.testing.assert_allclose(np.asarray(f(dg, a)), ref, rtol=1e-12, err_msg=name)


def test_huge_pages_quick(tmp_path):
    record = run_quick("huge_pages", tmp_path)
    results = record["results"]
    assert set(results["by_env"]) == {"", "glibc.malloc.hugetlb=1"}
    for env, (row,) in results["by_env"].items():  # one process per setting, one point
        assert (row["cell"], row["T"], row["B"], row["H"], row["GH"]) == ("lstm", 5, 2, 8, 32)
        assert row["processes"] == 1
        names = {"bptt", "autodiff", "xla_product", "numpy_out", "numpy_new"}
        assert names <= set(row["ms"]) and names <= set(row["faults"])
        assert all(t > 0 for t in row["ms"].values())
        assert all(f >= 0 for f in row["faults"].values())
    md = (tmp_path / "huge_pages.md").read_text()
    assert "| lstm (5, 2, 8) | (default) |" in md
    assert "| lstm (5, 2, 8) | `glibc.malloc.hugetlb=1` |" in md
    assert "- failed" not in md


def test_huge_pages_refuses_zero_rounds(tmp_path, capsys):
    mod = _experiment_module("huge_pages")
    out = tmp_path / "hp"
    status = main_in_process(mod, out, "--rounds", "0")
    assert status == 2 and not out.exists()
    assert "--rounds must be at least 1, got 0" in capsys.readouterr().err
    # the full run also times the setting that keeps freed memory in one heap
    assert mod.FULL.envs == ("", "glibc.malloc.hugetlb=1", mod.KEEP_HEAP)
    assert "glibc.malloc.arena_max=1" in mod.KEEP_HEAP


def test_huge_pages_merges_processes_by_median():
    mod = _experiment_module("huge_pages")
    key = {"cell": "gru", "T": 3, "B": 2, "H": 4, "GH": 12}
    runs = [{"status": "ok", "rows": [{**key, "ms": {"bptt": ms}, "faults": {"bptt": f}}]}
            for ms, f in ((1.0, 10), (5.0, 30), (2.0, 20))]
    runs.append({"status": "failed (exit 1): ['boom']"})  # a failed process is left out
    (row,) = mod.merge(runs)
    assert row == {**key, "processes": 3, "ms": {"bptt": 2.0}, "faults": {"bptt": 20}}


def test_estimator_cost_quick(tmp_path):
    # one run through the module's command line (it is not in PERF: run it directly)
    proc = subprocess.run([sys.executable, "-m", "jaxrnn_lab.perf.estimator_cost", "--quick",
                           "--out", str(tmp_path), "--no-progress"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "estimator_cost.json").read_text())
    mod = _experiment_module("estimator_cost")
    results = record["results"]
    assert {"points", "slopes", "jax", "jaxlib", "cpu", "load_average"} <= set(results)
    points = {(p["H"], p["B"]): p for p in results["points"]}
    assert set(points) == {(4, 1), (8, 1)}
    D = record["settings"]["input_size"]
    for (H, B), p in points.items():
        assert p["skipped"] == {} and tuple(p["methods"]) == mod.METHODS  # every method, every H
        for method, row in p["methods"].items():
            assert row["step_us"] > 0, (H, method)
            mem = row["memory"]
            assert mem["peak_bytes"] == (mem["argument_size_in_bytes"] + mem["output_size_in_bytes"]
                                         - mem["alias_size_in_bytes"] + mem["temp_size_in_bytes"])
        # RTRL's state is B n S, as cost() says: n = H (D + H + 2) (w_ih, w_hh, two biases),
        # S = H (the leaky cell's one carry part)
        assert p["methods"]["rtrl"]["predicted"]["state_elements"] == B * H * (D + H + 2) * H
        assert p["methods"]["bptt"]["predicted"] is None
    # XLA's buffers: RTRL's sensitivities (and their blocks of unit tangents) grow far
    # faster with H than UORO's two factors
    def temp_bytes(H, m):
        return points[(H, 1)]["methods"][m]["memory"]["temp_size_in_bytes"]

    growth = {m: temp_bytes(8, m) / temp_bytes(4, m) for m in ("rtrl", "uoro")}
    assert growth["rtrl"] > 2 * growth["uoro"], growth
    slope = results["slopes"]["1"]
    assert set(slope) == set(mod.METHODS) and slope["rtrl"]["H"] == [4, 8]
    assert slope["rtrl"]["predicted_state"] > slope["uoro"]["predicted_state"]
    assert (tmp_path / "estimator_cost_B1.png").stat().st_size > 1000
    md = (tmp_path / "estimator_cost.md").read_text()
    assert "| 1 | 8 | rtrl |" in md and "| 1 | kf_rtrl | 4, 8 |" in md


def test_estimator_cost_skips_what_exceeds_the_budget():
    import dataclasses

    mod = _experiment_module("estimator_cost")
    assert abs(mod.fit_slope([2, 4, 8], [3.0, 48.0, 768.0]) - 4.0) < 1e-12  # 3 (H/2)^4
    # RTRL and SnAp-2 predict 1.5e4 multiplies a step at H=8; the others under 2e3
    runs, skipped = mod.contenders(dataclasses.replace(mod.QUICK, max_step_multiplies=5e3), 8, 1)
    assert set(skipped) == {"rtrl", "snap2"} and "time budget" in skipped["rtrl"]
    assert set(runs) == set(mod.METHODS) - {"rtrl", "snap2"}
