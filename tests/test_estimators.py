"""Exact RTRL on every cell is BPTT, offline and online; online training carries the past exactly.

float64 throughout. The approximations' own proofs are in test_estimators_local.py
(SnAp, e-prop, RFLO) and test_estimators_unbiased.py (UORO, KF-RTRL).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_trees_rel_close
import jaxrnn
from jaxrnn import Batch, make_online_step, make_train_step
from jaxrnn._src.model import loss_fn
from jaxrnn._src.names import CellName

RTOL = 1e-10


def case(cell, *, T=5, B=2, D=2, H=3, O=2, layers=2, seed=0, lengths=True):
    model = jaxrnn.RNN(cell=cell, input_size=D, hidden_size=H, output_size=O, num_layers=layers)
    params = model.init(jax.random.key(seed), jnp.float64)
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.normal(size=(T, B, D)))
    targets = jnp.asarray(rng.normal(size=(T, B, O)))
    lens = jnp.asarray(rng.integers(1, T + 1, size=B)).at[0].set(T) if lengths else None
    return model, params, xs, targets, lens


@pytest.mark.parametrize("cell", ["elman", "lstm", "gru", "indrnn", "peephole_lstm",
                                  "layernorm_lstm", "leaky"])
def test_rtrl_is_bptt_for_every_cell_with_layers_and_lengths(cell: CellName):
    """method='rtrl' (the cells' tangent steps, forward in time) equals the reverse scan."""
    model, params, xs, targets, lengths = case(cell)
    loss_r, g_r = model.loss_and_grad(params, xs, targets, "mse", "rtrl", lengths=lengths)
    loss_b, g_b = model.loss_and_grad(params, xs, targets, "mse", "bptt", lengths=lengths)
    np.testing.assert_allclose(loss_r, loss_b, rtol=1e-13)
    assert_trees_rel_close(g_r, g_b, RTOL)


def test_a_users_cell_runs_rtrl_from_jvp_of_its_step():
    """A cell without a tangent_step: RTRL from jax.jvp of its step, still exact."""
    from conftest import LeakyElman

    model, params, xs, targets, lengths = case(LeakyElman(), layers=1)
    assert "tangent_step" not in vars(LeakyElman)
    g_r = model.loss_and_grad(params, xs, targets, "half_sse", "rtrl", lengths=lengths)[1]
    g_b = model.loss_and_grad(params, xs, targets, "half_sse", "bptt", lengths=lengths)[1]
    assert_trees_rel_close(g_r, g_b, RTOL)


def test_online_rtrl_waiting_to_the_end_of_the_sequence_is_one_bptt_update():
    model, params, xs, targets, _ = case("lstm", T=7)
    sgd = optax.sgd(1.0)
    online = make_online_step(model, sgd, "rtrl", every=7, loss="mse", donate=False)
    p_on, _, state, metrics = online.step(params, sgd.init(params), online.init(params, 2),
                                          Batch(xs, targets))
    p_bp, _, m_bp = make_train_step(model, sgd, "mse", "bptt", donate=False)(
        params, sgd.init(params), Batch(xs, targets))
    assert int(metrics["updates"]) == 1 and int(state.step) == 7
    np.testing.assert_allclose(metrics["loss"], m_bp["loss"], rtol=1e-13)
    # params - grads: the gradients compared through one unit step
    delta = lambda p: jax.tree.map(jnp.subtract, params, p)  # noqa: E731
    assert_trees_rel_close(delta(p_on), delta(p_bp), RTOL)


def keep_last_gradient() -> optax.GradientTransformation:
    """An optimizer that changes nothing and keeps the last gradient in its state."""
    return optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p),
        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


@pytest.mark.parametrize("every", [3])
def test_online_rtrl_reads_each_chunk_through_the_whole_past(every):
    """With the parameters held, chunk c's online gradient is the exact gradient of
    chunk c's loss through every step before it (the state and sensitivities carried
    across chunks and across two calls of the step), not a truncated one."""
    model, params, xs, targets, _ = case("gru", T=8, layers=1, lengths=False)
    opt = keep_last_gradient()
    online = make_online_step(model, opt, "rtrl", every=every, loss="mse", donate=False)
    state = online.init(params, 2)
    _, _, state, _ = online.step(params, opt.init(params), state, Batch(xs[:4], targets[:4]))
    _, last, state, _ = online.step(params, opt.init(params), state, Batch(xs[4:], targets[4:]))
    start = 8 - (4 % every or every)  # the last chunk of the second call: [start, 8)

    def chunk_loss(p):
        ys, _ = model.apply(p, xs, method="autodiff")
        return optax.l2_loss(ys[start:], targets[start:]).mean() * 2  # mse of the chunk

    assert int(state.step) == 8
    assert_trees_rel_close(last, jax.grad(chunk_loss)(params), RTOL)
    assert_trees_rel_close(state.state, model.apply(params, xs)[1], 1e-13)


