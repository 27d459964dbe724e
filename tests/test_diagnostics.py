"""Per-step gradient diagnostics equal the same quantities from jax.grad.

The oracle is an independent forward pass written here: a Python loop over the
steps calling the cell's ``step`` (no ``forward_scan``, no ``backward_scan``; each
sequence may have its own weights), with zero "perturbations" added to

* every layer's state after every step, ``h_t + e_t``: ``jax.grad`` wrt ``e_t``
  is the total ``dL/dh_t``, including the path through all later steps;
* every layer's input, ``x_t + u_t``: the gradient is ``dL/dx_t``;
* the weights used by one sequence at one step, ``W + E_{t,b}``: the gradient,
  summed over the batch, is step t's term of ``dL/dW``.

Compared in float64 at a relative error <= 1e-10 for every cell, 1-2 layers,
both directions, with and without lengths (and an initial state).

Time: compiling each configuration costs 1-3 s on a 2-core CPU, so the grid runs
op by op (``jax.disable_jit``), where the primitives compiled for one case serve
the next; ``test_jit_*`` check the jit-compiled path (how users run it) against it.
"""

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import all_pairs, assert_trees_rel_close
from jaxrnn._src import diagnostics as diag_lib
from jaxrnn._src.cells import CellParams
from jaxrnn._src.diagnostics import Diagnostics, gradient_diagnostics, step_gradients, summary
from jaxrnn._src.losses import get_loss
from jaxrnn._src.model import RNN, loss_fn
from jaxrnn._src.stack import reverse_sequences

RTOL = 1e-10


def assert_close(actual, expected, rtol):
    """``assert_trees_rel_close``, after checking that every value is finite (it skips NaNs)."""
    for leaf in jax.tree.leaves((actual, expected)):
        assert np.all(np.isfinite(np.asarray(leaf))), "non-finite values"
    assert_trees_rel_close(actual, expected, rtol)


T, B, D, H, O = 4, 3, 3, 3, 2


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


def per_sequence(cell):
    """``cell``, with weights given per sequence: every leaf of its params has a leading B."""

    class PerSequence(type(cell)):
        def recurrent_preactivation(self, params, h_prev):
            gh = jnp.einsum("bh,bgh->bg", h_prev, params.w_hh)  # each sequence its own W_hh
            if params.b_hh is not None and not self.fold_recurrent_bias:
                gh = gh + params.b_hh
            return gh

    return PerSequence(**{f.name: getattr(cell, f.name) for f in dataclasses.fields(cell)})


def oracle_step(cell, p, e_w, carry, x, e_h, m):
    """One perturbed step for the whole batch, each sequence with its own weights.

    Args:
        cell: the cell.
        p: the layer's weights, e_w: their per-sequence perturbations (leaves (B, ...)).
        carry: tuple of (B, H); x: (B, D_l); e_h: (B, H), added to h_t; m: (B,) or None.

    Returns:
        ``(carry, h_t)``, ``h_t`` zero past the length.
    """
    p = jax.tree.map(lambda w, e: w[None] + e, p, e_w)  # each sequence its own weights
    xp = jnp.einsum("bd,bgd->bg", x, p.w_ih)  # W_ih x_t, per sequence
    if p.b_ih is not None:
        xp = xp + p.b_ih
    if p.b_hh is not None and cell.fold_recurrent_bias:
        xp = xp + p.b_hh
    new, _ = per_sequence(cell).step(p, carry, xp)
    if m is not None:  # frozen past the length
        new = tuple(jnp.where(m[:, None], a, b) for a, b in zip(new, carry))
    carry = (new[0] + e_h,) + tuple(new[1:])  # h_t + e_t, seen by all later steps
    return carry, (carry[0] if m is None else jnp.where(m[:, None], carry[0], 0))


