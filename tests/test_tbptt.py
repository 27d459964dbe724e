"""Truncated BPTT(k1, k2): exact equality with full BPTT at k1 = k2 = T, and the truncation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_trees_rel_close
from jaxrnn import RNN, Batch, half_sse, make_train_step
from jaxrnn._src.train import make_tbptt_step, truncation_windows


def problem(cell="lstm", T=12, B=3, seed=0, dtype=jnp.float64, layers=2):
    model = RNN(cell=cell, input_size=2, hidden_size=5, output_size=1, num_layers=layers)
    k = jax.random.split(jax.random.key(seed), 3)
    xs = jax.random.normal(k[0], (T, B, 2), dtype)
    targets = jax.random.normal(k[1], (T, B, 1), dtype)
    return model, model.init(k[2], dtype), Batch(xs, targets)


def test_windows():
    assert truncation_windows(10, 10, 10) == [(0, 10, 0, 10)]
    assert truncation_windows(10, 4, 4) == [(0, 4, 0, 4), (4, 8, 4, 8), (8, 10, 8, 10)]
    # k2 = 6 > k1 = 4: each chunk looks 2 steps further back
    assert truncation_windows(10, 4, 6) == [(0, 2, 0, 4), (2, 6, 4, 8), (6, 8, 8, 10)]


@pytest.mark.parametrize("cell", ["elman", "lstm", "gru"])
@pytest.mark.parametrize("method, loss", [("bptt", "half_sse"), ("autodiff", "mse")])
def test_k1_equals_k2_equals_T_is_full_bptt(cell, method, loss):
    model, params, batch = problem(cell)
    opt = optax.adam(1e-2)
    full = make_train_step(model, opt, loss=loss, method=method, donate=False)
    trunc = make_tbptt_step(model, opt, k1=12, k2=12, loss=loss, method=method, donate=False)
    p1, s1 = params, opt.init(params)
    p2, s2 = params, opt.init(params)
    for _ in range(3):
        p1, s1, m1 = full(p1, s1, batch)
        p2, s2, m2 = trunc(p2, s2, batch)
        assert m2["updates"] == 1
        assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-14)
    assert_trees_rel_close(p2, p1, 1e-13)


# each window shape once, the methods alternating (both methods' gradients are equal:
# test_k1_equals_k2_equals_T_is_full_bptt and tests/test_scan.py)
@pytest.mark.parametrize("k1, k2, method", [(3, 3, "bptt"), (3, 5, "autodiff"), (4, 7, "bptt")])
def test_second_update_matches_a_reference(k1, k2, method):
    """Chunk 2's update: gradient of its k1 losses through k2 steps, from the carried state.

    The reference uses only the public API: the carried state is the final state
    of running the *old* parameters up to the window start, and the window is run
    in one piece from there.
    """
    model, params, batch = problem("gru", T=2 * k1, layers=1)
    sgd = optax.sgd(0.5)
    step = make_tbptt_step(model, sgd, k1=k1, k2=k2, method=method, donate=False)
    got, _, m = step(params, sgd.init(params), batch)
    assert m["updates"] == 2

    xs, ts = batch.xs, batch.targets
    (_, _, s0, e0), (ws1, _, s1, e1) = truncation_windows(2 * k1, k1, k2)

    def chunk_loss(p, state, lo, s, e):
        ys, _ = model.apply(p, xs[lo:e], state)
        return half_sse(ys[s - lo:], ts[s:e])

    grad = jax.jit(jax.grad(chunk_loss), static_argnums=(2, 3, 4))  # one program, not eager
    p1 = jax.tree.map(lambda p, g: p - 0.5 * g, params, grad(params, None, 0, s0, e0))
    state = None if ws1 == 0 else model.apply(params, xs[:ws1])[1]  # old params' forward
    p2 = jax.tree.map(lambda p, g: p - 0.5 * g, p1, grad(p1, state, ws1, s1, e1))
    assert_trees_rel_close(got, p2, 1e-12)


def test_tbptt_errors():
    model, params, batch = problem()
    opt = optax.sgd(0.1)
    with pytest.raises(ValueError, match="k1 must be an integer >= 1"):
        make_tbptt_step(model, opt, k1=0)
    with pytest.raises(ValueError, match="k2 must be an integer >= k1 = 5"):
        make_tbptt_step(model, opt, k1=5, k2=3)
    step = make_tbptt_step(model, opt, k1=4)
    with pytest.raises(ValueError, match="lengths must be None"):
        step(params, opt.init(params), Batch(batch.xs, batch.targets, jnp.full((3,), 12)))
