"""The training experiments of issue #6 in their quick modes: experiments/adding_problem.py
and experiments/truncation_length.py.

Each script is run once as a subprocess (its real command line, in float32: the
subprocess does not inherit this suite's float64 setting) and its JSON results and
figures are checked, including one qualitative result each: a cell learns the
short adding problem, and full BPTT learns a delay that BPTT(2, 2) cannot.
"""

import dataclasses
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BASELINE = 1.0 / 6.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_quick(name: str, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, f"experiments/{name}.py", "--quick", "--out", str(out), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / f"{name}.json").read_text())
    assert record["experiment"] == name and record["quick"] is True
    assert record["environment"]["jax"] and record["wall_s"] > 0
    return record


def _assert_pngs(out: Path, names: list[str], expected: set[str]):
    assert set(names) == expected
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, (name, len(data))


def _finite(values) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


@pytest.fixture(scope="module")
def adding(tmp_path_factory):
    out = tmp_path_factory.mktemp("adding_problem")
    return out, _run_quick("adding_problem", out)


@pytest.fixture(scope="module")
def truncation(tmp_path_factory):
    out = tmp_path_factory.mktemp("truncation_length")
    return out, _run_quick("truncation_length", out)


def _import_experiment(name: str):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "experiments"))


@pytest.fixture(scope="module")
def trunc_module():
    return _import_experiment("truncation_length")


@pytest.fixture(scope="module")
def adding_module():
    return _import_experiment("adding_problem")


# --- adding problem ----------------------------------------------------------------

def test_adding_runs_every_cell_and_length_with_consistent_summary(adding):
    out, record = adding
    s, res = record["settings"], record["results"]
    assert res["baseline"] == pytest.approx(BASELINE)
    assert res["solved_threshold"] == pytest.approx(s["solved_fraction"] * BASELINE)
    runs = res["runs"]
    assert sorted((r["cell"], r["seq_len"]) for r in runs) == sorted(
        [(c, T) for c in s["cells"] for T in s["lengths"]]  # the quick length is below long_from
        + [("indrnn_li", T) for T in s["li_lengths"]])
    assert all(T < s["long_from"] for T in s["lengths"])
    assert s["cells"] == ["elman", "lstm", "gru", "indrnn"]
    assert dict(s["nonlinearity"]) == {"indrnn": "relu"}
    rows = set(s["cells"]) | {"indrnn_li"}
    assert set(res["final_mse"]) == set(res["solved"]) == rows
    assert res["row_sources"] == {row: "this run" for row in rows}
    for r in runs:
        assert r["source"] == "this run"
        steps = (s["li_steps"][s["li_lengths"].index(r["seq_len"])] if r["cell"] == "indrnn_li"
                 else s["steps"][s["lengths"].index(r["seq_len"])])
        assert r["eval_steps"][0] == 0 and r["eval_steps"][-1] == steps
        assert len(r["eval_mse"]) == len(r["eval_steps"]) == len(r["train_loss"]) + 1
        assert _finite(r["eval_mse"]) and _finite(r["train_loss"]) and not r["diverged"]
        assert all(v > 0 for v in r["eval_mse"])
        assert r["final_mse"] == r["eval_mse"][-1] == res["final_mse"][r["cell"]][str(r["seq_len"])]
        assert r["best_mse"] == min(r["eval_mse"])
        assert r["solved"] == (r["final_mse"] < res["solved_threshold"])
        assert r["solved"] == res["solved"][r["cell"]][str(r["seq_len"])]
        # an untrained network is no better than the constant answer
        assert r["eval_mse"][0] > 0.5 * BASELINE
    _assert_pngs(out, res["figures"], {"adding_problem_curves.png", "adding_problem_summary.png"})


def test_adding_full_layout_runs_long_lengths_for_long_cells_only(adding_module):
    # the full mode's runs: every cell up to T = 200, LSTM and IndRNN only at 500 and 1000,
    # and Li et al.'s IndRNN at 100, 500 and 1000
    s, li = adding_module.FULL, adding_module.LI
    planned = adding_module.plan(s)
    assert [T for T, _, _ in planned] == sorted(T for T, _, _ in planned)
    assert adding_module.cells_at(s, 200) == ["elman", "lstm", "gru", "indrnn"]
    assert adding_module.cells_at(s, 100) == ["elman", "lstm", "gru", "indrnn", li]
    assert adding_module.cells_at(s, 500) == adding_module.cells_at(s, 1000) == [
        "lstm", "indrnn", li]
    assert len(planned) == len(set(planned)) == 4 * 4 + 2 * 2 + 3
    assert all(n == (s.li_steps[s.li_lengths.index(T)] if c == li else
                     s.steps[s.lengths.index(T)]) for T, n, c in planned)
    assert adding_module.plan(s, only=li) == [(T, n, li) for T, n in zip(s.li_lengths, s.li_steps)]
    with pytest.raises(ValueError, match="one count per length"):
        adding_module.plan(dataclasses.replace(s, steps=s.steps[:-1]))
    with pytest.raises(ValueError, match="li_steps"):
        adding_module.plan(dataclasses.replace(s, li_lengths=(100, 300), li_steps=(10, 10)))