def perturbed_loss(model, loss, params, xs, targets, state, lengths, pert, dropout_key=None):
    """The model's loss, recomputed step by step (a Python loop) with the perturbations added."""
    eps_h, eps_x, eps_w = pert
    cell = model.cell_fn
    nd = model.num_directions
    mask = None if lengths is None else jnp.arange(T)[:, None] < lengths[None, :]
    carries0 = model.initial_carries(state, B, xs.dtype)
    h = xs
    for l in range(model.num_layers):
        h = h + eps_x[l]
        outs = []
        for d in range(nd):
            x_in = _rev(h, d, lengths)  # scan order
            e_h = _rev(eps_h[l][d], d, lengths)
            e_w = jax.tree.map(lambda e: _rev(e, d, lengths), eps_w[l][d])
            carry = carries0[l * nd + d]
            hs = []
            for s in range(T):
                carry, out = oracle_step(cell, params.layers[l][d],
                                         jax.tree.map(lambda e: e[s], e_w), carry, x_in[s],
                                         e_h[s], None if mask is None else mask[s])
                hs.append(out)
            outs.append(_rev(jnp.stack(hs), d, lengths))  # original order
        h = outs[0] if nd == 1 else jnp.concatenate(outs, axis=-1)
        if dropout_key is not None and l < model.num_layers - 1:
            keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, l), 1 - model.dropout,
                                        h.shape)
            h = jnp.where(keep, h / (1 - model.dropout), 0)
    ys = model.readout(params, h, mask)
    return get_loss(loss)(ys, targets, mask)


def oracle(model, loss, params, xs, targets, state, lengths, dropout_key=None):
    pert = zero_perturbations(model, params, xs)
    def f(params, pert):
        return perturbed_loss(model, loss, params, xs, targets, state, lengths, pert, dropout_key)
    value, (g_params, g_pert) = jax.value_and_grad(f, argnums=(0, 1))(params, pert)
    return value, g_params, g_pert


