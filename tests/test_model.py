"""The public RNN API: shapes, states, lengths, errors, PyTorch-named interop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from conftest import assert_trees_rel_close
from jaxrnn import RNN


def small(**kw):
    cfg = dict(cell="elman", input_size=3, hidden_size=5, output_size=2)
    cfg.update(kw)
    return RNN(**cfg)


def data(T=6, B=2, D=3, O=2, dtype=jnp.float32, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(k1, (T, B, D), dtype), jax.random.normal(k2, (T, B, O), dtype))


def test_public_api_names():
    for name in jaxrnn.__all__:
        assert hasattr(jaxrnn, name), name
    assert isinstance(jaxrnn.__version__, str)


def test_init_shapes_and_pytree(key):
    model = small()
    params = model.init(key)
    (p,) = params.layers[0]
    assert p.w_ih.shape == (5, 3) and p.w_hh.shape == (5, 5)
    assert p.b_ih.shape == (5,) and p.b_hh.shape == (5,)
    assert params.readout.weight.shape == (2, 5) and params.readout.bias.shape == (2,)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    bound = 1 / np.sqrt(5)
    assert all(float(jnp.max(jnp.abs(x))) <= bound for x in jax.tree.leaves(params))
    no_bias = small(bias=False, readout_bias=False).init(key)
    assert no_bias.layers[0][0].b_ih is None and no_bias.readout.bias is None
    assert len(jax.tree.leaves(no_bias)) == 3


def test_model_is_hashable_static_config():
    assert hash(small()) == hash(small())
    assert small() == small() and small() != small(hidden_size=6)
    with pytest.raises(dataclass_error()):
        small().hidden_size = 3


def dataclass_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_apply_shapes_and_state(key):
    model = small()
    params = model.init(key)
    xs, _ = data()
    ys, state = jax.jit(model.apply)(params, xs)
    assert ys.shape == (6, 2, 2) and state.shape == (1, 2, 5)
    # The final state continues the sequence: two halves equal the whole.
    ys1, s1 = model.apply(params, xs[:3])
    ys2, s2 = model.apply(params, xs[3:], state=s1)
    np.testing.assert_allclose(jnp.concatenate([ys1, ys2]), ys, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s2, state, rtol=1e-6, atol=1e-6)


def test_apply_matches_numpy_reference(key):
    model = small(nonlinearity="relu")
    params = model.init(key, jnp.float64)
    xs, _ = data(dtype=jnp.float64)
    ys, state = model.apply(params, xs)
    p = jax.tree.map(np.asarray, params.layers[0][0])
    h = np.zeros((2, 5))
    for t in range(xs.shape[0]):
        h = np.maximum(np.asarray(xs[t]) @ p.w_ih.T + p.b_ih + h @ p.w_hh.T + p.b_hh, 0)
        y = h @ np.asarray(params.readout.weight).T + np.asarray(params.readout.bias)
        np.testing.assert_allclose(ys[t], y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state[0], h, rtol=1e-12, atol=1e-12)


def test_lengths_semantics(key):
    """Past a sequence's length: zero outputs, unchanged state, no gradient."""
    model = small()
    params = model.init(key, jnp.float64)
    xs, targets = data(T=7, B=3, dtype=jnp.float64)
    lengths = jnp.array([7, 1, 4])
    ys, state = model.apply(params, xs, lengths=lengths)
    for b, n in enumerate([7, 1, 4]):
        ys_b, state_b = model.apply(params, xs[:n, b:b + 1])
        np.testing.assert_allclose(ys[:n, b], ys_b[:, 0], rtol=1e-12, atol=1e-12)
        assert np.all(np.asarray(ys[n:, b]) == 0)
        np.testing.assert_allclose(state[:, b], state_b[:, 0], rtol=1e-12, atol=1e-12)
    for method in ("bptt", "autodiff"):
        # Garbage past the lengths changes nothing, not even the gradients.
        noisy = xs.at[4:, 2].set(1e3).at[1:, 1].set(-1e3)
        l1, g1 = model.loss_and_grad(params, xs, targets, method=method, lengths=lengths)
        l2, g2 = model.loss_and_grad(params, noisy, targets, method=method, lengths=lengths)
        assert float(l1) == pytest.approx(float(l2), rel=1e-14)
        assert_trees_rel_close(g1, g2, 1e-13)


