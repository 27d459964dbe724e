"""Forward mode through ``method="bptt"`` (``JAXRNN_BPTT_RULE=hijax``): jvp, linearize,
jacfwd and both second orders equal ``method="autodiff"``; reverse mode still runs the
handwritten reverse scan, its gradients bit for bit those of the ``custom_vjp`` path."""

import jax
import jax.numpy as jnp
import pytest

from conftest import assert_trees_rel_close, weight_accumulating_scans
import jaxrnn
from jaxrnn import RNN
from jaxrnn._src import hiscan, scan
from jaxrnn.extend import CELLS

pytestmark = pytest.mark.skipif(not hiscan.AVAILABLE, reason=f"no hijax: {hiscan.REASON}")

T, B, D, H, O = 5, 3, 2, 3, 2
TOL = 1e-10
OPTIONS = {"plain": {}, "lengths": {"lengths": True},
           "segment": {"segment": 2, "lengths": True}}
# pairwise: every cell, every option, each cell with one option (all 18 pairs passed
# once, in 118 s on two cores; too slow for the suite)
CASES = [(cell, list(OPTIONS)[i % len(OPTIONS)]) for i, cell in enumerate(CELLS)]


def setup(cell, opt, method):
    o = OPTIONS[opt]
    model = RNN(cell=cell, input_size=D, hidden_size=H, output_size=O,
                bptt_segment=o.get("segment") if method == "bptt" else None)
    k = jax.random.split(jax.random.key(len(cell) + len(opt)), 4)
    params = model.init(k[0], jnp.float64)
    xs = jax.random.normal(k[1], (T, B, D), jnp.float64)
    targets = jax.random.normal(k[2], (T, B, O), jnp.float64)
    lengths = jnp.array([T, 1, 3]) if o.get("lengths") else None
    tangent = jax.tree.map(lambda a: jax.random.normal(k[3], a.shape, a.dtype), params)

    def loss(p, x):
        return model.loss(p, x, targets, method=method, lengths=lengths)
    return model, params, xs, tangent, loss, lengths


def all_derivatives(cell, opt, method, second_order):
    model, params, xs, tangent, loss, lengths = setup(cell, opt, method)

    @jax.jit
    def run(p, x, tp):
        lossp = lambda p: loss(p, x)  # noqa: E731
        jvp = jax.jvp(lossp, (p,), (tp,))
        lin = jax.linearize(lossp, p)[1](tp)
        jacfwd_x = jax.jacfwd(loss, argnums=1)(p, x)
        ys_vmap = jax.vmap(lambda xb: model.apply(p, xb[:, None], method=method)[0])(
            x.transpose(1, 0, 2))
        out = dict(jvp=jvp, lin=lin, jacfwd_x=jacfwd_x, ys_vmap=ys_vmap)
        if second_order:
            out["fwd_over_rev"] = jax.jvp(jax.grad(lossp), (p,), (tp,))[1]
            out["rev_over_fwd"] = jax.grad(lambda p: jax.jvp(lossp, (p,), (tp,))[1])(p)
        return out

    return run(params, xs, tangent)


# both second orders (jvp of grad, grad of jvp) on two cases, to keep the suite short
SECOND_ORDER = {("lstm", "lengths"), ("gru", "segment")}


