"""experiments/charlm_cells.py: equal parameter counts, the seeds and the rate sweep, outputs.

The script runs once in ``--quick`` mode as users run it (a subprocess from the
repository root): three of the cells, two rates, two seeds, 25 steps per run, so
it cannot show the cells beating the unigram baseline. What it can show, and what
is asserted: the parameter counts match (against counts written out by hand from
the cells' shapes, for every built-in cell), every run's held-out bits per
character fell well below its value at initialisation, the design ran as stated
(every rate on the first seed, the other seeds at the rate with the lowest
validation score, the summary recomputed from the runs), the seeds change the
initialisation and the batches, the validation slice is disjoint from the test
slice, one compiled step serves every rate (the rate in the optimizer state gives
the same update as optax's Adam on the schedule), and the samples and figure exist.
"""

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = Path(__file__).resolve().parents[1]


def hand_count(cell: str, H: int, V: int) -> int:
    """Parameters of a one-layer model, written out from the cells' shapes."""
    readout = V * H + V  # W (V, H), b (V,)
    G = {"elman": 1, "lstm": 4, "gru": 3, "indrnn": 1, "peephole_lstm": 4,
         "layernorm_lstm": 4}[cell]
    if cell == "indrnn":  # W_ih (H, V), u (H,), b_ih and b_hh (H,)
        return H * V + H + 2 * H + readout
    if cell == "layernorm_lstm":  # W_ih, W_hh, bias (4H,), gains of both LNs (4H,), LN(c) (2H)
        return 4 * H * (V + H) + 4 * H + 2 * 4 * H + 2 * H + readout
    extra = 3 * H if cell == "peephole_lstm" else 0  # w_peep (3, H)
    return G * H * (V + H) + 2 * G * H + extra + readout  # W_ih, W_hh, b_ih, b_hh


