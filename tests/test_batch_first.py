"""batch_first=True: every call that takes sequences reads and returns (B, T, ...).

The scans stay time-major; the arrays are transposed at the boundary. So on
transposed data each entry point must give the time-major model's numbers exactly,
and arrays laid out the other way must raise, naming the argument and batch_first,
wherever the sizes show it.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxrnn
from conftest import assert_trees_rel_close
from jaxrnn import RNN

T, B, D, O = 5, 3, 2, 2
BPTT_RTOL = 1e-10


def _tb(a):
    return jnp.swapaxes(a, 0, 1)


def assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype
        assert np.array_equal(np.asarray(x), np.asarray(y)), float(np.max(np.abs(x - y)))


@pytest.fixture(scope="module")
def setup():
    tm = RNN(cell="lstm", input_size=D, hidden_size=4, output_size=O, bidirectional=True)
    bf = dataclasses.replace(tm, batch_first=True)
    k = jax.random.split(jax.random.key(3), 4)
    params = tm.init(k[0], jnp.float64)
    xs = jax.random.normal(k[1], (T, B, D), jnp.float64)
    targets = jax.random.normal(k[2], (T, B, O), jnp.float64)
    classes = jax.random.randint(k[3], (T, B), 0, O)
    return tm, bf, params, xs, targets, classes, jnp.array([5, 2, 4])


def test_apply_features_and_losses_equal_time_major_exactly(setup):
    tm, bf, params, xs, targets, classes, lengths = setup
    def calls(model, xs, targets):  # compiled: one program per layout
        return (model.apply(params, xs, lengths=lengths),
                model.features(params, xs, lengths=lengths)[0],
                model.loss(params, xs, targets, lengths=lengths))

    (ys, st), hs, loss = jax.jit(calls, static_argnums=0)(tm, xs, targets)
    (ys_b, st_b), hs_b, loss_b = jax.jit(calls, static_argnums=0)(bf, _tb(xs), _tb(targets))
    assert ys_b.shape == (B, T, O)
    assert_trees_equal((ys_b, st_b), (_tb(ys), st))  # the state stays (L*dirs, B, H)
    assert_trees_equal((hs_b, loss_b), (_tb(hs), loss))
    # (B, T) classes; (B, T, O) floats go through the train steps below
    assert_trees_equal(bf.loss_and_grad(params, _tb(xs), _tb(classes), loss="xent",
                                        lengths=lengths),
                       tm.loss_and_grad(params, xs, classes, loss="xent", lengths=lengths))


def test_bptt_gradient_equals_autodiff_batch_first(setup):
    _, bf, params, xs, _, _, lengths = setup

    def user_loss(p, method):
        ys, (h, c) = bf.apply(p, _tb(xs), lengths=lengths, method=method)
        return jnp.sum(jnp.sin(ys) * jnp.arange(T)[:, None]) + jnp.sum(c ** 2)

    grad = jax.jit(jax.grad(user_loss), static_argnums=1)
    assert_trees_rel_close(grad(params, "bptt"), grad(params, "autodiff"), BPTT_RTOL)


def test_rtrl_and_step_gradients_equal_time_major(setup):
    tm, bf, params, xs, targets, _, lengths = setup
    elman = RNN(cell="elman", input_size=D, hidden_size=4, output_size=O)
    p1 = elman.init(jax.random.key(0), jnp.float64)
    e_bf = dataclasses.replace(elman, batch_first=True)
    assert_trees_equal(e_bf.loss_and_grad(p1, _tb(xs), _tb(targets), method="rtrl"),
                       elman.loss_and_grad(p1, xs, targets, method="rtrl"))
    # (gradient_diagnostics: through make_train_step(diagnostics=True) below; its norms
    # are (T,), without a batch axis)
    s = jaxrnn.step_gradients(tm, params, xs, targets)
    s_b = jaxrnn.step_gradients(bf, params, _tb(xs), _tb(targets))
    # dh and dx come back in the caller's layout; the per-step weight terms keep T first
    assert_trees_equal(s_b, s._replace(dh=jax.tree.map(_tb, s.dh), dx=jax.tree.map(_tb, s.dx)))


@pytest.mark.parametrize("kind", ["train", "diagnostics", "tbptt"])
def test_train_steps_give_the_time_major_params(setup, kind):
    _, _, _, xs, targets, _, lengths = setup
    tm = RNN(cell="gru", input_size=D, hidden_size=4, output_size=O)
    bf = dataclasses.replace(tm, batch_first=True)
    params = tm.init(jax.random.key(1), jnp.float64)
    opt = optax.adam(1e-2)
    if kind == "tbptt":  # two chunks of 2 steps (one shape: one compilation)
        make = lambda m: jaxrnn.make_tbptt_step(m, opt, 2, donate=False)  # noqa: E731
        xs, targets, lengths = xs[:4], targets[:4], None
    else:
        make = lambda m: jaxrnn.make_train_step(m, opt, donate=False,  # noqa: E731
                                                diagnostics=kind == "diagnostics")
    state = opt.init(params)
    out = make(tm)(params, state, jaxrnn.Batch(xs, targets, lengths))
    out_b = make(bf)(params, state, jaxrnn.Batch(_tb(xs), _tb(targets), lengths))
    assert_trees_equal(out_b, out)


def test_arrays_laid_out_the_other_way_raise_naming_the_argument(setup):
    tm, bf, params, xs, targets, classes, _ = setup
    hint = "batch-first .* build the RNN with batch_first=True"
    with pytest.raises(ValueError, match=rf"lengths must have shape \(B,\) = \(5,\).*{hint}"):
        tm.apply(params, _tb(xs), lengths=jnp.array([5, 2, 4]))  # xs read as T=3, B=5
    with pytest.raises(ValueError, match=rf"targets must have shape \(T, B, output_size\).*{hint}"):
        tm.loss_and_grad(params, xs, _tb(targets))
    with pytest.raises(ValueError, match=rf"targets for loss='xent' .*{hint}"):
        tm.loss(params, xs, _tb(classes), loss="xent")
    state = tuple(jnp.zeros((2, T, 4)) for _ in range(2))  # B and T swapped
    with pytest.raises(ValueError, match=rf"state\[0\] must have shape .*{hint}"):
        tm.apply(params, xs, state=state)
    with pytest.raises(ValueError, match=r"targets must have shape \(B, T, output_size\) = "
                                         r"\(3, 5, 2\).*time-major .* batch_first=False"):
        jaxrnn.make_train_step(bf, optax.sgd(0.1))(params, optax.sgd(0.1).init(params),
                                                   jaxrnn.Batch(_tb(xs), targets))
    with pytest.raises(ValueError, match=r"xs must have shape \(B, T, input_size=2\) "
                                         r"\(batch-first, batch_first=True\)"):
        bf.apply(params, xs[0])
    with pytest.raises(ValueError, match="batch_first must be True or False"):
        dataclasses.replace(tm, batch_first="yes")
