"""Issue #6: gradient diagnostics as a logged training metric, and method="rtrl" end to end.

* ``make_train_step(diagnostics=True)`` takes its loss and gradient from
  ``gradient_diagnostics`` (the same reverse scan as ``method="bptt"``): the same
  update, plus ``summary(...)`` in the metrics;
* ``make_train_step(method="rtrl")``: the same update as ``method="bptt"``;
* the command line: ``jaxrnn train --diagnostics`` / ``--method rtrl``, resume,
  bad combinations (exit 2, one line), and ``jaxrnn gradcheck``'s rtrl column.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_trees_rel_close
from jaxrnn import RNN, Batch, make_tbptt_step, make_train_step
from jaxrnn_app.cli import main
from jaxrnn._src.diagnostics import gradient_diagnostics, summary


def problem(model, T=9, B=3, loss="half_sse", seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    xs = jax.random.normal(k[0], (T, B, model.input_size), jnp.float64)
    if loss == "xent":
        targets = jax.random.randint(k[1], (T, B), 0, model.output_size)
    else:
        targets = jax.random.normal(k[1], (T, B, model.output_size), jnp.float64)
    return model.init(k[2], jnp.float64), Batch(xs, targets)


def run_steps(step, opt, params, batch, n, key=None):
    state = opt.init(params)
    for i in range(n):
        k = None if key is None else jax.random.fold_in(key, i)
        params, state, metrics = step(params, state, batch, k)
    return params, metrics


# --- diagnostics=True ---------------------------------------------------------

def test_diagnostics_step_equals_the_plain_step_and_logs_the_summary():
    """Two layers with dropout between them (the key is passed on)."""
    model = RNN(cell="elman", input_size=2, hidden_size=4, output_size=3, num_layers=2,
                dropout=0.3)
    params, batch = problem(model, loss="xent")
    key = jax.random.key(7)
    opt = optax.adam(1e-2)
    plain = make_train_step(model, opt, loss="xent", donate=False)
    diag = make_train_step(model, opt, loss="xent", donate=False, diagnostics=True)
    p_plain, m_plain = run_steps(plain, opt, params, batch, 2, key)
    p_diag, m_diag = run_steps(diag, opt, params, batch, 2, key)
    assert_trees_rel_close(p_diag, p_plain, 1e-12)
    assert float(m_diag["loss"]) == pytest.approx(float(m_plain["loss"]), rel=1e-13, abs=0)
    assert float(m_diag["grad_norm"]) == pytest.approx(float(m_plain["grad_norm"]), rel=1e-12)
    assert set(m_plain) == {"loss", "grad_norm"}

    # The metrics are summary(gradient_diagnostics(...)) at the parameters the step saw.
    _, _, m_first = diag(params, opt.init(params), batch, jax.random.fold_in(key, 0))
    expected = summary(gradient_diagnostics(model, params, batch.xs, batch.targets, "xent",
                                            dropout_key=jax.random.fold_in(key, 0)))
    extra = {k: v for k, v in m_first.items() if k not in ("loss", "grad_norm")}
    assert sorted(extra) == sorted(expected)
    assert {"dh_first_l0", "dh_ratio_l0", "dh_first_l1", "dh_last_l1"} <= set(extra)
    for k, v in expected.items():
        assert float(extra[k]) == pytest.approx(float(v), rel=1e-12), k
        assert np.isfinite(float(v)) and float(v) > 0


def test_diagnostics_with_last_only_scoring():
    model = RNN(cell="elman", input_size=2, hidden_size=3, output_size=1)
    params, batch = problem(model, T=6)
    opt = optax.sgd(0.1)
    p_plain, _ = run_steps(make_train_step(model, opt, last_only=True, donate=False), opt,
                           params, batch, 1)
    p_diag, m = run_steps(make_train_step(model, opt, last_only=True, donate=False,
                                          diagnostics=True), opt, params, batch, 1)
    assert_trees_rel_close(p_diag, p_plain, 1e-12)
    d = summary(gradient_diagnostics(model, params, batch.xs, batch.targets, last_only=True))
    assert float(m["dh_last_l0"]) == pytest.approx(float(d["dh_last_l0"]), rel=1e-12)


@pytest.mark.parametrize("method", ["autodiff", "rtrl"])
def test_diagnostics_needs_bptt(method):
    model = RNN(cell="elman", input_size=2, hidden_size=3, output_size=1)
    with pytest.raises(ValueError, match="diagnostics=True .* needs method='bptt'"):
        make_train_step(model, optax.sgd(0.1), method=method, diagnostics=True)


# --- method="rtrl" --------------------------------------------------------------

@pytest.mark.parametrize("loss, last_only, lengths", [
    ("half_sse", True, None), ("xent", False, (9, 4, 1))])
def test_rtrl_step_equals_the_bptt_step(loss, last_only, lengths):
    model = RNN(cell="elman", input_size=2, hidden_size=4, output_size=3)
    params, batch = problem(model, loss=loss)
    if lengths is not None:
        batch = batch._replace(lengths=jnp.array(lengths))
    opt = optax.sgd(0.1, momentum=0.9)
    out = {}
    for method in ("bptt", "rtrl"):
        step = make_train_step(model, opt, loss=loss, method=method, donate=False,
                               last_only=last_only)
        out[method] = run_steps(step, opt, params, batch, 3)
    assert_trees_rel_close(out["rtrl"][0], out["bptt"][0], 1e-10)
    assert float(out["rtrl"][1]["loss"]) == pytest.approx(float(out["bptt"][1]["loss"]),
                                                          rel=1e-12)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), out["rtrl"][0], params)
    assert min(jax.tree.leaves(moved)) > 1e-6  # every parameter trained


@pytest.mark.parametrize("method, kw, match", [
    ("rtrl", dict(bidirectional=True), "method='rtrl' runs forward in time: "
                                       "bidirectional=True is not supported"),
    ("kf_rtrl", dict(cell="lstm"), "method='kf_rtrl' needs one layer of the 'elman' or "
                                   "'leaky' cell"),
    ("kf_rtrl", dict(num_layers=2), "got 2 layer"),
])
def test_estimator_step_refuses_unsupported_models_when_made(method, kw, match):
    """RTRL runs on every cell and depth (one direction); the others refuse, each naming
    itself, the models they are not defined on."""
    model = RNN(**{"cell": "elman", "input_size": 2, "hidden_size": 3, "output_size": 1, **kw})
    with pytest.raises(ValueError, match=match):
        make_train_step(model, optax.sgd(0.1), method=method)
    for cell, layers in (("lstm", 1), ("gru", 2)):  # made without complaint
        make_train_step(RNN(cell=cell, input_size=2, hidden_size=3, output_size=1,
                            num_layers=layers), optax.sgd(0.1), method="rtrl")


def test_truncated_bptt_refuses_rtrl():
    model = RNN(cell="elman", input_size=2, hidden_size=3, output_size=1)
    with pytest.raises(ValueError, match="rtrl' is not supported by truncated BPTT"):
        make_tbptt_step(model, optax.sgd(0.1), k1=2, method="rtrl")


# --- the command line -------------------------------------------------------------

SINE = ["--task", "sine", "--cell", "elman", "--hidden", "4", "--batch", "4", "--seq-len",
        "10", "--log-every", "1", "--eval-every", "0", "--no-progress"]


def metrics_rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]


def test_cli_train_rtrl(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *SINE, "--method", "rtrl", "--steps", "3", "--out", str(out)]) == 0
    assert "method=rtrl" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["method"] == "rtrl"
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert "dh_first_l0" not in rows[0]


def test_cli_train_diagnostics_then_resume(tmp_path):
    """--diagnostics puts the summary in every row; it may be switched on (and off, with
    --no-diagnostics) when resuming (it is not a model field, so the checkpoint still
    matches)."""
    out = tmp_path / "d"
    args = [*SINE, "--layers", "2", "--out", str(out)]
    assert main(["train", *args, "--diagnostics", "--steps", "2"]) == 0
    rows = metrics_rows(out)
    keys = {f"dh_{w}_l{l}" for w in ("first", "last", "ratio") for l in (0, 1)}
    for r in rows:
        assert keys <= set(r)
        assert r["dh_first_l0"] > 0 and r["dh_last_l1"] > 0
        assert r["dh_ratio_l0"] == pytest.approx(r["dh_first_l0"] / r["dh_last_l0"], rel=1e-5)
    assert json.loads((out / "config.json").read_text())["diagnostics"] is True
    assert main(["train", "--resume", "--out", str(out), "--steps", "3", "--no-diagnostics",
                 "--no-progress"]) == 0  # and switched off again
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert keys <= set(rows[1]) and "dh_first_l0" not in rows[2]
    assert json.loads((out / "config.json").read_text())["diagnostics"] is False

    plain = tmp_path / "p"
    assert main(["train", *SINE, "--layers", "2", "--steps", "2", "--out", str(plain)]) == 0
    assert main(["train", "--resume", "--out", str(plain), "--steps", "3", "--diagnostics",
                 "--no-progress"]) == 0
    rows = metrics_rows(plain)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "dh_first_l0" not in rows[1] and keys <= set(rows[2])


@pytest.mark.parametrize("args, match", [
    # the library's rules (estimators.check_model, check_train_options), named as options
    (["--method", "rtrl", "--bidirectional"], "--method 'rtrl' runs forward in time: "
                                              "--bidirectional is not supported"),
    (["--method", "kf_rtrl", "--cell", "lstm"], "--method 'kf_rtrl' needs one layer of the "
                                                "'elman' or 'leaky' cell"),
    (["--method", "rtrl", "--k1", "5"], "truncated BPTT (--k1/--k2) is not supported"),
    (["--method", "rtrl", "--hidden", "200", "--batch", "64"],
     "--method 'rtrl' is too large for this model"),
    (["--method", "uoro", "--compute-dtype", "bfloat16"], "--compute-dtype bfloat16 is not "
                                                          "supported with --method uoro"),
    (["--diagnostics", "--method", "autodiff"], "--diagnostics reads the handwritten reverse "
                                                "scan: it needs --method 'bptt'"),
    (["--diagnostics", "--k1", "5"], "--diagnostics is not supported with truncated BPTT"),
])
def test_cli_train_bad_combinations_exit_2(tmp_path, capsys, args, match):
    base = ["--task", "sine", "--cell", "elman", "--steps", "2", "--no-progress"]
    out = tmp_path / "r"
    assert main(["train", *base, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_cli_resume_refuses_diagnostics_for_another_method(tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["train", *SINE, "--method", "autodiff", "--steps", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--steps", "2", "--diagnostics"]) == 2
    assert "needs --method 'bptt', got --method 'autodiff'" in capsys.readouterr().err


# --- gradcheck ----------------------------------------------------------------------

GRADCHECK = ["gradcheck", "--trials", "1", "--seq-len", "4", "--hidden", "3", "--batch", "2",
             "--no-progress"]


def table_rows(out):
    return [[c.strip() for c in r.split("|")[1:-1]] for r in out.splitlines()
            if r.startswith("| 0 ")]


def test_gradcheck_compares_rtrl_where_it_applies(capsys):
    """Two layers of the GRU: a configuration RTRL once refused, exact now."""
    assert main([*GRADCHECK, "--cell", "gru", "--layers", "2", "--no-bidirectional"]) == 0
    out = capsys.readouterr().out
    head = [c.strip() for c in out.splitlines()[0].split("|")[1:-1]]
    (row,) = table_rows(out)
    rtrl = row[head.index("rtrl vs autodiff")]
    assert float(rtrl) <= 1e-10 and row[-1] == "ok"
    assert "rtrl vs autodiff" in out.splitlines()[-1]



def test_gradcheck_shows_a_dash_where_rtrl_does_not_apply():
    """RTRL is exact for every cell and depth: the column applies to every one-direction
    configuration within its size limit."""
    from jaxrnn_app.gradcheck import CheckConfig, CheckResult, format_results, rtrl_supported

    for kw in (dict(cell="elman"), dict(cell="gru"), dict(cell="lstm", num_layers=2),
               dict(cell="leaky", with_state=True)):
        assert rtrl_supported(CheckConfig(bidirectional=False, **kw)), kw
    for kw in (dict(bidirectional=True),
               dict(hidden_size=200, input_size=5, batch=30, bidirectional=False)):
        assert not rtrl_supported(CheckConfig(**kw))
    r = CheckResult(CheckConfig(bidirectional=True), 1e-16, 1e-9, 1e-9)
    table = format_results([r])
    head = [c.strip() for c in table.splitlines()[0].split("|")[1:-1]]
    (row,) = table_rows(table)
    assert row[head.index("rtrl vs autodiff")] == "-" and row[-1] == "ok" and r.ok
    bad = r._replace(config=CheckConfig(bidirectional=False), rtrl_vs_autodiff=1e-8)
    assert not bad.ok and table_rows(format_results([bad]))[0][-1] == "MISMATCH"


def test_gradcheck_reports_a_wrong_rtrl(monkeypatch, capsys):
    import jaxrnn

    original = jaxrnn.rtrl_loss_and_grad

    def wrong(*args, **kw):
        out = original(*args, **kw)
        grads = out[1]._replace(readout=jax.tree.map(lambda g: g * (1 + 1e-8), out[1].readout))
        return (out[0], grads, *out[2:])

    monkeypatch.setattr(jaxrnn, "rtrl_loss_and_grad", wrong)  # as gradcheck calls it
    assert main([*GRADCHECK, "--cell", "elman", "--layers", "1", "--no-bidirectional"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and table_rows(out)[0][-1] == "MISMATCH"