@pytest.mark.parametrize("loss", ["half_sse", "mse", "xent"])
def test_loss_and_grad_methods_agree(key, loss):
    model = small()
    params = model.init(key, jnp.float64)
    xs, targets = data(dtype=jnp.float64)
    if loss == "xent":
        targets = jnp.argmax(targets, axis=-1)
    lb, gb = model.loss_and_grad(params, xs, targets, loss=loss, method="bptt")
    la, ga = model.loss_and_grad(params, xs, targets, loss=loss, method="autodiff")
    assert float(lb) == pytest.approx(float(la), rel=1e-14)
    assert_trees_rel_close(gb, ga, 1e-10)
    assert float(lb) == pytest.approx(float(model.loss(params, xs, targets, loss=loss)), rel=1e-14)


def test_loss_values():
    ys = jnp.array([[[1.0, 2.0]], [[3.0, 4.0]]])  # (T=2, B=1, O=2)
    ts = jnp.zeros_like(ys)
    assert float(jaxrnn.half_sse(ys, ts)) == 15.0
    assert float(jaxrnn.mse(ys, ts)) == 7.5
    mask = jnp.array([[True], [False]])
    assert float(jaxrnn.half_sse(ys, ts, mask)) == 2.5
    assert float(jaxrnn.mse(ys, ts, mask)) == 2.5
    logits = jnp.log(jnp.array([[[0.25, 0.75]], [[0.5, 0.5]]]))
    cls = jnp.array([[1], [0]])
    assert float(jaxrnn.xent(logits, cls)) == pytest.approx(-(np.log(0.75) + np.log(0.5)) / 2)
    assert float(jaxrnn.xent(logits, cls, mask)) == pytest.approx(-np.log(0.75))


# --- interop ---------------------------------------------------------------

def test_torch_roundtrip_is_exact(key):
    model = small()
    params = model.init(key)
    rnn_sd, ro_sd = model.to_torch(params)
    assert list(rnn_sd) == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
    assert list(ro_sd) == ["weight", "bias"]
    back = model.from_torch(rnn_sd, ro_sd)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    sd2, ro2 = model.to_torch(back)
    assert all(np.array_equal(sd2[k], rnn_sd[k]) for k in rnn_sd)


def test_from_torch_rejects_mismatches(key):
    model = small()
    rnn_sd, ro_sd = model.to_torch(model.init(key))
    missing = {k: v for k, v in rnn_sd.items() if k != "bias_hh_l0"}
    with pytest.raises(ValueError, match="missing keys.*bias_hh_l0"):
        model.from_torch(missing, ro_sd)
    with pytest.raises(ValueError, match="unexpected keys.*weight_ih_l1"):
        model.from_torch({**rnn_sd, "weight_ih_l1": rnn_sd["weight_ih_l0"]}, ro_sd)
    with pytest.raises(ValueError, match=r"weight_hh_l0.*shape \(5, 5\).*\(4, 4\)"):
        model.from_torch({**rnn_sd, "weight_hh_l0": np.zeros((4, 4))}, ro_sd)
    with pytest.raises(ValueError, match="readout_state_dict"):
        model.from_torch(rnn_sd, {"weight": ro_sd["weight"]})


