"""Memory-lean BPTT (``bptt_segment``): the same gradients, a fraction of the memory."""

import jax
import jax.numpy as jnp
import optax
import pytest

from conftest import assert_trees_rel_close
from jaxrnn import RNN, Batch, make_train_step
from jaxrnn._src.model import loss_fn


CASES = [(cell, seg, lengths, stacked) for cell in ("elman", "lstm", "gru")
         for seg, lengths, stacked in [(1, False, False), (7, True, False), (40, False, False),
                                       (5, True, True)]]


@pytest.mark.parametrize("cell, segment, with_lengths, stacked", CASES)
def test_lean_gradients_equal_plain_bptt(cell, segment, with_lengths, stacked):
    kw = dict(cell=cell, input_size=3, hidden_size=4, output_size=2,
              num_layers=2 if stacked else 1, bidirectional=stacked)
    plain, lean = RNN(**kw), RNN(**kw, bptt_segment=segment)
    k = jax.random.split(jax.random.key(segment), 4)
    params = plain.init(k[0], jnp.float64)
    xs = jax.random.normal(k[1], (23, 3, 3), jnp.float64)  # 23: not a multiple of the segment
    targets = jax.random.normal(k[2], (23, 3, 2), jnp.float64)
    state = jax.tree.map(lambda z: z + 0.3, plain.zero_state(3, jnp.float64))
    lengths = jnp.array([23, 1, 10]) if with_lengths else None

    def run(model):
        def f(p, x, s):
            hs, final = model.features(p, x, s, lengths, "bptt")
            return loss_fn(model, "half_sse", "bptt", p, x, targets, s, lengths), (hs, final)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(params, xs, state)

    (l_lean, out_lean), g_lean = run(lean)
    (l_plain, out_plain), g_plain = run(plain)
    assert_trees_rel_close(out_lean, out_plain, 1e-14)
    assert float(l_lean) == pytest.approx(float(l_plain), rel=1e-14)
    assert_trees_rel_close(g_lean, g_plain, 1e-10)


def temp_bytes(model, T, B, method="bptt"):
    opt = optax.sgd(1e-3)
    p = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    s = jax.eval_shape(opt.init, p)
    b = Batch(jax.ShapeDtypeStruct((T, B, model.input_size), jnp.float32),
              jax.ShapeDtypeStruct((T, B, model.output_size), jnp.float32))
    compiled = make_train_step(model, opt, loss="mse", method=method).lower(p, s, b).compile()
    return compiled.memory_analysis().temp_size_in_bytes


# What BPTT keeps for every step, in units of H floats: the carry and the residuals
# ((h, c) and the gates [i, f, g, o] for the LSTM; h and [r, z, n], hn for the GRU).
PER_STEP_WIDTH = {"lstm": 2 + 4, "gru": 1 + 3 + 1}


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lean_saves_the_per_step_storage(cell):
    """XLA's own accounting of the compiled train step's temporary buffers.

    Plain BPTT keeps the carry and residuals of all T steps; lean BPTT keeps the
    carry every ``segment`` steps and one segment's residuals. The memory lean saves
    must be at least 90% of that difference, counted from the cells' shapes.
    """
    T, B, H, segment = 2000, 16, 64, 45
    kw = dict(cell=cell, input_size=16, hidden_size=H, output_size=16)
    plain = temp_bytes(RNN(**kw), T, B)
    lean = temp_bytes(RNN(**kw, bptt_segment=segment), T, B)
    step_bytes = B * H * 4 * PER_STEP_WIDTH[cell]  # float32
    avoided = T * step_bytes - (T // segment + 1 + segment) * step_bytes
    assert plain - lean >= 0.9 * avoided, (plain, lean, avoided)


def test_segment_errors():
    with pytest.raises(ValueError, match="bptt_segment must be an integer >= 1"):
        RNN(cell="gru", input_size=1, hidden_size=1, output_size=1, bptt_segment=0)
