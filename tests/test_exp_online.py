"""experiments/online_learning.py (issue #23): the quick run, and the pieces it computes itself.

The script is run once as a subprocess (its real command line, float32) and its JSON
and figures are checked, with the results that hold at the quick scale: exact RTRL's
per-step gradient is aligned with itself to 1e-6 (the measure compares what it
should), a stochastic estimator's is not, RTRL ends below the best constant's loss,
and at alpha = 1 RFLO and e-prop are the same rule (identical curves). In-process,
in float64: the exact per-step gradients the script computes for truncated BPTT sum
to BPTT's window gradient, and truncating at the window's length changes nothing.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_exp_training import _assert_pngs, _finite, _import_experiment, _run_quick

METHODS = ["rtrl", "kf_rtrl", "uoro", "rflo", "tbptt", "snap1", "eprop"]


@pytest.fixture(scope="module")
def online(tmp_path_factory):
    out = tmp_path_factory.mktemp("online_learning")
    return out, _run_quick("online_learning", out)


@pytest.fixture(scope="module")
def module():
    return _import_experiment("online_learning")


def test_online_results_have_every_method_and_consistent_numbers(online):
    out, record = online
    s, res = record["settings"], record["results"]
    assert res["levels"] == pytest.approx({"constant": 5 / 64, "t1_only": 1 / 64, "both": 0.0})
    assert s["methods"] == METHODS and len(s["seeds"]) == 1
    assert sorted(res["order"]) == sorted(METHODS) == sorted(res["summary"])
    runs = {r["entry"]: r for r in res["runs"]}
    assert sorted(runs) == sorted(METHODS) and len(res["runs"]) == len(METHODS)
    n, w = s["steps"] // s["chunk"], s["smooth"] // s["chunk"]
    for e, r in runs.items():
        assert r["method"] == e and r["lr"] == s["lr"] and r["finite"]
        assert r["steps"] == [(i + 1) * s["chunk"] for i in range(n)]
        assert len(r["mse"]) == n and _finite(r["mse"]) and min(r["mse"]) > 0
        smoothed = np.convolve(r["mse"], np.ones(w) / w, mode="valid")
        np.testing.assert_allclose(r["smoothed"], smoothed, rtol=1e-12)
        assert r["final_mse"] == pytest.approx(np.mean(r["mse"][-(s["final"] // s["chunk"]):]))
        assert r["learned_t1"] == (r["final_mse"] < s["t1_level"])
        assert r["learned_both"] == (r["final_mse"] < s["both_level"])
        if r["step_t1"] is not None:  # the first smoothed point below the level
            i = r["smoothed_steps"].index(r["step_t1"])
            assert r["smoothed"][i] < s["t1_level"] <= min(r["smoothed"][:i] + [math.inf])
        assert [a["step"] for a in r["alignment"]] == [0, s["steps"]]  # checkpoints = 2
        for a in r["alignment"]:
            assert -1 <= a["step_cosine"] <= 1 and a["step_rel_error"] >= 0
            assert a["window_cosine"] is None  # the quick run skips the window measure
        t = res["summary"][e]
        assert t["final_mse"] == [r["final_mse"]] and t["learned_t1"] == int(r["learned_t1"])
        assert t["step_cosine_end"] == pytest.approx(r["alignment"][-1]["step_cosine"])
    _assert_pngs(out, res["figures"], {"online_learning_loss.png",
                                       "online_learning_alignment.png"})


def test_online_alignment_measures_what_it_should(online):
    _, record = online
    runs = {r["entry"]: r for r in record["results"]["runs"]}
    for a in runs["rtrl"]["alignment"]:  # exact RTRL against itself
        assert a["step_cosine"] == pytest.approx(1, abs=1e-6)
        assert a["step_rel_error"] < 1e-5
    for a in runs["uoro"]["alignment"]:  # a rank-one random estimate is far from it
        assert a["step_cosine"] < 0.9
    assert runs["tbptt"]["alignment"][0]["step_cosine"] < 1 - 1e-4  # truncation loses something


def test_online_rtrl_learns_below_the_best_constant_and_rflo_is_eprop(online):
    _, record = online
    s, res = record["settings"], record["results"]
    runs = {r["entry"]: r for r in res["runs"]}
    rtrl = runs["rtrl"]
    assert rtrl["final_mse"] < res["levels"]["constant"], rtrl["mse"]
    assert rtrl["smoothed"][-1] < 0.5 * rtrl["mse"][0]
    # alpha = 1: RFLO's trace (1 - alpha) B + alpha phi' z is e-prop's eligibility trace
    assert s["alpha"] == 1.0 and s["rflo_feedback"] == "symmetric"
    np.testing.assert_allclose(runs["eprop"]["mse"], runs["rflo"]["mse"], rtol=1e-4)
    assert runs["snap1"]["mse"] != runs["rflo"]["mse"]  # SnAp-1 keeps U's diagonal


def test_tbptt_step_gradients_are_bptt_and_truncation_cuts_them(module):
    s = module.QUICK
    model = module.make_model(s)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), module.marschall_init(model, 0))
    task = module.LagTask(seed=3, seq_len=12, eval_size=1, t1=s.t1, t2=s.t2)
    batch = task.eval_batch()
    xs, ys = batch.xs.astype(jnp.float64), batch.targets.astype(jnp.float64)
    exact, trunc = module.step_gradients(model, params, xs, ys, 4)
    _, grads = model.loss_and_grad(params, xs, ys, "half_sse", "bptt")
    flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads.layers)])
    np.testing.assert_allclose(np.sum(exact, 0), flat, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(trunc[:4], exact[:4], rtol=1e-10, atol=1e-14)  # first window
    assert np.max(np.abs(trunc[4:] - exact[4:])) > 1e-3 * np.max(np.abs(exact))
    same, whole = module.step_gradients(model, params, xs, ys, 12)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(whole))


def test_levels_and_entries(module):
    assert module.lag_levels() == pytest.approx({"constant": 5 / 64, "t1_only": 1 / 64,
                                                 "both": 0.0})
    s = module.FULL
    assert module.parse("uoro@0.003", s) == ("uoro", 0.003)
    assert module.parse("rflo", s) == ("rflo", s.lr)
    assert module.label("uoro@0.003", s) == "UORO (lr 0.003)"
    for bad in ("bogus", "uoro@fast"):
        with pytest.raises(module.common.UsageError, match=bad.split("@")[0]):
            module.parse(bad, s)