@pytest.mark.parametrize("cell, opt", CASES)
def test_forward_mode_through_bptt_equals_autodiff(cell, opt, monkeypatch):
    monkeypatch.setenv("JAXRNN_BPTT_RULE", "hijax")
    second = (cell, opt) in SECOND_ORDER
    got = all_derivatives(cell, opt, "bptt", second)
    want = all_derivatives(cell, opt, "autodiff", second)
    assert_trees_rel_close(got, want, TOL)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_reverse_mode_is_the_handwritten_scan_bit_for_bit(cell, monkeypatch):
    _, params, xs, _, loss, _ = setup(cell, "lengths", "bptt")
    grad = jax.grad(loss, argnums=(0, 1))
    monkeypatch.setenv("JAXRNN_BPTT_RULE", "custom_vjp")
    g_vjp = jax.jit(grad)(params, xs)
    monkeypatch.setenv("JAXRNN_BPTT_RULE", "hijax")
    g_hi = jax.jit(lambda p, x: grad(p, x))(params, xs)
    jax.tree.map(lambda a, b: None if bool(jnp.all(a == b)) else pytest.fail("not bit-identical"),
                 g_hi, g_vjp)
    jaxpr = jax.make_jaxpr(jax.jit(lambda p, x: grad(p, x)))(params, xs)
    assert weight_accumulating_scans(jaxpr, B) == []
    _, _, _, _, loss_ad, _ = setup(cell, "lengths", "autodiff")
    assert weight_accumulating_scans(jax.make_jaxpr(jax.grad(loss_ad))(params, xs), B) != []


def test_custom_vjp_path_still_refuses_forward_mode(monkeypatch):
    monkeypatch.delenv("JAXRNN_BPTT_RULE", raising=False)
    assert scan.bptt_rule() == "hijax"  # the default on this jax
    monkeypatch.setenv("JAXRNN_BPTT_RULE", "custom_vjp")
    _, params, xs, tangent, loss, _ = setup("elman", "plain", "bptt")
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda p: loss(p, xs), (params,), (tangent,))
    monkeypatch.setenv("JAXRNN_BPTT_RULE", "bogus")
    with pytest.raises(ValueError, match="JAXRNN_BPTT_RULE"):
        scan.bptt_rule()


def test_forward_mode_runs_the_cells_tangent_step():
    """``jax.jvp`` through ``method="bptt"`` runs ``Cell.tangent_step`` (the tangent
    scan), not ``jax.jvp`` of the forward scan: a cell whose tangent step is off by a
    factor gives an off tangent, while its gradient (the backward step) stays right."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class ScaledTangent(jaxrnn.Elman):
        def tangent_step(self, params, carry_prev, xp, carry, res, dparams, dcarry_prev, dxp):
            (dh,) = super().tangent_step(params, carry_prev, xp, carry, res, dparams,
                                         dcarry_prev, dxp)
            return (2.0 * dh,)

    model = RNN(cell=ScaledTangent(), input_size=D, hidden_size=H, output_size=O)
    params = model.init(jax.random.key(0), jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (T, B, D), jnp.float64)
    tx = jax.random.normal(jax.random.key(2), xs.shape, jnp.float64)
    out = {m: jax.jvp(lambda x: model.apply(params, x, method=m)[0], (xs,), (tx,))[1]
           for m in ("bptt", "autodiff")}
    assert float(jnp.max(jnp.abs(out["bptt"] - out["autodiff"]))) > 0.1
    loss = {m: jax.grad(lambda x: jnp.sum(model.apply(params, x, method=m)[0] ** 2))(xs)
            for m in ("bptt", "autodiff")}
    assert_trees_rel_close(loss["bptt"], loss["autodiff"], TOL)


def test_linearize_under_vmap_equals_autodiff():
    """``jax.linearize`` inside and outside ``jax.vmap`` (the batch rule folds the
    mapped axis into the layer's batch), float64 (``jacfwd`` under ``vmap``: the
    forward-mode test's ``ys_vmap`` and ``jacfwd_x``)."""
    model = RNN(cell="gru", input_size=D, hidden_size=H, output_size=O)
    params = model.init(jax.random.key(0), jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (4, T, 1, D), jnp.float64)  # 4 mapped sequences
    tx = jax.random.normal(jax.random.key(2), xs.shape, jnp.float64)
    lengths = jnp.array([T - 2])
    res = {}
    for method in ("bptt", "autodiff"):
        f = lambda x: model.apply(params, x, lengths=lengths, method=method)[0]  # noqa: E731
        inside = jax.vmap(lambda x, t: jax.linearize(f, x)[1](t))(xs, tx)
        outside = jax.linearize(jax.vmap(f), xs)[1](tx)
        res[method] = (inside, outside)
    assert_trees_rel_close(res["bptt"], res["autodiff"], TOL)