def test_layer_directions_name_layers_as_pytorch():
    """The one layer x direction order and naming; torch_names follows it, as PyTorch does."""
    from jaxrnn._src.stack import layer_directions

    assert list(layer_directions(2, 2)) == [(0, 0, "_l0"), (0, 1, "_l0_reverse"),
                                            (1, 0, "_l1"), (1, 1, "_l1_reverse")]
    assert list(layer_directions(2, 1)) == [(0, 0, "_l0"), (1, 0, "_l1")]
    torch = pytest.importorskip("torch")
    model = small(cell="gru", num_layers=2, bidirectional=True)
    gru = torch.nn.GRU(3, 5, num_layers=2, bidirectional=True)
    assert model.torch_names() == list(gru.state_dict())


def test_to_torch_rejects_params_of_another_stack(key):
    deep = small(num_layers=2, bidirectional=True)
    with pytest.raises(ValueError, match=r"params.layers must have num_layers=1 layers of "
                                         r"num_directions=1 .* got 2 layers of \[2, 2\]"):
        small().to_torch(deep.init(key))


def test_interop_module_imports_no_torch():
    """``jaxrnn._src.interop`` reads tensors without importing torch."""
    import subprocess
    import sys

    code = "import sys, jaxrnn._src.interop; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


# --- bad input ---------------------------------------------------------------

@pytest.mark.parametrize("kw, exc, match", [
    (dict(cell="transformer"), ValueError, "cell must be one of"),
    (dict(hidden_size=-1), ValueError, "hidden_size must be an integer >= 1, got -1"),
    (dict(input_size=0), ValueError, "input_size"),
    (dict(output_size=2.5), ValueError, "output_size"),
    (dict(nonlinearity="sigmoid"), ValueError, "nonlinearity"),
])
def test_bad_model_config(kw, exc, match):
    with pytest.raises(exc, match=match):
        small(**kw)


def test_lstm_state_must_be_a_pair(key):
    model = small(cell="lstm")
    params = model.init(key)
    xs, _ = data()
    with pytest.raises(ValueError, match=r"state of an LSTM must be a pair \(h0, c0\)"):
        model.apply(params, xs, state=jnp.zeros((1, 2, 5)))
    ys, (h, c) = model.apply(params, xs, state=(jnp.zeros((1, 2, 5), jnp.float32), jnp.ones((1, 2, 5), jnp.float32)))
    assert h.shape == c.shape == (1, 2, 5)


def test_state_of_a_cell_with_three_carries_must_be_a_triple():
    from jaxrnn._src.validation import check_state

    shapes, f32 = [(1, 2, 5), (1, 2, 5), (1, 2, 3)], np.dtype(np.float32)  # as params' dtype
    with pytest.raises(ValueError, match=r"state of cell 'mine' must be a tuple of 3 arrays, "
                                         r"of shapes \(1, 2, 5\), \(1, 2, 5\), \(1, 2, 3\)"):
        check_state(jnp.zeros((1, 2, 5)), shapes, f32, cell_name="mine", hidden_size=5)
    state = tuple(jnp.zeros(s, jnp.float32) for s in shapes)
    with pytest.raises(ValueError, match=r"state\[2\] must have shape .*, size\) = \(1, 2, 3\)"):
        check_state(state[:2] + (jnp.zeros((1, 2, 4), jnp.float32),), shapes, f32,
                    cell_name="mine", hidden_size=5)
    with pytest.raises(TypeError, match="state must have dtype float32, got dtype float16"):
        check_state(state[:2] + (state[2].astype(jnp.float16),), shapes, f32,
                    cell_name="mine", hidden_size=5)
    out = check_state(list(state), shapes, f32, cell_name="mine", hidden_size=5)
    assert isinstance(out, tuple) and [o.shape for o in out] == shapes


def test_gru_rejects_relu():
    with pytest.raises(ValueError, match="nonlinearity='relu' applies to the elman, indrnn "
                                         "and leaky cells only"):
        small(cell="gru", nonlinearity="relu")


