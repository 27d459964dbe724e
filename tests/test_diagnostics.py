"""Per-step gradient diagnostics equal the same quantities from jax.grad.

The oracle is an independent forward pass written here: a Python loop over the
steps calling the cell's ``step`` (no ``forward_scan``, no ``backward_scan``),
with zero "perturbations" added to

* every layer's state after every step, ``h_t + e_t``: ``jax.grad`` wrt ``e_t``
  is the total ``dL/dh_t``, including the path through all later steps;
* every layer's input, ``x_t + u_t``: the gradient is ``dL/dx_t``;
* the weights used by one sequence at one step, ``W + E_{t,b}``: the gradient,
  summed over the batch, is step t's term of ``dL/dW``.

Compared in float64 at a relative error <= 1e-10 for every cell, 1-2 layers,
both directions, with and without lengths.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_rel_close
from jaxrnn import diagnostics as diag_lib
from jaxrnn.cells import CellParams
from jaxrnn.diagnostics import Diagnostics, gradient_diagnostics, step_gradients, summary
from jaxrnn.model import RNN, loss_fn, reverse_sequences
from jaxrnn.scan import project_inputs

RTOL = 1e-10
T, B, D, H, O = 5, 3, 2, 3, 2


# --- the oracle: a perturbed forward pass, a plain loop over steps ----------

def _rev(a, d, lengths):
    return a if d == 0 else reverse_sequences(a, lengths)


def zero_perturbations(model, params, xs):
    """Zeros: eps_h [l][d] (T,B,H), eps_x [l] (T,B,D_l), eps_w [l][d] CellParams of (T,B,...)."""
    nd = model.num_directions
    eps_h = tuple(tuple(jnp.zeros((T, B, model.hidden_size), xs.dtype) for _ in range(nd))
                  for _ in range(model.num_layers))
    eps_x = tuple(jnp.zeros((T, B, layer[0].w_ih.shape[1]), xs.dtype) for layer in params.layers)
    eps_w = jax.tree.map(lambda w: jnp.zeros((T, B) + w.shape, w.dtype), params.layers)
    return eps_h, eps_x, eps_w


def perturbed_loss(model, loss, params, xs, targets, state, lengths, pert, dropout_key=None):
    """The model's loss, recomputed step by step with the perturbations added."""
    eps_h, eps_x, eps_w = pert
    cell = model.cell_fn
    nd = model.num_directions
    mask = None if lengths is None else jnp.arange(T)[:, None] < lengths[None, :]
    carries0 = model._carries(state, B, xs.dtype)

    def one(p, carry, x):  # one sequence, one step, its own weights
        xp = project_inputs(cell, p, x[None, None])[0]  # (1, G*H)
        new, _ = cell.step(p, tuple(c[None] for c in carry), xp)
        return tuple(c[0] for c in new)

    h = xs
    for l in range(model.num_layers):
        h = h + eps_x[l]
        outs = []
        for d in range(nd):
            x_in = _rev(h, d, lengths)
            e_h = _rev(eps_h[l][d], d, lengths)
            e_w = jax.tree.map(lambda e: _rev(e, d, lengths), eps_w[l][d])
            carry = carries0[l * nd + d]
            hs = []
            for s in range(T):
                p_s = jax.tree.map(lambda w, e: w[None] + e[s], params.layers[l][d], e_w)
                new = jax.vmap(one)(p_s, carry, x_in[s])
                if mask is not None:  # frozen past the length
                    new = tuple(jnp.where(mask[s][:, None], a, b) for a, b in zip(new, carry))
                carry = (new[0] + e_h[s],) + tuple(new[1:])  # h_t + e_t, used by all later steps
                hs.append(carry[0] if mask is None else jnp.where(mask[s][:, None], carry[0], 0))
            outs.append(_rev(jnp.stack(hs), d, lengths))
        h = outs[0] if nd == 1 else jnp.concatenate(outs, axis=-1)
        if dropout_key is not None and l < model.num_layers - 1:
            keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, l), 1 - model.dropout,
                                        h.shape)
            h = jnp.where(keep, h / (1 - model.dropout), 0)
    ys = model.readout(params, h, mask)
    from jaxrnn.losses import get_loss
    return get_loss(loss)(ys, targets, mask)


def oracle(model, loss, params, xs, targets, state, lengths, dropout_key=None):
    pert = zero_perturbations(model, params, xs)
    f = lambda pert: perturbed_loss(model, loss, params, xs, targets, state, lengths, pert,  # noqa: E731
                                    dropout_key)
    value, g = jax.jit(jax.value_and_grad(f))(pert)
    return value, g