def random_params(model, rng, dtype=np.float64):
    """Parameters drawn with numpy (jax.random would compile for every new shape)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dtype))
    return jax.tree.map(lambda s: jnp.asarray(rng.uniform(-0.7, 0.7, s.shape), dtype), shapes)


def make_case(cell, num_layers, bidirectional, with_lengths, loss="half_sse", seed=0,
              dropout=0.0, bias=True):
    model = RNN(cell=cell, input_size=D, hidden_size=H, output_size=O, num_layers=num_layers,
                bidirectional=bidirectional, dropout=dropout, bias=bias)
    rng = np.random.default_rng(seed)
    params = random_params(model, rng)
    xs = jnp.asarray(rng.normal(size=(T, B, D)))
    if loss == "xent":
        targets = jnp.asarray(rng.integers(0, O, size=(T, B)))
    else:
        targets = jnp.asarray(rng.normal(size=(T, B, O)))
    lengths = jnp.array([T, 1, 3]) if with_lengths else None  # full, 1 and in between
    state = None
    if with_lengths:  # a given initial state too
        shape = (num_layers * model.num_directions, B, H)
        state = jnp.asarray(0.5 * rng.normal(size=shape))
        if cell == "lstm":
            state = (state, jnp.asarray(0.5 * rng.normal(size=shape)))
    return model, params, xs, targets, state, lengths


def norms(a):
    """``||a_t||`` over all axes but the first: (T, ...) -> (T,)."""
    return jnp.sqrt(jnp.sum(a * a, axis=tuple(range(1, a.ndim))))


def rel_close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    err = float(np.max(np.abs(actual - expected))) / scale
    assert err <= rtol, f"max relative error {err:.3e} > {rtol:.1e}"


def check_against_oracle(model, params, xs, targets, state, lengths, loss, dropout_key=None):
    """Every quantity of step_gradients and gradient_diagnostics against jax.grad, op by op."""
    with jax.disable_jit():
        value, g_params, (g_h, g_x, g_w) = oracle(model, loss, params, xs, targets, state,
                                                  lengths, dropout_key)
        sg = step_gradients(model, params, xs, targets, loss, state, lengths, dropout_key)
        dg = gradient_diagnostics(model, params, xs, targets, loss, state, lengths, dropout_key)
    np.testing.assert_allclose(sg.loss, value, rtol=1e-12)
    np.testing.assert_allclose(dg.loss, value, rtol=1e-12)
    assert_close(sg.grads, g_params, RTOL)  # the full gradient
    assert_close(dg.grads, g_params, RTOL)
    for l in range(model.num_layers):
        rel_close(sg.dx[l], g_x[l])  # dL/dx_t, elementwise
        rel_close(dg.dx_norm[l], norms(g_x[l]))
        for d in range(model.num_directions):
            assert float(jnp.abs(g_h[l][d]).max()) > 0  # not a comparison of zeros
            rel_close(sg.dh[l][d], g_h[l][d])  # the total dL/dh_t, elementwise
            rel_close(dg.dh_norm[l][d], norms(g_h[l][d]))
            # step t's weight-gradient term = grad wrt the step's own weights, summed over b
            per_step = jax.tree.map(lambda e: e.sum(axis=1), g_w[l][d])
            assert float(jnp.abs(per_step.w_hh).max()) > 0
            assert_close(sg.dparams[l][d], per_step, RTOL)
            rel_close(dg.dw_ih_norm[l][d], norms(per_step.w_ih))
            rel_close(dg.dw_hh_norm[l][d], norms(per_step.w_hh))
            # ... and the terms sum to the gradient
            summed = jax.tree.map(lambda a: a.sum(axis=0), sg.dparams[l][d])
            assert_close(summed, sg.grads.layers[l][d], RTOL)
    return g_h, sg, dg


# --- tests -------------------------------------------------------------------

# The cases that cover every pair of (cell, layers, directions, lengths): 7 instead
# of the 24 of the full product (or the 12 of a per-cell cover), every cell meeting
# every value of the other three; the two non-default losses sit on two of them.
OPTIONS = {"cell": ["elman", "lstm", "gru"], "num_layers": [1, 2],
           "bidirectional": [False, True], "with_lengths": [False, True]}
PAIRS = [tuple(case.values()) for case in all_pairs(OPTIONS)]
LOSSES = {("lstm", 1, False, True): "xent", ("elman", 1, True, True): "mse"}


def test_cases_cover_every_pair_and_both_losses():
    for (a, va), (b, vb) in itertools.combinations(OPTIONS.items(), 2):
        i, j = list(OPTIONS).index(a), list(OPTIONS).index(b)
        assert set(itertools.product(va, vb)) <= {(c[i], c[j]) for c in PAIRS}, (a, b)
    assert set(LOSSES) <= set(PAIRS)


@pytest.mark.parametrize("cell, num_layers, bidirectional, with_lengths", PAIRS,
                         ids=[f"{c}-{l}-{'bi' if b else 'uni'}-{'lengths' if w else 'full'}"
                              for c, l, b, w in PAIRS])
def test_per_step_quantities_equal_jax_grad(cell, num_layers, bidirectional, with_lengths):
    # the other two losses on two points of the grid (the loss only sets the top cotangent)
    loss = LOSSES.get((cell, num_layers, bidirectional, with_lengths), "half_sse")
    case = make_case(cell, num_layers, bidirectional, with_lengths, loss=loss,
                     seed=num_layers + 2 * bidirectional)
    model, _, _, _, _, lengths = case
    g_h, sg, dg = check_against_oracle(*case, loss)
    if with_lengths:  # nothing at or past a sequence's length
        past = np.arange(T)[:, None] >= np.asarray(lengths)[None, :]  # (T, B)
        for l in range(num_layers):
            assert np.all(np.asarray(sg.dx[l])[past] == 0)
            for d in range(model.num_directions):
                assert np.all(np.asarray(sg.dh[l][d])[past] == 0)
                assert np.all(np.asarray(g_h[l][d])[~past] != 0)  # ... and something before
    else:
        assert all(bool(jnp.all(n > 0)) for layer in dg.dh_norm for n in layer)


def test_without_bias():
    _, sg, _ = check_against_oracle(*make_case("gru", 2, False, True, seed=3, bias=False),
                                    "half_sse")
    assert sg.dparams[0][0].b_ih is None and sg.dparams[0][0].b_hh is None


def test_dropout_between_layers():
    case = make_case("elman", 2, False, False, seed=5, dropout=0.4)
    key = jax.random.key(11)
    _, sg, _ = check_against_oracle(*case, "half_sse", key)
    model, params, xs, targets, _, _ = case
    with jax.disable_jit():
        no_drop = step_gradients(model, params, xs, targets)
    assert not np.allclose(sg.dh[0][0], no_drop.dh[0][0])  # the key did drop units


def test_last_only_scores_the_last_step():
    model, params, xs, targets, _, _ = make_case("gru", 1, False, False, seed=2)
    with jax.disable_jit():
        sg = step_gradients(model, params, xs, targets, last_only=True)
        dg = gradient_diagnostics(model, params, xs, targets, last_only=True)
        value, g = jax.value_and_grad(loss_fn, argnums=3)(model, "half_sse", "autodiff", params,
                                                          xs, targets, None, None, None, True)
    np.testing.assert_allclose(dg.loss, value, rtol=1e-12)
    assert_close(dg.grads, g, RTOL)
    assert_close(sg.grads, g, RTOL)
    # only step T-1 is scored; every earlier dh is what flows back from it
    assert float(dg.dh_norm[0][0][-1]) > 0 and float(dg.dh_norm[0][0][0]) > 0


def test_jit_equals_op_by_op_and_loss_and_grad():
    # one layer, two directions, lengths and a state: the reversal under jit
    model, params, xs, targets, state, lengths = make_case("elman", 1, True, True, seed=1)
    args = (params, xs, targets, state, lengths)
    dg = jax.jit(lambda *a: gradient_diagnostics(model, *a[:3], "half_sse", *a[3:]))(*args)
    sg = step_gradients(model, *args[:3], "half_sse", *args[3:])  # jit-compiled inside
    with jax.disable_jit():
        dg_eager = gradient_diagnostics(model, *args[:3], "half_sse", *args[3:])
        sg_eager = step_gradients(model, *args[:3], "half_sse", *args[3:])
    assert isinstance(dg, Diagnostics)
    assert_close(dg, dg_eager, 1e-12)
    assert_close(sg, sg_eager, 1e-12)
    _, g = model.loss_and_grad(params, xs, targets, state=state, lengths=lengths)
    assert_close(dg.grads, g, RTOL)  # the gradient of method="bptt"


def test_float32():
    model, params, xs, targets, _, _ = make_case("elman", 1, False, False, seed=6)
    with jax.disable_jit():
        dg64 = gradient_diagnostics(model, params, xs, targets)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    dg32 = gradient_diagnostics(model, jax.tree.map(f32, params), f32(xs), f32(targets))
    assert dg32.dh_norm[0][0].dtype == jnp.float32 and dg32.dh_norm[0][0].shape == (T,)
    assert_close(jax.tree.map(lambda a: a.astype(jnp.float64), dg32), dg64, 1e-5)


@pytest.mark.parametrize("chunk_elements", [1, 7 * 3, 1 << 24])
def test_step_outer_norms_in_chunks(monkeypatch, chunk_elements):
    # chunks of 1 step, of 3 steps with a remainder (T=7, G*D=7), and all at once
    monkeypatch.setattr(diag_lib, "_CHUNK_ELEMENTS", chunk_elements)
    rng = np.random.default_rng(0)
    a, b = jnp.asarray(rng.normal(size=(7, 4, 7))), jnp.asarray(rng.normal(size=(7, 4, 1)))
    got = diag_lib._step_outer_norms(a, b)
    want = np.linalg.norm(np.einsum("tbg,tbd->tgd", a, b), axis=(1, 2))
    np.testing.assert_allclose(got, want, rtol=1e-13)


def test_summary():
    model, params, xs, targets, _, _ = make_case("elman", 2, True, False, seed=4)
    with jax.disable_jit():
        dg = gradient_diagnostics(model, params, xs, targets)
        dg_short = gradient_diagnostics(model, params, xs, targets, lengths=jnp.array([2, 3, 1]))
    s = summary(dg)
    assert sorted(s) == sorted(f"dh_{k}_l{l}{r}" for k in ("first", "last", "ratio")
                               for l in (0, 1) for r in ("", "_reverse"))
    assert float(s["dh_first_l1_reverse"]) == float(dg.dh_norm[1][1][0])
    assert float(s["dh_last_l0"]) == float(dg.dh_norm[0][0][-1])
    np.testing.assert_allclose(float(s["dh_ratio_l0"]),
                               float(dg.dh_norm[0][0][0] / dg.dh_norm[0][0][-1]), rtol=1e-14)
    assert all(math.isfinite(float(v)) for v in s.values())
    sj = jax.jit(summary)(dg)  # usable inside a jit-compiled train step
    assert float(sj["dh_ratio_l0"]) == float(s["dh_ratio_l0"])
    # no sequence reaches step T-1: the ratio is undefined, reported as NaN
    assert float(dg_short.dh_norm[0][0][-1]) == 0.0
    assert math.isnan(float(summary(dg_short)["dh_ratio_l0"]))


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
    with pytest.raises(ValueError, match="lengths must lie in"):
        step_gradients(model, params, xs, targets, lengths=jnp.array([0, 1, 2]))