def _tree_bytes(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_adding_only_keeps_the_other_rows_and_refuses_what_it_cannot_merge(
        adding, adding_module, tmp_path, capsys):
    out, record = adding
    li = adding_module.LI
    kept, sources = adding_module.previous_runs(adding_module.QUICK, out, li)
    want = [r for r in record["results"]["runs"] if r["cell"] != li]
    assert len(kept) == len(want) == 4
    assert [dict(r, source="this run") for r in kept] == want  # the same runs, re-marked
    assert all(r["source"] == "previous" for r in kept)
    assert sorted(sources) == sorted(record["settings"]["cells"])
    assert all("kept from the earlier run" in v for v in sources.values())
    # refused, one line on stderr, exit 2, nothing written: no results to merge with ...
    missing = tmp_path / "nothing_here"
    assert adding_module.main(["--quick", "--only", li, "--out", str(missing),
                               "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--only indrnn_li" in err[0] and "cannot be read" in err[0]
    assert not missing.exists()
    # ... or results made with other settings (the quick JSON, merged into a full run)
    before = _tree_bytes(out)
    assert adding_module.main(["--only", li, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "lengths" in err[0]
    assert _tree_bytes(out) == before
    with pytest.raises(SystemExit) as e:
        adding_module.main(["--quick", "--only", "lstm", "--out", str(out)])
    assert e.value.code == 2 and "--only" in capsys.readouterr().err
    assert _tree_bytes(out) == before


def test_adding_some_cell_learns_the_short_problem(adding):
    # T = 10, 200 steps: at least one cell (the GRU, in practice) gets far below the
    # best constant answer, which needs the two marked values.
    _, record = adding
    runs = record["results"]["runs"]
    best = min(runs, key=lambda r: r["final_mse"])
    assert best["final_mse"] < 0.3 * BASELINE, [(r["cell"], r["final_mse"]) for r in runs]
    assert best["final_mse"] < 0.5 * best["eval_mse"][0]


# --- truncated BPTT ----------------------------------------------------------------

def test_truncation_results_and_figures(truncation):
    out, record = truncation
    s, res = record["settings"], record["results"]
    assert res["chance"] == 1.0
    (d,) = s["delays"]
    assert set(res["final_loss"]) == {f"d={d}"}
    assert set(res["final_loss"][f"d={d}"]) == {str(k) for k in s["truncations"]} | {"full"}
    runs = {r["k"]: r for r in res["runs"]}
    assert set(runs) == set(s["truncations"]) | {s["seq_len"]}
    for k, r in runs.items():
        assert r["delay"] == d and r["full_bptt"] == (k == s["seq_len"])
        assert r["eval_steps"][-1] == s["steps"] and len(r["eval_loss"]) == len(r["eval_steps"])
        assert _finite(r["eval_loss"]) and _finite(r["train_loss"])
        assert r["final_loss"] == r["eval_loss"][-1]
        assert r["updates_per_batch"] == math.ceil(s["seq_len"] / k)
        assert r["learned"] == (r["final_loss"] < s["learned_below"])
        # an untrained network scores about chance (predicting ~0)
        assert 0.8 < r["eval_loss"][0] < 1.3
    _assert_pngs(out, res["figures"], {"truncation_length.png", "truncation_curves.png"})


def test_full_bptt_learns_the_delay_that_truncation_below_it_cannot(truncation):
    _, record = truncation
    s, res = record["settings"], record["results"]
    runs = {r["k"]: r for r in res["runs"]}
    full, short = runs[s["seq_len"]], runs[min(s["truncations"])]
    assert min(s["truncations"]) <= s["delays"][0]
    assert short["gradient_reach"] == 0.0 and full["gradient_reach"] == 1.0
    assert full["learned"] and full["final_loss"] < 0.1, full["final_loss"]
    assert not short["learned"] and short["final_loss"] > 0.5, short["final_loss"]


def test_gradient_reach_follows_the_truncation_windows(trunc_module):
    reach = trunc_module.gradient_reach
    # BPTT(k, k) reaches x[t - d] from step t iff t mod k >= d
    for T, k, d in [(40, 2, 5), (40, 5, 5), (40, 10, 10), (40, 11, 10), (40, 15, 10),
                    (40, 20, 10), (40, 40, 10), (12, 5, 2)]:
        expected = sum(1 for t in range(d, T) if t % k >= d) / (T - d)
        assert reach(T, k, d) == pytest.approx(expected), (T, k, d)
    assert reach(40, 10, 10) == 0.0 and reach(40, 11, 10) == pytest.approx(3 / 30)
    assert reach(40, 40, 10) == 1.0


def test_delayed_recall_targets_are_the_delayed_inputs(trunc_module):
    batch = trunc_module.delayed_recall(np.random.default_rng(0), 8, 20, 6)
    xs, ys = np.asarray(batch.xs), np.asarray(batch.targets)
    assert xs.shape == ys.shape == (20, 8, 1) and xs.dtype == np.float32
    assert set(np.unique(xs)) == {-1.0, 1.0}
    np.testing.assert_array_equal(ys[6:], xs[:-6])
    np.testing.assert_array_equal(ys[:6], 0.0)