def lag_one_stream(T=200):
    """A learnable stream: the target is the input one step back."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 2, size=(T, 1, 1)).astype(np.float64))
    return x, jnp.concatenate([jnp.zeros((1, 1, 1)), x[:-1]])


def train_online(method, key, parts=4):
    model = jaxrnn.RNN(cell="elman", input_size=1, hidden_size=4, output_size=1)
    params = model.init(jax.random.key(0), jnp.float64)
    x, y = lag_one_stream()
    opt = optax.adam(0.05)
    online = make_online_step(model, opt, method, every=1, loss="mse", donate=False)
    opt_state, state = opt.init(params), online.init(params, 1, key)
    losses, n = [], x.shape[0] // parts
    for part in range(parts):  # the stream in parts: the online state carried between calls
        s = slice(n * part, n * (part + 1))
        params, opt_state, state, m = online.step(params, opt_state, state, Batch(x[s], y[s]),
                                                  key)
        assert int(m["updates"]) == n
        losses.append(float(m["loss"]))
    return losses, params


@pytest.mark.parametrize("method", ["rtrl", "eprop"])
def test_online_training_learns_a_lag(method):
    losses, _ = train_online(method, None)
    assert losses[-1] < 0.5 * losses[0], losses


def test_a_stochastic_estimator_online_is_its_keys():
    (a, pa), (b, pb), (c, pc) = (train_online("uoro", jax.random.key(k), 2) for k in (1, 1, 2))
    assert np.isfinite(a).all() and a == b and a != c
    assert_trees_rel_close(pa, pb, 0.0)


def test_online_refusals():
    model, params, xs, targets, lengths = case("lstm", layers=1)
    sgd = optax.sgd(0.1)
    both = jaxrnn.RNN(cell="elman", input_size=2, hidden_size=3, output_size=2,
                      bidirectional=True)
    with pytest.raises(ValueError, match="method='rtrl' runs forward in time: bidirectional"):
        make_online_step(both, sgd, "rtrl")
    with pytest.raises(ValueError, match="method='kf_rtrl'"):
        make_online_step(model, sgd, "kf_rtrl")
    with pytest.raises(ValueError, match="every must be"):
        make_online_step(model, sgd, "rtrl", every=0)
    with pytest.raises(ValueError, match="method must be one of"):
        make_online_step(model, sgd, "bpt")
    online = make_online_step(model, sgd, "uoro", loss="mse")
    state = online.init(params, 2, jax.random.key(0))
    with pytest.raises(ValueError, match="method='uoro' draws random numbers: pass its PRNG key"):
        online.step(params, sgd.init(params), state, Batch(xs, targets))
    with pytest.raises(ValueError, match="batch.lengths must be None"):
        online.step(params, sgd.init(params), state, Batch(xs, targets, lengths),
                    jax.random.key(0))
    with pytest.raises(ValueError, match="method='rtrl' is too large"):
        big = jaxrnn.RNN(cell="lstm", input_size=2, hidden_size=256, output_size=1)
        make_online_step(big, sgd, "rtrl").init(jax.eval_shape(big.init, jax.random.key(0)), 1)


def test_alignment_from_a_given_state():
    """The measures start where a stream has brought the network: RTRL from that state is
    exact against BPTT from it, and an approximation's alignment depends on it."""
    model, params, xs, targets, _ = case("lstm", layers=1, lengths=False)
    state = model.apply(params, 2 * xs)[1]  # where another window left the network
    E, key = jaxrnn.estimators, jax.random.key(0)
    exact = E.estimator_alignment(model, params, xs, targets, "rtrl", "mse", key=key,
                                  state=state)
    np.testing.assert_allclose(exact.draws.cosine, 1.0, atol=1e-12)
    np.testing.assert_allclose(exact.draws.rel_error, 0.0, atol=1e-10)
    steps = E.step_alignment(model, params, xs, targets, "snap1", "mse", state=state)
    fresh = E.step_alignment(model, params, xs, targets, "snap1", "mse")
    assert steps.cosine.shape == (xs.shape[0],) and np.all(np.abs(steps.cosine) <= 1 + 1e-12)
    assert np.max(np.abs(steps.cosine - fresh.cosine)) > 1e-6
