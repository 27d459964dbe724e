"""experiments/charlm_cells.py in --quick mode: equal parameter counts, real learning, outputs.

The script runs once as users run it (a subprocess from the repository root).
Quick mode trains for only 25 steps, so it cannot show the cells beating the
unigram baseline; what it can show, and what is asserted: the parameter counts
match (checked against the counts written out by hand from the cells' shapes),
every cell's held-out bits per character fell well below its value at
initialisation (learning happened, measured on held-out text), the samples are
text of the right length from the model's vocabulary, and the figure is a PNG.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GATES = {"elman": 1, "lstm": 4, "gru": 3}


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("charlm")
    proc = subprocess.run(
        [sys.executable, "experiments/charlm_cells.py", "--quick", "--out", str(out),
         "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"charlm_cells failed:\n{proc.stdout}\n{proc.stderr}"
    rec = json.loads((out / "charlm_cells.json").read_text())
    assert rec["experiment"] == "charlm_cells" and rec["quick"] is True
    return out, rec


def test_parameter_counts_are_equal_within_the_tolerance(record):
    _, rec = record
    s, r = rec["settings"], rec["results"]
    V = r["vocab_size"]
    assert set(r["cells"]) == {"elman", "lstm", "gru"}
    assert r["hidden"][s["reference_cell"]] == s["reference_hidden"]
    counts = {}
    for cell, res in r["cells"].items():
        G, H = GATES[cell], res["hidden"]
        # W_ih (GH, V), W_hh (GH, H), b_ih and b_hh (GH,), readout W (V, H) and b (V,)
        counts[cell] = G * H * (V + H) + 2 * G * H + V * H + V
        assert res["params"] == counts[cell] == r["param_counts"][cell]
    ref = counts[s["reference_cell"]]
    assert max(abs(n / ref - 1) for n in counts.values()) <= s["param_tolerance"]
    assert r["max_param_deviation"] <= s["param_tolerance"]
    # the hidden sizes differ: the matching did something (Elman needs the most units)
    assert r["hidden"]["elman"] > r["hidden"]["gru"] > r["hidden"]["lstm"]


def test_every_cell_learned_on_held_out_text(record):
    _, rec = record
    s, r = rec["settings"], rec["results"]
    uniform = math.log2(r["vocab_size"])  # a model that knows nothing scores about this
    assert 3.5 < r["unigram_entropy_bits"] < uniform
    for cell, res in r["cells"].items():
        steps = [st for st, _ in res["eval_curve"]]
        assert steps[0] == 0 and steps[-1] == s["steps"]
        bpc = [b for _, b in res["eval_curve"]]
        assert all(math.isfinite(b) for b in bpc), cell
        assert bpc[0] > uniform - 0.5, cell  # at initialisation: near uniform
        assert res["final_eval_bpc"] < bpc[0] - 1.0, (cell, bpc)  # learned something
        assert res["final_eval_bpc"] == bpc[-1] and res["best_eval_bpc"] == min(bpc)
        assert math.isfinite(res["final_train_bpc"]) and res["final_train_bpc"] < bpc[0]
    assert sorted(r["ranking"]) == sorted(r["cells"])


def test_samples_and_figure(record):
    out, rec = record
    s, r = rec["settings"], rec["results"]
    text = (out / "samples.txt").read_text()
    for cell, res in r["cells"].items():
        sample = res["sample"]
        assert sample.startswith(s["prompt"])
        assert len(sample) == len(s["prompt"]) + s["sample_length"]
        assert sample in text and f"=== {cell} H={res['hidden']}" in text
    png = (out / "charlm_cells.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