def make_case(cell, num_layers, bidirectional, with_lengths, loss="half_sse", seed=0,
              dropout=0.0, bias=True):
    model = RNN(cell=cell, input_size=D, hidden_size=H, output_size=O, num_layers=num_layers,
                bidirectional=bidirectional, dropout=dropout, bias=bias)
    k = jax.random.split(jax.random.key(seed), 5)
    params = model.init(k[0], jnp.float64)
    xs = jax.random.normal(k[1], (T, B, D), jnp.float64)
    if loss == "xent":
        targets = jax.random.randint(k[2], (T, B), 0, O)
    else:
        targets = jax.random.normal(k[2], (T, B, O), jnp.float64)
    lengths = jnp.array([T - 1, 1, 3]) if with_lengths else None  # none has length T
    state = None
    if with_lengths:  # a given initial state too
        s = lambda kk: 0.5 * jax.random.normal(kk, (num_layers * model.num_directions, B, H),  # noqa: E731
                                               jnp.float64)
        state = (s(k[3]), s(k[4])) if cell == "lstm" else s(k[3])
    return model, params, xs, targets, state, lengths


def norms(a):
    return jnp.sqrt(jnp.sum(a * a, axis=tuple(range(1, a.ndim))))


def rel_close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    err = float(np.max(np.abs(actual - expected))) / scale
    assert err <= rtol, f"max relative error {err:.3e} > {rtol:.1e}"


def check_against_oracle(model, params, xs, targets, state, lengths, loss, dropout_key=None):
    value, (g_h, g_x, g_w) = oracle(model, loss, params, xs, targets, state, lengths, dropout_key)
    sg = step_gradients(model, params, xs, targets, loss, state, lengths, dropout_key)
    dg = gradient_diagnostics(model, params, xs, targets, loss, state, lengths, dropout_key)
    np.testing.assert_allclose(sg.loss, value, rtol=1e-12)
    np.testing.assert_allclose(dg.loss, value, rtol=1e-12)
    for l in range(model.num_layers):
        rel_close(sg.dx[l], g_x[l])  # dL/dx_t, elementwise
        rel_close(dg.dx_norm[l], norms(g_x[l]))
        for d in range(model.num_directions):
            rel_close(sg.dh[l][d], g_h[l][d])  # total dL/dh_t, elementwise
            rel_close(dg.dh_norm[l][d], norms(g_h[l][d]))
            # step t's weight-gradient term = grad wrt the step's own weights, summed over b
            per_step = jax.tree.map(lambda e: e.sum(axis=1), g_w[l][d])
            assert_trees_rel_close(sg.dparams[l][d], per_step, RTOL)
            rel_close(dg.dw_ih_norm[l][d], norms(per_step.w_ih))
            rel_close(dg.dw_hh_norm[l][d], norms(per_step.w_hh))
    return value, g_h, sg, dg


# --- tests -------------------------------------------------------------------

@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell", ["elman", "lstm", "gru"])
def test_per_step_quantities_equal_jax_grad(cell, num_layers, bidirectional, with_lengths):
    case = make_case(cell, num_layers, bidirectional, with_lengths,
                     seed=num_layers + 2 * bidirectional)
    model, params, xs, targets, state, lengths = case
    _, g_h, sg, dg = check_against_oracle(*case, "half_sse")
    # the full gradient is the handwritten BPTT's, and autodiff's
    for method in ("bptt", "autodiff"):
        _, g = model.loss_and_grad(params, xs, targets, method=method, state=state,
                                   lengths=lengths)
        assert_trees_rel_close(dg.grads, g, RTOL)
        assert_trees_rel_close(sg.grads, g, RTOL)
    # the per-step terms sum to the gradient
    for l in range(num_layers):
        for d in range(model.num_directions):
            summed = jax.tree.map(lambda a: a.sum(axis=0), sg.dparams[l][d])
            assert_trees_rel_close(summed, dg.grads.layers[l][d], RTOL)
    if with_lengths:
        # lengths [T-1, 1, 3]: step T-1 is past every length, so zero everywhere
        for l in range(num_layers):
            assert float(dg.dx_norm[l][-1]) == 0.0
            for d in range(model.num_directions):
                assert float(dg.dh_norm[l][d][-1]) == 0.0
                assert float(dg.dw_ih_norm[l][d][-1]) == 0.0
                assert float(dg.dw_hh_norm[l][d][-1]) == 0.0
                assert float(jnp.abs(sg.dh[l][d][1:, 1]).max()) == 0.0  # sequence 1 has length 1
    # the oracle's dh is not trivially the direct term: later steps contribute
    assert float(jnp.abs(g_h[0][0][0]).max()) > 0


@pytest.mark.parametrize("loss", ["mse", "xent"])
def test_other_losses(loss):
    case = make_case("lstm", 2, True, True, loss=loss, seed=7)
    check_against_oracle(*case, loss)


def test_without_bias():
    case = make_case("gru", 2, False, True, seed=3, bias=False)
    _, _, sg, _ = check_against_oracle(*case, "half_sse")
    assert sg.dparams[0][0].b_ih is None and sg.dparams[0][0].b_hh is None


def test_dropout_between_layers():
    model, params, xs, targets, state, lengths = make_case("elman", 2, True, False, seed=5,
                                                           dropout=0.4)
    key = jax.random.key(11)
    check_against_oracle(model, params, xs, targets, state, lengths, "half_sse", key)
    dg = gradient_diagnostics(model, params, xs, targets, dropout_key=key)
    _, g = model.loss_and_grad(params, xs, targets, dropout_key=key)
    assert_trees_rel_close(dg.grads, g, RTOL)
    _, g_nodrop = model.loss_and_grad(params, xs, targets)
    assert not np.allclose(g.layers[0][0].w_ih, g_nodrop.layers[0][0].w_ih)  # dropout mattered


