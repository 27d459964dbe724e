"""Real-time recurrent learning equals bptt and autodiff, and refuses what it cannot do.

In float64 at a relative error <= 1e-10: the loss, the parameter gradients and
the initial state's gradient of ``rtrl_loss_and_grad`` against
``model.loss_and_grad(method="bptt")`` and ``(method="autodiff")``, property-based
over shapes (T up to 50), tanh/relu, biases, lengths, initial states and all
three losses. Each example compiles the three methods in one ``jax.jit`` (the
public functions nest), which is also how a train step would call them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import assert_trees_rel_close
from jaxrnn._src.model import RNN, loss_fn
from jaxrnn._src.rtrl import MAX_SENSITIVITY_ELEMENTS, rtrl_loss_and_grad, sensitivity_size
from jaxrnn_app.tasks import reference_example

RTOL = 1e-10


def assert_close(actual, expected, rtol):
    """``assert_trees_rel_close``, after checking that every value is finite (it skips NaNs)."""
    for leaf in jax.tree.leaves((actual, expected)):
        assert np.all(np.isfinite(np.asarray(leaf))), "non-finite values"
    assert_trees_rel_close(actual, expected, rtol)


def random_case(seed, *, T, B, D, H, O, bias, readout_bias, nonlinearity, with_state,
                with_lengths, loss):
    """A model and data drawn with numpy (jax.random would compile for every new shape)."""
    model = RNN(cell="elman", input_size=D, hidden_size=H, output_size=O, bias=bias,
                readout_bias=readout_bias, nonlinearity=nonlinearity)
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.float64))
    params = jax.tree.map(lambda s: jnp.asarray(rng.uniform(-0.8, 0.8, s.shape)), shapes)
    xs = jnp.asarray(rng.normal(size=(T, B, D)))
    if loss == "xent":
        targets = jnp.asarray(rng.integers(0, O, size=(T, B)))
    else:
        targets = jnp.asarray(rng.normal(size=(T, B, O)))
    state = jnp.asarray(0.5 * rng.normal(size=(1, B, H))) if with_state else None
    lengths = jnp.asarray(rng.integers(1, T + 1, size=B)) if with_lengths else None
    return model, params, xs, targets, state, lengths


def three_methods(model, loss, params, xs, targets, state, lengths, last_only=False):
    """(rtrl, bptt, autodiff), each ``(loss, param grads, state grad)``, in one jit.

    bptt and autodiff are ``jax.value_and_grad`` of ``model.loss_fn``, which is what
    ``model.loss_and_grad`` computes, here also wrt the initial state.
    """
    def run(params, xs, targets, state, lengths):
        s = model.zero_state(xs.shape[1], xs.dtype) if state is None else state
        out = [rtrl_loss_and_grad(model, params, xs, targets, loss, s, lengths,
                                  last_only=last_only, state_grad=True)]
        for method in ("bptt", "autodiff"):
            value, (g, gs) = jax.value_and_grad(loss_fn, argnums=(3, 6))(
                model, loss, method, params, xs, targets, s, lengths, None, last_only)
            out.append((value, g, gs))
        return out
    return jax.jit(run)(params, xs, targets, state, lengths)


def assert_all_equal(results):
    rtrl, bptt, auto = results
    for other in (bptt, auto):
        np.testing.assert_allclose(rtrl[0], other[0], rtol=1e-12)  # the loss
        assert_close(rtrl[1], other[1], RTOL)  # the parameter gradients
        assert_close(rtrl[2], other[2], RTOL)  # the initial state's gradient
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(rtrl))


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.one_of(st.integers(1, 5), st.integers(6, 50)),
    B=st.integers(1, 3), D=st.integers(1, 4), H=st.integers(1, 5), O=st.integers(1, 3),
    bias=st.booleans(), readout_bias=st.booleans(),
    nonlinearity=st.sampled_from(["tanh", "relu"]), with_state=st.booleans(),
    with_lengths=st.booleans(), loss=st.sampled_from(["half_sse", "mse", "xent"]),
    seed=st.integers(0, 2**16),
)
# every loss with lengths and a state, whatever hypothesis draws
@example(T=50, B=3, D=2, H=5, O=3, bias=True, readout_bias=True, nonlinearity="tanh",
         with_state=True, with_lengths=True, loss="xent", seed=1)
@example(T=23, B=2, D=4, H=3, O=2, bias=False, readout_bias=True, nonlinearity="relu",
         with_state=True, with_lengths=True, loss="half_sse", seed=2)
def test_rtrl_equals_bptt_and_autodiff(T, B, D, H, O, bias, readout_bias, nonlinearity,
                                       with_state, with_lengths, loss, seed):
    model, params, xs, targets, state, lengths = random_case(
        seed, T=T, B=B, D=D, H=H, O=O, bias=bias, readout_bias=readout_bias,
        nonlinearity=nonlinearity, with_state=with_state, with_lengths=with_lengths, loss=loss)
    assert_all_equal(three_methods(model, loss, params, xs, targets, state, lengths))


def test_every_option_at_once():
    # lengths from 1 to T, an initial state, both biases, relu: the point hypothesis may miss
    model, params, xs, targets, state, _ = random_case(
        3, T=30, B=4, D=3, H=4, O=2, bias=True, readout_bias=True, nonlinearity="relu",
        with_state=True, with_lengths=False, loss="mse")
    lengths = jnp.array([30, 1, 17, 29])
    results = three_methods(model, "mse", params, xs, targets, state, lengths)
    assert_all_equal(results)
    # and the public entry point, model.loss_and_grad
    value, g = model.loss_and_grad(params, xs, targets, "mse", "bptt", state, lengths)
    np.testing.assert_allclose(results[0][0], value, rtol=1e-12)
    assert_close(results[0][1], g, RTOL)


def test_last_only():
    model, params, xs, targets, state, _ = random_case(
        5, T=12, B=3, D=2, H=3, O=2, bias=True, readout_bias=True, nonlinearity="tanh",
        with_state=True, with_lengths=False, loss="mse")
    results = three_methods(model, "mse", params, xs, targets, state, None, last_only=True)
    assert_all_equal(results)
    full, _ = rtrl_loss_and_grad(model, params, xs, targets, "mse", state)
    assert abs(float(full) - float(results[0][0])) > 1e-6  # it did score one step only


def test_reference_example():
    # the worked example of the README, number for number
    ex = reference_example(dtype=jnp.float64)
    loss, g, dh0 = rtrl_loss_and_grad(ex.model, ex.params, ex.batch.xs, ex.batch.targets,
                                      "half_sse", ex.h0, state_grad=True)
    np.testing.assert_allclose(float(loss), 0.1940, atol=5e-5)
    np.testing.assert_allclose(float(g.layers[0][0].w_ih[0, 0]), -0.48930, atol=5e-6)
    np.testing.assert_allclose(float(g.layers[0][0].w_hh[0, 0]), -0.11249, atol=5e-6)
    np.testing.assert_allclose(float(g.readout.weight[0, 0]), -0.72310, atol=5e-6)
    assert g.layers[0][0].b_ih is None and g.readout.bias is None
    assert dh0.shape == (1, 1, 1)


def small_case():
    """One configuration shared by the tests below, so that they share compilations."""
    return random_case(8, T=10, B=3, D=2, H=3, O=2, bias=True, readout_bias=False,
                       nonlinearity="tanh", with_state=True, with_lengths=False,
                       loss="half_sse")


def test_steps_past_a_length_change_nothing():
    # even NaN padding: past its length a sequence's state and sensitivities are frozen
    model, params, xs, targets, state, _ = small_case()
    lengths = jnp.array([10, 4, 1])
    past = (jnp.arange(10)[:, None] >= lengths[None, :])[:, :, None]
    a = rtrl_loss_and_grad(model, params, xs, targets, "half_sse", state, lengths,
                           state_grad=True)
    b = rtrl_loss_and_grad(model, params, jnp.where(past, jnp.nan, xs),
                           jnp.where(past, jnp.nan, targets), "half_sse", state, lengths,
                           state_grad=True)
    assert_close(b, a, 0.0)
    c = rtrl_loss_and_grad(model, params, jnp.where(past, 1e3, xs), targets, "half_sse", state,
                           None, state_grad=True)
    assert abs(float(c[0]) - float(a[0])) > 1e-3  # without lengths those steps do count


def test_float32_and_default_state():
    model, params, xs, targets, _, _ = small_case()
    zero = jnp.zeros((1, 3, 3))
    loss64, g64, _ = rtrl_loss_and_grad(model, params, xs, targets, state=zero, state_grad=True)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    loss32, g32 = rtrl_loss_and_grad(model, jax.tree.map(f32, params), f32(xs), f32(targets))
    assert loss32.dtype == jnp.float32 and g32.layers[0][0].w_hh.dtype == jnp.float32
    assert_close(jax.tree.map(lambda a: a.astype(jnp.float64), g32), g64, 1e-4)
    # state=None is the zero state
    loss0, g0 = rtrl_loss_and_grad(model, params, xs, targets, state=None)
    assert_close((loss0, g0), (loss64, g64), 1e-14)


def test_sensitivity_size():
    # B H (H D + H^2 + 2H) (b_ih and b_hh), plus B H^2 for the initial state
    assert sensitivity_size(2, 3, 4) == 2 * 4 * (4 * 3 + 16 + 8)
    assert sensitivity_size(2, 3, 4, bias=False) == 2 * 4 * (4 * 3 + 16)
    assert sensitivity_size(2, 3, 4, state_grad=True) == 2 * 4 * (4 * 3 + 16 + 8) + 2 * 16


@pytest.mark.parametrize("kwargs, match", [
    (dict(bidirectional=True), "bidirectional=True is not supported"),
    (dict(compute_dtype="bfloat16"), "compute_dtype='bfloat16' is not supported"),
])
def test_refuses_other_models(kwargs, match):
    model = RNN(input_size=2, hidden_size=3, output_size=1, **kwargs)
    params = jax.eval_shape(lambda k: model.init(k, jnp.float64), jax.random.key(0))
    xs, targets = jnp.zeros((4, 2, 2)), jnp.zeros((4, 2, 1))
    with pytest.raises(ValueError, match=match) as e:
        rtrl_loss_and_grad(model, params, xs, targets)
    assert "method='bptt'" in str(e.value)


def test_refuses_large_models():
    H, D, B = 200, 10, 8  # 8 * 200 * (2000 + 40000 + 400) = 67.8 million > 5e7
    assert sensitivity_size(B, D, H) > MAX_SENSITIVITY_ELEMENTS
    model = RNN(input_size=D, hidden_size=H, output_size=1)
    params = jax.eval_shape(model.init, jax.random.key(0))  # shapes only: it is refused first
    xs, targets = jnp.zeros((3, B, D), jnp.float32), jnp.zeros((3, B, 1), jnp.float32)
    with pytest.raises(ValueError, match=r"too large") as e:
        rtrl_loss_and_grad(model, params, xs, targets)
    msg = str(e.value)
    n = 2000 + 40000 + 400  # the parameters; the state B n H, the work (128 + B H) n
    assert f"{B * n * H + (128 + B * H) * n:,} elements for B=8" in msg
    assert "O(B H^4)" in msg and "method='bptt'" in msg
    # the limit is a parameter; the batch counts too
    small = RNN(input_size=2, hidden_size=3, output_size=1)
    p = jax.eval_shape(lambda k: small.init(k, jnp.float64), jax.random.key(0))
    with pytest.raises(ValueError, match="max_elements=10"):
        rtrl_loss_and_grad(small, p, jnp.zeros((2, 1, 2)), jnp.zeros((2, 1, 1)), max_elements=10)


def test_bad_inputs():
    model = RNN(input_size=2, hidden_size=3, output_size=1)
    params = jax.eval_shape(lambda k: model.init(k, jnp.float64), jax.random.key(0))
    xs, targets = jnp.zeros((4, 2, 2)), jnp.zeros((4, 2, 1))
    with pytest.raises(ValueError, match="xs must have shape"):
        rtrl_loss_and_grad(model, params, xs[..., :1], targets)
    with pytest.raises(ValueError, match="targets must have shape"):
        rtrl_loss_and_grad(model, params, xs, targets[:, :1])
    with pytest.raises(ValueError, match="loss must be one of"):
        rtrl_loss_and_grad(model, params, xs, targets, loss="hinge")
    with pytest.raises(ValueError, match="state must have shape"):
        rtrl_loss_and_grad(model, params, xs, targets, state=jnp.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="lengths must be None"):
        rtrl_loss_and_grad(model, params, xs, targets, lengths=jnp.array([4, 4]),
                           last_only=True)


def test_the_initial_states_gradient_of_a_two_layer_lstm():
    """state_grad for a cell with two carry parts and two layers: dL/d(h0, c0) as jax.grad."""
    model = RNN(cell="lstm", input_size=2, hidden_size=3, output_size=2, num_layers=2)
    params = model.init(jax.random.key(0), jnp.float64)
    rng = np.random.default_rng(0)
    xs, targets = jnp.asarray(rng.normal(size=(5, 2, 2))), jnp.asarray(rng.normal(size=(5, 2, 2)))
    state = tuple(jnp.asarray(0.5 * rng.normal(size=(2, 2, 3))) for _ in range(2))
    lengths = jnp.array([5, 3])
    loss, g, dstate = rtrl_loss_and_grad(model, params, xs, targets, "mse", state, lengths,
                                         state_grad=True)
    ref_loss, (ref_g, ref_dstate) = jax.value_and_grad(loss_fn, argnums=(3, 6))(
        model, "mse", "autodiff", params, xs, targets, state, lengths)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-13)
    assert_close((g, dstate), (ref_g, ref_dstate), RTOL)
