"""Every number of the reference worked example (shared/seed-worked-example.md).

The expected values are the digits printed in the example; the library's values
are formatted to the same digits and compared as strings.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

from jaxrnn_app.explain import format_walkthrough, walkthrough
from jaxrnn._src.losses import half_sse
from jaxrnn_app.tasks import reference_example
from jaxrnn._src.train import make_train_step

FORWARD = {  # t: (a_t, h_t, y_t), four decimals
    1: ("0.5000", "0.4621", "0.4621"),
    2: ("1.0462", "0.7803", "0.7803"),
    3: ("1.5780", "0.9183", "0.9183"),
}
BACKWARD = {  # t: (dy_t, dh_t, da_t, dh_next), four significant digits
    3: ("-0.5817", "-0.5817", "-0.09117", "-0.009117"),
    2: ("-0.2197", "-0.2288", "-0.08948", "-0.008948"),
    1: ("-0.03788", "-0.04683", "-0.03683", None),
}
GRADS = {"W_xh": "-0.48930", "W_hh": "-0.11249", "W_hy": "-0.72310"}
UPDATED = {"W_xh": "0.54893", "W_hh": "0.11125", "W_hy": "1.07231"}

sig4 = "{:#.4g}".format
dec4 = "{:.4f}".format
dec5 = "{:.5f}".format

DTYPES = [jnp.float64, jnp.float32]


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_table(dtype):
    ex = reference_example(dtype=dtype)
    ys, state = jax.jit(ex.model.apply)(ex.params, ex.batch.xs, ex.h0)
    w = walkthrough(ex)
    for t, (a, h, y) in FORWARD.items():
        assert dec4(w.a[t - 1]) == a
        assert dec4(w.h[t - 1]) == h
        assert dec4(w.y[t - 1]) == y
        assert dec4(float(ys[t - 1, 0, 0])) == y  # the public apply gives the same outputs
    assert dec4(float(state[0, 0, 0])) == FORWARD[3][1]
    assert dec4(w.loss) == "0.1940"
    assert dec4(float(half_sse(ys, ex.batch.targets))) == "0.1940"


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_table_from_handwritten_reverse_scan(dtype):
    w = walkthrough(reference_example(dtype=dtype))
    for t, (dy, dh, da, dh_next) in BACKWARD.items():
        assert sig4(w.dy[t - 1]) == dy
        assert sig4(w.dh[t - 1]) == dh
        assert sig4(w.da[t - 1]) == da
        if dh_next is not None:
            assert sig4(w.dh_next[t - 1]) == dh_next


@pytest.mark.parametrize("method", ["bptt", "autodiff"])
def test_backward_table_from_public_api(method):
    """The per-step numbers again, from gradients of the public API alone.

    dh_next passed back from step t is dL/dh_{t-1} through the steps t..T: the
    gradient of the suffix loss with respect to its initial state. da_t is
    dL/dx_t / W_xh, since a_t = W_xh x_t + W_hh h_{t-1}.
    """
    ex = reference_example(dtype=jnp.float64)
    model, params, xs, targets = ex.model, ex.params, ex.batch.xs, ex.batch.targets
    ys, _ = model.apply(params, xs, ex.h0)
    hs = ys / params.readout.weight[0, 0]
    dy = jax.grad(half_sse)(ys, targets)

    def suffix_loss(state, t):  # loss of steps t..T (1-indexed) from the state h_{t-1}
        return model.loss(params, xs[t - 1:], targets[t - 1:], method=method, state=state)

    dh_next = {t: float(jax.grad(suffix_loss)(hs[t - 2][None], t)[0, 0, 0]) for t in (2, 3)}
    dxs = jax.grad(lambda xs: model.loss(params, xs, targets, method=method, state=ex.h0))(xs)
    w_xh, w_hy = float(params.layers[0][0].w_ih[0, 0]), float(params.readout.weight[0, 0])
    for t, (dy_s, dh_s, da_s, dh_next_s) in BACKWARD.items():
        assert sig4(float(dy[t - 1, 0, 0])) == dy_s
        dh = float(dy[t - 1, 0, 0]) * w_hy + (dh_next[t + 1] if t < 3 else 0.0)
        assert sig4(dh) == dh_s
        assert sig4(float(dxs[t - 1, 0, 0]) / w_xh) == da_s
        if dh_next_s is not None:
            assert sig4(dh_next[t]) == dh_next_s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["bptt", "autodiff"])
def test_total_gradients(method, dtype):
    ex = reference_example(dtype=dtype)
    loss, g = ex.model.loss_and_grad(ex.params, ex.batch.xs, ex.batch.targets,
                                     loss="half_sse", method=method, state=ex.h0)
    assert dec4(float(loss)) == "0.1940"
    got = {"W_xh": g.layers[0][0].w_ih, "W_hh": g.layers[0][0].w_hh, "W_hy": g.readout.weight}
    for k, v in got.items():
        assert v.shape == (1, 1) and v.dtype == dtype
        assert dec5(float(v[0, 0])) == GRADS[k], k


def test_walkthrough_totals_agree_with_jax_grad():
    w = walkthrough(reference_example(dtype=jnp.float64))
    for k in GRADS:
        assert dec5(w.grads[k]) == GRADS[k]
        assert abs(w.grads[k] - w.autodiff_grads[k]) <= 1e-14
        assert dec5(w.updated[k]) == UPDATED[k]


@pytest.mark.parametrize("method", ["bptt", "autodiff"])
def test_one_sgd_step_through_the_jitted_train_step(method):
    ex = reference_example(dtype=jnp.float64)
    opt = optax.sgd(ex.lr)
    step = make_train_step(ex.model, opt, loss="half_sse", method=method)
    params, _, metrics = step(ex.params, opt.init(ex.params), ex.batch)
    assert dec4(float(metrics["loss"])) == "0.1940"
    assert dec5(float(params.layers[0][0].w_ih[0, 0])) == UPDATED["W_xh"]
    assert dec5(float(params.layers[0][0].w_hh[0, 0])) == UPDATED["W_hh"]
    assert dec5(float(params.readout.weight[0, 0])) == UPDATED["W_hy"]


def test_formatted_walkthrough_shows_every_number():
    text = format_walkthrough(walkthrough(reference_example(dtype=jnp.float64)))
    expected = ["0.1940"]
    for row in FORWARD.values():
        expected += list(row)
    for row in BACKWARD.values():
        expected += [v for v in row if v is not None]
    expected += list(GRADS.values()) + list(UPDATED.values())
    for s in expected:
        assert s in text, s