def test_bad_inputs_name_the_argument(key):
    model = small()
    params = model.init(key)
    xs, targets = data()
    cases = [
        (lambda: model.apply(params, xs[0]), ValueError,
         r"xs must have shape \(T, B, input_size=3\).*got shape \(2, 3\)"),
        (lambda: model.apply(params, xs[..., :2]), ValueError,
         r"xs must have shape \(T, B, input_size=3\).*got shape \(6, 2, 2\)"),
        (lambda: model.apply(params, xs.astype(jnp.int32)), TypeError,
         "xs must be a floating array, got dtype int32"),
        (lambda: model.apply(params, xs[:0]), ValueError, "empty sequence"),
        (lambda: model.apply(params, xs[:, :0]), ValueError, "empty batch"),
        (lambda: model.apply(params, xs.astype(jnp.float64)), TypeError,
         "xs has dtype float64 but the parameters have dtype float32"),
        (lambda: model.apply(params, xs, state=jnp.zeros((2, 2, 5))), ValueError,
         r"state must have shape .* = \(1, 2, 5\), got shape \(2, 2, 5\)"),
        (lambda: model.apply(params, xs, lengths=jnp.array([1, 2, 3])), ValueError,
         r"lengths must have shape \(B,\) = \(2,\)"),
        (lambda: model.apply(params, xs, lengths=jnp.array([0, 2])), ValueError,
         r"lengths must lie in \[1, T=6\]"),
        (lambda: model.apply(params, xs, lengths=jnp.array([7, 2])), ValueError,
         r"lengths must lie in \[1, T=6\]"),
        (lambda: model.apply(params, xs, lengths=jnp.array([1.0, 2.0])), TypeError,
         "lengths must be an integer array"),
        (lambda: model.loss_and_grad(params, xs, targets[:-1]), ValueError,
         r"targets must have shape \(T, B, output_size\) = \(6, 2, 2\), got shape \(5, 2, 2\)"),
        (lambda: model.loss_and_grad(params, xs, targets, loss="xent"), ValueError,
         r"targets for loss='xent' must have shape \(T, B\)"),
        (lambda: model.loss_and_grad(params, xs, targets[..., 0], loss="xent"), TypeError,
         "must be integer classes"),
        (lambda: model.loss_and_grad(params, xs, targets, loss="l1"), ValueError,
         "loss must be one of"),
        (lambda: model.loss_and_grad(params, xs, targets, method="forward"), ValueError,
         "method must be one of"),
        (lambda: model.apply({"w": 1}, xs), TypeError, "params must be RNNParams"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


def test_errors_also_raise_under_jit(key):
    model = small()
    params = model.init(key)
    xs, _ = data()
    with pytest.raises(ValueError, match="xs must have shape"):
        jax.jit(model.apply)(params, xs[..., :1])


def test_grad_of_a_user_loss_under_jit(key):
    """jax.grad of any loss built on apply goes through the handwritten backward."""
    model = small()
    params = model.init(key, jnp.float64)
    xs, _ = data(dtype=jnp.float64)

    def user_loss(p, method):
        ys, state = model.apply(p, xs, method=method)
        return jnp.sum(jnp.cos(ys)) + jnp.sum(state ** 3)

    gb = jax.jit(jax.grad(user_loss), static_argnums=1)(params, "bptt")
    ga = jax.jit(jax.grad(user_loss), static_argnums=1)(params, "autodiff")
    assert_trees_rel_close(gb, ga, 1e-10)


def test_bptt_method_calls_the_handwritten_backward(key, monkeypatch):
    """method="bptt" differentiates through scan.backward_scan; "autodiff" never does."""
    import jaxrnn._src.scan as scan_mod

    calls = []
    original = scan_mod.backward_scan

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(scan_mod, "backward_scan", spy)
    model = small()
    params = model.init(key, jnp.float64)
    xs, targets = data(dtype=jnp.float64)
    jax.grad(lambda p: model.loss(p, xs, targets, method="autodiff"))(params)
    assert calls == []
    jax.grad(lambda p: model.loss(p, xs, targets, method="bptt"))(params)
    assert calls == [1]


def test_rtrl_method_equals_bptt(key):
    """The third gradient method, through the same public call."""
    model = small()
    params = model.init(key, jnp.float64)
    xs, targets = data(dtype=jnp.float64)
    state = 0.3 * jnp.ones((1, 2, 5), jnp.float64)
    lr, gr = model.loss_and_grad(params, xs, targets, method="rtrl", state=state)
    lb, gb = model.loss_and_grad(params, xs, targets, method="bptt", state=state)
    assert float(lr) == pytest.approx(float(lb), rel=1e-13)
    assert_trees_rel_close(gr, gb, 1e-10)
    both = small(bidirectional=True)
    with pytest.raises(ValueError, match="method='rtrl' runs forward in time: bidirectional"):
        both.loss_and_grad(both.init(key, jnp.float64), xs, targets, method="rtrl")


# --- layers without a head (output_size=None) ----------------------------------

def test_layers_without_a_head(key):
    head = small(cell="lstm", num_layers=2)
    model = small(cell="lstm", num_layers=2, output_size=None)
    params = model.init(key)
    assert params.readout is None  # the same layers as with a head, from the same key
    assert_trees_rel_close(params.layers, head.init(key).layers, 0.0)
    xs, targets = data()
    hs, (h, c) = model.apply(params, xs)
    assert hs.shape == (6, 2, 5) and h.shape == (2, 2, 5)
    np.testing.assert_array_equal(hs, head.features(head.init(key), xs)[0])
    np.testing.assert_array_equal(hs, model.features(params, xs)[0])
    sd, readout_sd = model.to_torch(params)
    assert readout_sd is None
    assert_trees_rel_close(model.from_torch(sd), params, 0.0)
    with pytest.raises(ValueError, match="readout_state_dict must be None"):
        model.from_torch(sd, {"weight": np.zeros((2, 5))})
    refusals = [lambda: model.loss(params, xs, targets),
                lambda: model.loss_and_grad(params, xs, targets),
                lambda: model.loss_and_grad(params, xs, targets, method="rtrl"),
                lambda: jaxrnn.make_train_step(model, jaxrnn.make_optimizer()),
                lambda: jaxrnn.make_tbptt_step(model, jaxrnn.make_optimizer(), 2),
                lambda: jaxrnn.gradient_diagnostics(model, params, xs, targets),
                lambda: jaxrnn.sample(model, params, jnp.array([0]), 3, key)]
    for refuse in refusals:
        with pytest.raises(ValueError, match="needs a readout, but this RNN has output_size=None"):
            refuse()


@pytest.mark.parametrize("kw, with_lengths", [
    (dict(cell="elman", num_layers=2, bidirectional=True), True),
    (dict(cell="gru", bidirectional=True), False),
    (dict(cell="lstm", num_layers=2, proj_size=2), True),
], ids=["elman-2-bi-lengths", "gru-1-bi", "lstm-2-proj-lengths"])
def test_headless_bptt_gradient_equals_autodiff(key, kw, with_lengths):
    """The cotangent of the top layer's outputs comes from the user's own head."""
    model = small(output_size=None, **kw)
    params = model.init(key, jnp.float64)
    xs, _ = data(dtype=jnp.float64)
    lengths = jnp.array([6, 3]) if with_lengths else None
    w = jax.random.normal(jax.random.key(5), (model.layer_output_size * model.num_directions,),
                          jnp.float64)

    def user_loss(p, method):  # a user's head and loss on the features
        hs, state = model.apply(p, xs, lengths=lengths, method=method)
        return jnp.sum(jnp.tanh(hs @ w) ** 2) + jnp.sum(jax.tree.leaves(state)[0] ** 3)

    grad = jax.jit(jax.grad(user_loss), static_argnums=1)
    assert_trees_rel_close(grad(params, "bptt"), grad(params, "autodiff"), 1e-10)
