"""The leaky RNN cell (Marschall, Cho & Savin 2020): ``jaxrnn.Leaky``, ``cell="leaky"``.

* ``check_cell`` passes its backward and tangent steps (tanh and relu, two leaks);
* ``method="bptt"`` equals ``"autodiff"`` in float64 (two layers, lengths, a state);
* ``alpha=1`` is the Elman cell, exactly; an independent numpy loop of
  ``h_t = (1 - alpha) h_{t-1} + alpha phi(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``
  gives ``apply``'s outputs;
* bad options raise a ValueError naming the field.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_rel_close
from jaxrnn import RNN, Elman, Leaky, check_cell, make_cell

D, H, O, T, B = 3, 4, 2, 6, 3


@pytest.mark.parametrize("nonlinearity, alpha", [("tanh", 0.5), ("relu", 0.2)])
def test_check_cell_passes(nonlinearity, alpha):
    report = check_cell(Leaky(nonlinearity, alpha=alpha))
    assert report.ok and report.max_rel_error <= 1e-10, str(report)
    outputs = {r.output for r in report.rows}
    assert {"dgi", "dcarry_prev[0]", "w_hh", "tangent dcarry[0]"} <= outputs


def test_bptt_equals_autodiff_with_lengths_and_two_layers():
    model = RNN(cell="leaky", nonlinearity="relu", input_size=D, hidden_size=H,
                output_size=O, num_layers=2)
    assert model.cell_fn == Leaky("relu", alpha=0.5)
    k = jax.random.split(jax.random.key(0), 4)
    params = model.init(k[0], jnp.float64)
    xs = jax.random.normal(k[1], (T, B, D), jnp.float64)
    targets = jax.random.normal(k[2], (T, B, O), jnp.float64)
    state = 0.5 * jax.random.normal(k[3], (2, B, H), jnp.float64)
    lengths = jnp.array([T, 2, 5])

    def grads(method):
        def loss(p, x, s):
            return model.loss(p, x, targets, method=method, state=s, lengths=lengths)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(params, xs, state)

    got, want = jax.jit(lambda: (grads("bptt"), grads("autodiff")))()  # one compile
    assert_trees_rel_close(got[0], want[0], 1e-13)
    assert_trees_rel_close(got[1], want[1], 1e-12)
    assert float(jnp.max(jnp.abs(got[1][0].layers[0][0].w_hh))) > 0  # a gradient, not zeros


def test_alpha_one_is_the_elman_cell():
    kw = dict(input_size=D, hidden_size=H, output_size=O, num_layers=2)
    leaky, elman = RNN(cell=Leaky(alpha=1.0), **kw), RNN(cell=Elman(), **kw)
    params = elman.init(jax.random.key(1), jnp.float64)
    xs = jax.random.normal(jax.random.key(2), (T, B, D), jnp.float64)
    ys, state = jax.jit(leaky.apply)(params, xs)
    ys_e, state_e = jax.jit(elman.apply)(params, xs)
    np.testing.assert_array_equal(ys, ys_e)
    np.testing.assert_array_equal(state, state_e)


@pytest.mark.parametrize("nonlinearity, alpha", [("tanh", 0.3), ("relu", 0.7)])
def test_apply_equals_a_numpy_loop(nonlinearity, alpha):
    model = RNN(cell=Leaky(nonlinearity, alpha=alpha), input_size=D, hidden_size=H,
                output_size=O)
    params = model.init(jax.random.key(3), jnp.float64)
    xs = jax.random.normal(jax.random.key(4), (T, B, D), jnp.float64)
    h0 = 0.5 * jax.random.normal(jax.random.key(5), (1, B, H), jnp.float64)
    ys, h_T = jax.jit(model.apply)(params, xs, h0)

    p, r = jax.tree.map(np.asarray, params.layers[0][0]), params.readout
    phi = np.tanh if nonlinearity == "tanh" else (lambda a: np.maximum(a, 0.0))
    h, want = np.asarray(h0[0]), []
    for x in np.asarray(xs):
        a = x @ p.w_ih.T + p.b_ih + h @ p.w_hh.T + p.b_hh
        h = (1 - alpha) * h + alpha * phi(a)
        want.append(h @ np.asarray(r.weight).T + np.asarray(r.bias))
    np.testing.assert_allclose(ys, np.stack(want), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(h_T[0], h, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("alpha", [0, 0.0, 1.5, -0.1, True, float("nan"), "0.5", None])
def test_bad_alpha_raises(alpha):
    with pytest.raises(ValueError, match="alpha must be a real number in \\(0, 1\\]"):
        Leaky(alpha=alpha)


def test_options():
    assert Leaky(alpha=1) == Leaky(alpha=1.0) and isinstance(Leaky(alpha=1).alpha, float)
    assert make_cell("leaky", "relu") == Leaky("relu")
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu'"):
        Leaky("sigmoid")
    with pytest.raises(ValueError, match=r"options of the built-in cells; a Cell instance \(Leaky"):
        RNN(cell=Leaky(alpha=0.2), nonlinearity="relu", input_size=D, hidden_size=H,
            output_size=O)
    model = RNN(cell="leaky", input_size=D, hidden_size=H, output_size=O)
    with pytest.raises(ValueError, match="cell='leaky' has no PyTorch counterpart"):
        model.torch_names()  # to_torch and from_torch make the same check first


def test_tangent_step_reads_w_hh_only_through_recurrent_tangent():
    # online estimators drop the recurrent term by overriding recurrent_tangent; the
    # leak's direct path and phi'(a_t) (from the stored residual) must remain
    class NoRecurrence(Leaky):
        def recurrent_tangent(self, params, h_prev, dparams, dh_prev):
            return jnp.zeros_like(h_prev)

    cell, alpha = NoRecurrence("tanh", alpha=0.3), 0.3
    k = jax.random.split(jax.random.key(6), 5)
    params = cell.init(k[0], D, H, True, jnp.float64)
    h_prev, dh_prev = (jax.random.normal(kk, (B, H), jnp.float64) for kk in k[1:3])
    xp, dxp = (jax.random.normal(kk, (B, H), jnp.float64) for kk in k[3:5])
    carry, u = cell.step(params, (h_prev,), xp)
    (dh,) = cell.tangent_step(params, (h_prev,), xp, carry, u,
                              jax.tree.map(jnp.ones_like, params), (dh_prev,), dxp)
    want = (1 - alpha) * dh_prev + alpha * (1 - u * u) * dxp
    np.testing.assert_allclose(dh, want, rtol=1e-14, atol=1e-15)
