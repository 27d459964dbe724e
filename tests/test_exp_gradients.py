"""experiments/vanishing_gradients.py and experiments/gradient_clipping.py in --quick mode.

Each script is run once as users run it (a subprocess from the repository root,
so its float64 / float32 set-up is its own, not this test session's), and its
JSON results are checked against what the experiments claim: the rates of decay
order with the spectral radius and saturation, clipping bounds every update and
trains where plain SGD diverges. The figures must be real PNG files.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_quick(name: str, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, f"experiments/{name}.py", "--quick", "--out", str(out), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    record = json.loads((out / f"{name}.json").read_text())
    assert record["experiment"] == name and record["quick"] is True
    return record


def _assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), f"{path} is not a PNG"
    assert len(data) > 10_000, f"{path} is suspiciously small ({len(data)} bytes)"


# --- vanishing / exploding gradients -----------------------------------------

@pytest.fixture(scope="module")
def vanishing(tmp_path_factory):
    out = tmp_path_factory.mktemp("vanishing")
    return out, _run_quick("vanishing_gradients", out)


def _configs(record):
    """{(cell, radius, input_scale): result} of the vanishing-gradients run."""
    return {(c["cell"], c["radius"], c["input_scale"]): c
            for c in record["results"]["configurations"]}


def test_vanishing_every_configuration_measured_with_finite_curves(vanishing):
    out, record = vanishing
    s = record["settings"]
    cfg = _configs(record)
    expected = {("elman", r, x) for r in s["radii"] for x in s["input_scales"]}
    expected |= {(c, None, x) for c in s["gated"] for x in s["input_scales"]}
    assert set(cfg) == expected
    for c in cfg.values():
        assert len(c["geomean"]) == s["seq_len"]
        assert c["geomean"][0] == pytest.approx(1.0, rel=1e-4)  # normalised at distance 0
        assert all(v is not None and 0 < v < math.inf for v in c["geomean"]), c["label"]
        assert all(lo <= g * (1 + 1e-4) and g <= hi * (1 + 1e-4)
                   for lo, g, hi in zip(c["band_lo"], c["geomean"], c["band_hi"]))
        assert c["factor_per_step"] == pytest.approx(math.exp(c["rate"]))
    _assert_png(out / record["results"]["figure"])


def test_vanishing_rate_grows_with_the_spectral_radius(vanishing):
    _, record = vanishing
    s, cfg = record["settings"], _configs(record)
    for x in s["input_scales"]:
        rates = [cfg[("elman", r, x)]["rate"] for r in sorted(s["radii"])]
        assert rates == sorted(rates) and len(set(rates)) == len(rates), (x, rates)
        assert cfg[("elman", 0.5, x)]["rate"] < 0  # radius 0.5: the gradient vanishes
        assert cfg[("elman", 0.5, x)]["norm_at_max_distance"] < 1e-6


def test_vanishing_small_inputs_follow_the_linear_rate_and_radius_2_explodes(vanishing):
    _, record = vanishing
    small = min(record["settings"]["input_scales"])
    cfg = _configs(record)
    # nearly linear tanh: one step multiplies the gradient by about the radius
    assert cfg[("elman", 0.5, small)]["rate"] == pytest.approx(math.log(0.5), abs=0.15)
    assert abs(cfg[("elman", 1.0, small)]["rate"]) < 0.15
    assert cfg[("elman", 2.0, small)]["rate"] > 0
    assert cfg[("elman", 2.0, small)]["norm_at_max_distance"] > 1.0


def test_vanishing_saturation_makes_every_elman_gradient_vanish_faster(vanishing):
    _, record = vanishing
    s, cfg = record["settings"], _configs(record)
    small, large = min(s["input_scales"]), max(s["input_scales"])
    for r in s["radii"]:
        lo, hi = cfg[("elman", r, small)], cfg[("elman", r, large)]
        assert hi["mean_tanh_derivative"] < lo["mean_tanh_derivative"]
        assert hi["rate"] < lo["rate"], r
    # the largest singular value bounds the linear rate from above: sigma_max >= radius
    for r in s["radii"]:
        assert cfg[("elman", r, small)]["sigma_max"] >= r * (1 - 1e-9)


def test_vanishing_gated_cells_at_default_init_also_vanish(vanishing):
    _, record = vanishing
    s, cfg = record["settings"], _configs(record)
    for cell in s["gated"]:
        for x in s["input_scales"]:
            assert cfg[(cell, None, x)]["rate"] < 0, (cell, x)


# --- gradient clipping --------------------------------------------------------

@pytest.fixture(scope="module")
def clipping(tmp_path_factory):
    out = tmp_path_factory.mktemp("clipping")
    record = _run_quick("gradient_clipping", out)
    by_name = {c["name"]: c for c in record["results"]["configurations"]}
    return out, record, by_name


def test_clipping_bounds_every_update_and_every_clipped_run_trains(clipping):
    out, record, by_name = clipping
    s = record["settings"]
    clipped = by_name[f"clipping at {s['clip']:g}"]
    assert clipped["diverged"] == 0 and len(clipped["runs"]) == s["seeds"]
    # clipping was active (some gradients exceeded the threshold) ...
    assert clipped["max_grad_norm"] > s["clip"]
    # ... and every SGD update was at most lr * clip long (float32 rounding aside)
    assert clipped["max_update_norm"] <= s["lr"] * s["clip"] * (1 + 1e-4)
    for run in clipped["runs"]:
        assert run["diverged_at"] is None and len(run["loss"]) == s["steps"]
        assert all(v is not None and math.isfinite(v) for v in run["loss"])
        assert math.isfinite(run["final_loss"]) and run["final_loss"] < run["initial_loss"]
        assert run["eval_loss"] < 0.5  # better than predicting 0 (the sine task's baseline)
    _assert_png(out / record["results"]["figure"])


def test_clipping_without_it_the_same_learning_rate_diverges_and_is_recorded(clipping):
    _, record, by_name = clipping
    s = record["settings"]
    plain = by_name["no clipping"]
    assert plain["lr"] == s["lr"] and plain["clip"] is None
    assert plain["diverged"] >= 1
    for run in plain["runs"]:
        if run["diverged_at"] is None:
            continue
        # stopped at the first step with a non-finite loss, gradient or update
        assert run["steps_run"] == run["diverged_at"] == len(run["loss"]) < s["steps"]
        assert run["final_loss"] is None
        # the gradient exploded far past the clipping threshold before it overflowed
        assert run["max_grad_norm"] > 1e3 * s["clip"]
    assert sorted(plain["diverged_at"]) == sorted(
        r["diverged_at"] for r in plain["runs"] if r["diverged_at"] is not None)
