"""RNN.step: one step of every layer on a raw input, equal to apply step by step."""

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from conftest import all_pairs, assert_trees_rel_close
from jaxrnn import RNN, Cell

STEP_RTOL = 1e-12  # float64: the step's products are the scan's, one step at a time


class DecayParams(NamedTuple):
    """A user cell's parameters: CellParams' four fields and a decay per unit."""

    w_ih: jax.Array  # (H, D)
    w_hh: jax.Array  # (H, H)
    b_ih: jax.Array | None  # (H,)
    b_hh: jax.Array | None  # (H,)
    decay: jax.Array  # (H,)


@dataclasses.dataclass(frozen=True)
class Decay(Cell):
    """h = sigmoid(decay) h_prev + tanh(a): a user's cell, through the same paths."""

    name: ClassVar[str] = "decay"

    def init(self, key, input_size, hidden_size, bias=True, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        p = super().init(k1, input_size, hidden_size, bias, dtype)
        return DecayParams(*p, decay=jax.random.normal(k2, (hidden_size,), dtype))

    def step(self, params, carry, xp):
        (h_prev,) = carry
        u = jnp.tanh(xp + self.recurrent_preactivation(params, h_prev))
        return (jax.nn.sigmoid(params.decay) * h_prev + u,), u

    def backward_step(self, params, carry_prev, carry, res, dcarry):
        (h_prev,), u, (dh,) = carry_prev, res, dcarry
        s = jax.nn.sigmoid(params.decay)
        da = dh * (1 - u * u)  # back through tanh
        return (dh * s + da @ params.w_hh,), da, da, {"decay": dh * h_prev * s * (1 - s)}


# Every built-in cell (the projected LSTM as its own entry) and a user's cell; the
# stack's depth and the head pairwise (each cell once: compiles cost the suite's time).
CELL_CASES = ["lstm_proj", "elman", "gru", "indrnn", "peephole_lstm", "layernorm_lstm", "lstm",
              "leaky", Decay()]
STACKS = all_pairs({"num_layers": [1, 2], "head": [False, True]})
CASES = [dict(cell=c, **STACKS[i % len(STACKS)]) for i, c in enumerate(CELL_CASES)]


def test_cases_cover_every_cell_and_stack():
    assert {c["cell"] if isinstance(c["cell"], str) else "user" for c in CASES} == {
        *jaxrnn._src.cells.CELLS, "lstm_proj", "user"}
    assert {(c["num_layers"], c["head"]) for c in CASES} == {(1, False), (1, True), (2, False),
                                                            (2, True)}


def _model(cell, num_layers, head):
    kw = dict(cell="lstm", proj_size=2) if cell == "lstm_proj" else dict(cell=cell)
    if cell == "indrnn":
        kw["nonlinearity"] = "relu"
    return RNN(input_size=3, hidden_size=4, output_size=2 if head else None,
               num_layers=num_layers, **kw)


@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: "-".join(str(getattr(v, "name", v)) for v in c.values()))
def test_scanning_step_equals_apply(case):
    model = _model(**case)
    k = jax.random.split(jax.random.key(1), 3)
    params = model.init(k[0], jnp.float64)
    xs = jax.random.normal(k[1], (5, 2, 3), jnp.float64)
    state = jax.tree.map(lambda z: 0.3 * jax.random.normal(k[2], z.shape, jnp.float64),
                         model.zero_state(2, jnp.float64))

    @jax.jit
    def both(params, xs, state):  # one compilation for the two
        final_s, ys_s = jax.lax.scan(lambda s, x: model.step(params, s, x), state, xs)
        return model.apply(params, xs, state), (ys_s, final_s)

    (ys, final), (ys_s, final_s) = both(params, xs, state)
    width = 2 if case["head"] else model.layer_output_size
    assert ys_s.shape == ys.shape == (5, 2, width)
    assert_trees_rel_close((ys_s, final_s), (ys, final), STEP_RTOL)


def test_step_is_layout_free_and_refuses_what_it_cannot_do(key):
    model = RNN(cell="gru", input_size=3, hidden_size=4, output_size=2)
    params = model.init(key)
    x = jnp.ones((2, 3), jnp.float32)
    _, y = model.step(params, None, x)  # state=None: zeros, as apply
    np.testing.assert_allclose(y, model.apply(params, x[None])[0][0], rtol=1e-6, atol=1e-7)
    _, y_bf = dataclasses.replace(model, batch_first=True).step(params, None, x)
    assert np.array_equal(y, y_bf)  # one step has no time axis: batch_first is moot
    bi = dataclasses.replace(model, bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional=True"):
        bi.step(bi.init(key), None, x)
    with pytest.raises(ValueError, match=r"x_t must have shape \(B, input_size=3\).*\(5, 2, 3\)"):
        model.step(params, None, jnp.ones((5, 2, 3)))
    with pytest.raises(TypeError, match="x_t has dtype float64 but the parameters"):
        model.step(params, None, x.astype(jnp.float64))
    with pytest.raises(ValueError, match=r"state must have shape .* = \(1, 2, 4\)"):
        model.step(params, jnp.zeros((1, 3, 4)), x)


def test_sample_equals_feeding_each_id_back_through_apply(key):
    """sample runs RNN.step; its ids are those of apply on one step at a time."""
    model = RNN(cell="lstm", input_size=5, hidden_size=8, output_size=5, num_layers=2)
    params = model.init(key)
    prompt, n, temp = jnp.array([0, 3, 1]), 30, 0.8
    ids = jaxrnn.sample(model, params, prompt, n, jax.random.key(7), temp)

    @jax.jit
    def reference(params, key):
        onehot = jax.nn.one_hot(prompt, 5, dtype=jnp.float32)[:, None]
        ys, state = model.apply(params, onehot)

        def body(carry, k):
            logits, state = carry
            nxt = jax.random.categorical(k, logits / temp)
            x = jax.nn.one_hot(nxt, 5, dtype=jnp.float32)[None, None]
            ys, state = model.apply(params, x, state)
            return (ys[0, 0], state), nxt

        return jax.lax.scan(body, (ys[-1, 0], state), jax.random.split(key, n))[1]

    assert np.array_equal(ids, reference(params, jax.random.key(7)))
