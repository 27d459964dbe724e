"""The unit-local estimators (SnAp-n, e-prop, RFLO) against independent computations, float64.

* SnAp-1 is exact RTRL on a one-layer IndRNN (its recurrence is diagonal), lengths
  included; on Elman, LSTM and GRU it differs from the exact gradient and equals a
  dense RTRL written here with ``jax.jacfwd`` of the cell's ``step``, its sensitivity
  masked to SnAp-1's pattern after every step.
* SnAp-2 is RTRL for a dense ``w_hh``; with a sparse one it differs from RTRL and from
  SnAp-1 and equals the dense computation masked to two steps of the graph; SnAp-n
  with n >= H is RTRL again.
* RFLO and e-prop equal the published trace formula, a numpy loop over t, for a
  leaky cell (alpha 0.3) and for Elman; e-prop on a gated cell equals the dense
  computation with ``W_hh`` cut from the Jacobian.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from conftest import assert_trees_rel_close, tree_max_rel_error
from jaxrnn._src.cells import (GRU, LSTM, Elman, IndRNN, LayerNormLSTM, Leaky, ProjectedLSTM)
from jaxrnn._src.estimators import RTRL
from jaxrnn._src.estimators.local import RFLO, EProp, feedback_matrix
from jaxrnn._src.estimators.run import Readout, loss_and_grad
from jaxrnn._src.estimators.snap import SnAp
from jaxrnn._src.estimators.sparsity import apply_mask, fixed_sparsity, recurrent_mask

T, B, D, O = 6, 2, 2, 3


def problem(cell, H, seed=0):
    """One layer's parameters, a readout, inputs and mse targets, float64."""
    p = cell.init(jax.random.key(seed), D, H, True, jnp.float64)
    rng = np.random.default_rng(seed)
    readout = Readout(jnp.asarray(rng.normal(size=(O, H)) * 0.5), jnp.asarray(rng.normal(size=O)))
    xs = jnp.asarray(rng.normal(size=(T, B, D)))
    targets = jnp.asarray(rng.normal(size=(T, B, O)))
    return p, readout, xs, targets


@functools.partial(jax.jit, static_argnums=(0, 1))
def estimate(est, cell, p, readout, xs, targets, lengths=None, key=None):
    """The estimator's gradient of the mse loss from zero carries (``run.loss_and_grad``)."""
    carries0 = [cell.zero_carry(xs.shape[1], p.w_hh.shape[-1], xs.dtype)]
    return loss_and_grad(est, cell, (p,), readout, "mse", xs, targets, carries0, lengths,
                         key)[1][0]


def units_of(p, H):
    """The unit of every parameter entry, in ravel_pytree's order: row g*H + i -> unit i."""
    return np.concatenate([(np.indices(a.shape)[0] % H).ravel()
                           for a in jax.tree.leaves(p)])


@functools.partial(jax.jit, static_argnums=0)
def dense_reference(cell, p, readout, xs, targets, keep_units, cut=0.0):
    r"""sum_t dl_t/dh_t P_t, P_t = (J_t P_{t-1} + M_t) * keep, from jacfwd of ``cell.step``.

    ``keep_units (H, n)``: P's entry (unit i of any carry part, parameter j) is kept
    when ``keep_units[i, j]`` (all True: exact RTRL); ``cut = 1``: J_t without the path
    through the recurrent weights (e-prop), ``J_t - (ds_t/db_hh) W_hh`` on h_{t-1}
    (b_hh enters where ``W_hh h_{t-1}`` does).
    """
    flat, unravel = ravel_pytree(p)
    W, b = readout
    H, parts = W.shape[1], cell.carry_size
    keep = jnp.tile(keep_units, (parts, 1))  # (S, n): every carry part as its unit

    def step(theta, s, x):  # one example, the state flattened: s (S,)
        q = unravel(theta)
        xp = x @ q.w_ih.T + q.b_ih + (q.b_hh if cell.fold_recurrent_bias else 0)
        carry = tuple(s[k * H:(k + 1) * H][None] for k in range(parts))
        return jnp.concatenate(cell.step(q, carry, xp[None])[0], axis=-1)[0]

    def dl_dh(h, target):  # the loss's step term: sum_o (y - target)^2 / (T B O)
        return jax.grad(lambda h: jnp.sum((W @ h + b - target) ** 2) / (T * B * O))(h)

    def through_b_hh(b_hh, s, x):  # the step as a function of b_hh: ds_t/d(W_hh h_{t-1})
        return step(ravel_pytree(p._replace(b_hh=b_hh))[0], s, x)

    def one_example(xs, targets):
        def body(c, xt):
            s, P, g = c
            x, target = xt
            J = jax.jacfwd(step, argnums=1)(flat, s, x)  # (S, S)
            Jb = jax.jacfwd(through_b_hh)(p.b_hh, s, x)  # (S, G*H)
            J = J.at[:, :H].add(-cut * Jb @ p.w_hh)  # minus the path through W_hh h_{t-1}
            M = jax.jacfwd(step, argnums=0)(flat, s, x)  # (S, n)
            s = step(flat, s, x)
            P = (J @ P + M) * keep  # the masked sensitivity update
            return (s, P, g + dl_dh(s[:H], target) @ P[:H]), None
        S = parts * H
        c0 = (jnp.zeros(S), jnp.zeros((S, flat.size)), jnp.zeros(flat.size))
        return jax.lax.scan(body, c0, (xs, targets))[0][2]

    return unravel(jax.vmap(one_example, in_axes=1)(xs, targets).sum(0))