@pytest.fixture(scope="module")
def cl():
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        return importlib.import_module("charlm_cells")
    finally:
        sys.path.remove(str(ROOT / "experiments"))


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("charlm")
    proc = subprocess.run(
        [sys.executable, "experiments/charlm_cells.py", "--quick", "--out", str(out),
         "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"charlm_cells failed:\n{proc.stdout}\n{proc.stderr}"
    rec = json.loads((out / "charlm_cells.json").read_text())
    assert rec["experiment"] == "charlm_cells" and rec["quick"] is True
    assert not (out / "charlm_cells.partial.json").exists()  # removed once complete
    return out, rec


def test_parameter_counts_are_equal_within_the_tolerance(record):
    _, rec = record
    s, r = rec["settings"], rec["results"]
    V = r["vocab_size"]
    assert s["cells"] == ["lstm", "gru", "indrnn"]
    assert r["hidden"][s["reference_cell"]] == s["reference_hidden"]
    ref = hand_count(s["reference_cell"], s["reference_hidden"], V)
    for cell, H in r["hidden"].items():
        assert r["param_counts"][cell] == hand_count(cell, H, V)
        assert {x["params"] for x in r["runs"] if x["cell"] == cell} == {hand_count(cell, H, V)}
        # H is the nearest: its neighbours are no closer to the reference's count
        if cell != s["reference_cell"]:
            dist = [abs(hand_count(cell, h, V) - ref) for h in (H - 1, H, H + 1)]
            assert dist[1] <= min(dist[0], dist[2]), (cell, dist)
        assert abs(hand_count(cell, H, V) / ref - 1) <= s["param_tolerance"]
    assert r["max_param_deviation"] <= s["param_tolerance"]
    # the matching did something: IndRNN (no recurrent matrix) needs the most units
    assert r["hidden"]["indrnn"] > r["hidden"]["gru"] > r["hidden"]["lstm"]


def test_every_built_in_cell_is_counted_with_its_own_parameters(cl):
    # the full mode's six cells, counted from the pytree (IndRNN's u, the peepholes,
    # the layer-norm gains and biases) against the hand counts
    assert cl.FULL.cells == ("elman", "lstm", "gru", "indrnn", "peephole_lstm",
                             "layernorm_lstm")
    assert dict(cl.FULL.forget_bias) == {"lstm": 1.0, "peephole_lstm": 1.0,
                                         "layernorm_lstm": 1.0}
    for cell in cl.FULL.cells:
        assert cl.count_for(cl.FULL, cell, 7, 11) == hand_count(cell, 7, 11), cell
    assert cl.model_for(cl.FULL, "lstm", 4, 11).forget_bias == 1.0
    assert cl.model_for(cl.FULL, "gru", 4, 11).forget_bias == 0.0


def test_the_design_ran_as_stated_and_every_run_learned(record):
    _, rec = record
    s, r = rec["settings"], rec["results"]
    uniform = math.log2(r["vocab_size"])  # a model that knows nothing scores about this
    assert 3.5 < r["unigram_entropy_bits"] < uniform
    first, rest = s["seeds"][0], s["seeds"][1:]
    for cell in s["cells"]:
        runs = [x for x in r["runs"] if x["cell"] == cell]
        sweep = {x["lr"]: x for x in runs if x["seed"] == first}
        assert sorted(sweep) == sorted(s["lrs"])
        sm = r["summary"][cell]
        assert sm["chosen_lr"] == min(sweep, key=lambda lr: sweep[lr]["final_val_bpc"])
        others = [x for x in runs if x["seed"] != first]
        assert sorted(x["seed"] for x in others) == sorted(rest)
        assert all(x["lr"] == sm["chosen_lr"] for x in others)
        at = sorted((x for x in runs if x["lr"] == sm["chosen_lr"]), key=lambda x: x["seed"])
        test = [x["final_test_bpc"] for x in at]
        assert sm["test_bpc"] == test and sm["mean"] == pytest.approx(np.mean(test))
        assert sm["std"] == pytest.approx(np.std(test, ddof=1))
        assert sm["min"] == min(test) and sm["max"] == max(test)
        for x in runs:
            assert not x["diverged"]
            assert x["eval_steps"][0] == 0 and x["eval_steps"][-1] == s["steps"]
            assert len(x["test_curve"]) == len(x["val_curve"]) == len(x["eval_steps"])
            assert x["test_curve"][0] > uniform - 0.5, cell  # at initialisation: near uniform
            assert x["final_test_bpc"] == x["test_curve"][-1] < x["test_curve"][0] - 1.0
            assert x["final_val_bpc"] == x["val_curve"][-1] < x["val_curve"][0] - 1.0
            assert x["best_test_bpc"] == min(x["test_curve"])
            assert x["final_test_bpc"] != x["final_val_bpc"]  # two different slices
        # the seed sets the initialisation (the step-0 score) and the batches
        assert at[0]["test_curve"][0] != at[1]["test_curve"][0]
        assert at[0]["train_curve"] != at[1]["train_curve"]
    assert sorted(r["ranking"]) == sorted(s["cells"])
    assert [r["summary"][c]["mean"] for c in r["ranking"]] == sorted(
        r["summary"][c]["mean"] for c in s["cells"])


def test_validation_slice_follows_the_test_slice(cl):
    from jaxrnn_app import tasks

    s = cl.QUICK
    task = tasks.make_task("charlm", seq_len=s.seq_len, batch_size=s.batch_size,
                            eval_size=s.eval_size, seed=0)
    sl = cl.held_out_slices(s, task)
    T, ids = s.seq_len, task.eval_ids
    test, val = np.asarray(sl["test"].targets), np.asarray(sl["val"].targets)
    assert test.shape == (T, s.eval_size) and val.shape == (T, s.val_size)
    n = s.eval_size
    # window j of the validation slice is held-out window n + j: chars [(n+j)T, (n+j+1)T]
    np.testing.assert_array_equal(val[:, 0], ids[n * T + 1:(n + 1) * T + 1])
    np.testing.assert_array_equal(val[:, -1], ids[(n + s.val_size - 1) * T + 1:
                                                  (n + s.val_size) * T + 1])
    np.testing.assert_array_equal(np.argmax(np.asarray(sl["val"].xs[:, 0]), -1),
                                  ids[n * T:(n + 1) * T])
    assert test[-1, -1] == ids[n * T]  # the test slice ends where the validation one starts
    with pytest.raises(ValueError, match="val_size"):
        cl.held_out_slices(cl.dataclasses.replace(s, val_size=10 ** 6), task)


def test_the_rate_in_the_state_is_adam_on_the_schedule(cl):
    s = cl.dataclasses.replace(cl.QUICK, steps=10)
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    grads = [jax.tree.map(lambda p, k=k: jnp.sin(p * (k + 1)) * 3, params) for k in range(3)]
    lr = 3e-3
    ours, ref = cl.optimizer_for(s), optax.chain(
        optax.clip_by_global_norm(s.clip), optax.adam(optax.cosine_decay_schedule(lr, 10)))

    @jax.jit
    def both(params):  # three steps of each, one compile
        pa = pb = params
        st_a, st_b = cl.with_lr(ours.init(params), lr), ref.init(params)
        for g in grads:
            ua, st_a = ours.update(g, st_a, pa)
            ub, st_b = ref.update(g, st_b, pb)
            pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
        return pa, pb

    pa, pb = both(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), pa, pb)
    assert not np.allclose(pa["w"], params["w"])


def test_samples_and_figure(record):
    out, rec = record
    s, r = rec["settings"], rec["results"]
    text = (out / "samples.txt").read_text()
    for cell in s["cells"]:
        sm = r["summary"][cell]
        (x,) = [x for x in r["runs"] if "sample" in x and x["cell"] == cell]
        assert x["seed"] == s["seeds"][0] and x["lr"] == sm["chosen_lr"]
        sample = x["sample"]
        assert sample.startswith(s["prompt"])
        assert len(sample) == len(s["prompt"]) + s["sample_length"]
        assert sample in text and f"=== {cell} H={x['hidden']}" in text
    png = (out / "charlm_cells.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