def test_last_only_scores_the_last_step():
    model, params, xs, targets, _, _ = make_case("gru", 1, False, False, seed=2)
    dg = gradient_diagnostics(model, params, xs, targets, last_only=True)
    value, g = jax.value_and_grad(loss_fn, argnums=3)(model, "half_sse", "autodiff", params, xs,
                                                      targets, None, None, None, True)
    np.testing.assert_allclose(dg.loss, value, rtol=1e-12)
    assert_trees_rel_close(dg.grads, g, RTOL)
    # only step T-1 is scored, so earlier steps' dh is only what flows back
    sg = step_gradients(model, params, xs, targets, last_only=True)
    direct = sg.dh[0][0][-1]
    assert float(jnp.abs(direct).max()) > 0
    assert float(dg.dh_norm[0][0][0]) < float(dg.dh_norm[0][0][-1])


def test_jit_and_eager_agree():
    model, params, xs, targets, state, lengths = make_case("lstm", 2, True, True, seed=1)
    eager = gradient_diagnostics(model, params, xs, targets, "half_sse", state, lengths)
    jitted = jax.jit(lambda p, x, t, s, n: gradient_diagnostics(model, p, x, t, "half_sse", s, n))(
        params, xs, targets, state, lengths)
    assert_trees_rel_close(jitted, eager, 1e-13)
    assert isinstance(jitted, Diagnostics)


def test_float32():
    model = RNN(cell="elman", input_size=D, hidden_size=H, output_size=O)
    params = model.init(jax.random.key(0))
    xs = jnp.ones((T, B, D), jnp.float32)
    dg = gradient_diagnostics(model, params, xs, jnp.zeros((T, B, O), jnp.float32))
    assert dg.dh_norm[0][0].dtype == jnp.float32
    assert dg.dh_norm[0][0].shape == (T,)
    _, g = model.loss_and_grad(params, xs, jnp.zeros((T, B, O), jnp.float32))
    assert_trees_rel_close(dg.grads, g, 1e-5)


@pytest.mark.parametrize("chunk_elements", [1, 7 * 3, 1 << 24])
def test_step_outer_norms_in_chunks(monkeypatch, chunk_elements):
    # chunks of 1 step, of 3 steps with a remainder (T=7, G*D=7), and all at once
    monkeypatch.setattr(diag_lib, "_CHUNK_ELEMENTS", chunk_elements)
    a = jax.random.normal(jax.random.key(0), (7, 4, 7), jnp.float64)
    b = jax.random.normal(jax.random.key(1), (7, 4, 1), jnp.float64)
    got = diag_lib._step_outer_norms(a, b)
    want = np.linalg.norm(np.einsum("tbg,tbd->tgd", a, b), axis=(1, 2))
    np.testing.assert_allclose(got, want, rtol=1e-13)


def test_summary():
    model, params, xs, targets, state, lengths = make_case("elman", 2, True, False, seed=4)
    dg = gradient_diagnostics(model, params, xs, targets)
    s = summary(dg)
    assert sorted(s) == sorted(f"dh_{k}_l{l}{r}" for k in ("first", "last", "ratio")
                               for l in (0, 1) for r in ("", "_reverse"))
    assert float(s["dh_first_l1_reverse"]) == float(dg.dh_norm[1][1][0])
    assert float(s["dh_last_l0"]) == float(dg.dh_norm[0][0][-1])
    np.testing.assert_allclose(float(s["dh_ratio_l0"]),
                               float(dg.dh_norm[0][0][0] / dg.dh_norm[0][0][-1]), rtol=1e-14)
    assert all(math.isfinite(float(v)) for v in s.values())
    # under jit too
    sj = jax.jit(summary)(dg)
    assert float(sj["dh_ratio_l0"]) == float(s["dh_ratio_l0"])
    # no sequence reaches step T-1: the ratio is undefined, reported as NaN
    dgl = gradient_diagnostics(model, params, xs, targets, lengths=jnp.array([2, 3, 1]))
    assert math.isnan(float(summary(dgl)["dh_ratio_l0"]))


def test_errors():
    model, params, xs, targets, _, _ = make_case("elman", 1, False, False)
    with pytest.raises(ValueError, match="lengths must be None"):
        gradient_diagnostics(model, params, xs, targets, lengths=jnp.full((B,), T),
                             last_only=True)
    with pytest.raises(ValueError, match="targets must have shape"):
        gradient_diagnostics(model, params, xs, targets[:, :, :1])
    with pytest.raises(ValueError, match="xs must have shape"):
        step_gradients(model, params, xs[..., :1], targets)
    with pytest.raises(ValueError, match="loss must be one of"):
        gradient_diagnostics(model, params, xs, targets, loss="l1")
    with pytest.raises(TypeError, match="model must be a jaxrnn.RNN"):
        gradient_diagnostics("elman", params, xs, targets)
    assert isinstance(step_gradients(model, params, xs, targets).dparams[0][0], CellParams)