def test_snap1_is_exact_rtrl_on_indrnn_with_lengths():
    cell = IndRNN()
    p, readout, xs, targets = problem(cell, 4)
    lengths = jnp.array([6, 3])
    snap = estimate(SnAp(1), cell, p, readout, xs, targets, lengths)
    rtrl = estimate(RTRL(), cell, p, readout, xs, targets, lengths)
    assert_trees_rel_close(snap, rtrl, 1e-10)


def own_units(p, H):
    """SnAp-1's pattern (H, n): unit i keeps its sensitivity to its own parameters only."""
    return jnp.asarray(np.arange(H)[:, None] == units_of(p, H)[None, :])


@pytest.mark.parametrize("cell", [LSTM(), GRU()], ids=lambda c: c.name)
def test_snap1_is_dense_rtrl_masked_to_its_pattern(cell):
    # Elman's: in test_snap_n_on_dense_and_sparse_recurrent_weights
    H = 3
    p, readout, xs, targets = problem(cell, H)
    snap = estimate(SnAp(1), cell, p, readout, xs, targets)
    ref = dense_reference(cell, p, readout, xs, targets, own_units(p, H))
    exact = dense_reference(cell, p, readout, xs, targets, jnp.ones((H, units_of(p, H).size), bool))
    assert_trees_rel_close(snap, ref, 1e-10)
    assert tree_max_rel_error(snap, exact) > 1e-3  # an approximation: not RTRL's gradient


def test_snap_n_on_dense_and_sparse_recurrent_weights():
    cell, H = Elman(), 6
    p, readout, xs, targets = problem(cell, H)
    rtrl = estimate(RTRL(), cell, p, readout, xs, targets)
    # dense w_hh: two steps reach every unit, SnAp-2 is RTRL
    assert_trees_rel_close(estimate(SnAp(2), cell, p, readout, xs, targets), rtrl, 1e-10)
    # sparse w_hh (30% of the entries, the diagonal kept)
    masks = recurrent_mask(jax.random.key(2), (p,), 0.3)
    assert int(masks[0].w_hh.sum()) == round(0.3 * H * H)
    assert bool(jnp.all(jnp.diag(masks[0].w_hh)))
    (sp,) = apply_mask((p,), masks)
    rtrl = estimate(RTRL(), cell, sp, readout, xs, targets)
    snap1 = estimate(SnAp(1), cell, sp, readout, xs, targets)
    snap2 = estimate(SnAp(2), cell, sp, readout, xs, targets)
    A = (np.asarray(sp.w_hh) != 0) | np.eye(H, dtype=bool)  # A[i, u]: u feeds i in one step
    assert not A.all()
    units = units_of(sp, H)
    reference = functools.partial(dense_reference, cell, sp, readout, xs, targets)
    assert_trees_rel_close(reference(jnp.ones((H, units.size), bool)), rtrl, 1e-10)  # all kept
    assert_trees_rel_close(snap1, reference(own_units(sp, H)), 1e-10)
    assert tree_max_rel_error(snap1, rtrl) > 1e-3
    assert_trees_rel_close(snap2, reference(jnp.asarray(A[:, units])), 1e-10)
    assert tree_max_rel_error(snap2, rtrl) > 1e-3
    assert tree_max_rel_error(snap2, snap1) > 1e-3
    assert_trees_rel_close(estimate(SnAp(H), cell, sp, readout, xs, targets), rtrl, 1e-10)
    # the cost: dense P, as RTRL's, and the entries a sparse implementation keeps
    n, kept = sum(a.size for a in sp), int(A.sum(0)[units].sum())
    cost = SnAp(2).cost(cell, (sp,), B)
    assert cost.state == B * n * H and f"keeps B x {kept} entries" in cost.formula
    assert SnAp(1).cost(cell, (sp,), B).state == B * n  # (n/H) directions, S = H


def trace_rule(cell, alpha, p, readout, xs, targets, feedback):
    """Murray's RFLO / e-prop on a leaky (Elman: alpha = 1) cell, written out in numpy.

    B_t[i, j] = (1 - alpha) B_{t-1}[i, j] + alpha phi'(a_i) z_j, z = [x_t, h_{t-1}, 1];
    gradient sum_t (dy_t feedback)_i B_t[i, j], per example.
    """
    w_ih, w_hh, b_ih, b_hh = (np.asarray(a) for a in p)
    W, b = (np.asarray(a) for a in readout)
    xs, targets = np.asarray(xs), np.asarray(targets)
    H = w_hh.shape[0]
    h, trace, grad = np.zeros((B, H)), np.zeros((B, H, D + H + 1)), np.zeros((H, D + H + 1))
    for t in range(T):
        a = xs[t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh
        z = np.concatenate([xs[t], h, np.ones((B, 1))], axis=1)
        u = np.tanh(a)
        trace = (1 - alpha) * trace + alpha * (1 - u * u)[:, :, None] * z[:, None, :]
        h = (1 - alpha) * h + alpha * u
        dy = 2 * (h @ W.T + b - targets[t]) / (T * B * O)  # mse's dl_t/dy_t
        grad += np.einsum("bi,bij->ij", dy @ feedback, trace)
    return (grad[:, :D], grad[:, D:D + H], grad[:, -1], grad[:, -1])


@pytest.mark.parametrize("cell,alpha,est", [
    (Leaky(alpha=0.3), 0.3, RFLO()), (Leaky(alpha=0.3), 0.3, EProp()),
    (Elman(), 1.0, RFLO()), (Elman(), 1.0, EProp())], ids=["leaky-rflo", "leaky-eprop",
                                                             "elman-rflo", "elman-eprop"])
def test_rflo_and_eprop_are_the_published_trace_rule(cell, alpha, est):
    p, readout, xs, targets = problem(cell, 4)
    key = jax.random.key(5)
    got = estimate(est, cell, p, readout, xs, targets, None, key if est.stochastic else None)
    if est.feedback == "random":  # the driver's init key: the first half of split(key)
        fb = feedback_matrix(jax.random.key_data(jax.random.split(key)[0]), (O, 4), jnp.float64)
        assert est.stochastic and np.abs(np.asarray(fb)).max() <= 0.5
    else:
        fb = readout.weight
    want = trace_rule(cell, alpha, p, readout, xs, targets, np.asarray(fb))
    assert_trees_rel_close(tuple(got), want, 1e-12)


def test_eprop_on_gru_is_dense_rtrl_without_the_recurrent_weights():
    cell, H = GRU(), 3
    p, readout, xs, targets = problem(cell, H)
    got = estimate(EProp(), cell, p, readout, xs, targets)
    ref = dense_reference(cell, p, readout, xs, targets, own_units(p, H), 1.0)
    assert_trees_rel_close(got, ref, 1e-10)


def test_checks_refuse_with_one_line():
    class Mine(Elman):
        pass

    cases = [(SnAp(1), LayerNormLSTM(), 1, "couples the units"),
             (SnAp(2), ProjectedLSTM(proj_size=2), 1, "w_hr mixes"),
             (EProp(), Mine(), 1, "built-in cells"),
             (SnAp(1), Elman(), 2, "num_layers=2"),
             (RFLO(), LSTM(), 1, "method='rflo' is defined for the cells elman, leaky only")]
    for est, cell, layers, words in cases:
        with pytest.raises(ValueError, match=words) as e:
            est.check(cell, layers)
        assert "\n" not in str(e.value)
    SnAp(1).check(IndRNN(), 1)
    RFLO().check(Leaky(), 1)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        SnAp(0)
    with pytest.raises(ValueError, match="feedback must be one of"):
        EProp("sideways")
    with pytest.raises(ValueError, match="needs a key"):
        RFLO().init(Elman(), (None,), [None], None)  # refused before reading the layers
    assert not EProp().stochastic and RFLO().stochastic


def test_fixed_sparsity_keeps_the_zeros_through_training():
    p = LSTM().init(jax.random.key(0), D, 4, True, jnp.float64)

    @jax.jit
    def masked_adam_step(layers):  # one program: the eager ops cost more than they do here
        masks = recurrent_mask(jax.random.key(1), layers, 0.5)
        layers = apply_mask(layers, masks)
        opt = optax.chain(optax.adam(0.1), fixed_sparsity(masks))
        grads = jax.tree.map(jnp.ones_like, layers)
        updates, _ = opt.update(grads, opt.init(layers), layers)
        return masks, layers, optax.apply_updates(layers, updates)

    (masks,), (before,), (after,) = jax.tree.map(np.asarray, masked_adam_step((p,)))
    assert masks.w_ih.all() and masks.b_hh.all() and masks.w_hh.sum() == 32  # half of 16 x 4
    assert all(masks.w_hh[g * 4 + i, i] for g in range(4) for i in range(4))  # unit diagonal
    assert np.all(after.w_hh[~masks.w_hh] == 0) and np.all(after.w_ih != before.w_ih)
    assert np.all(after.w_hh[masks.w_hh] != before.w_hh[masks.w_hh])
    with pytest.raises(ValueError, match="density must be"):
        recurrent_mask(jax.random.key(1), (p,), 0.0)
