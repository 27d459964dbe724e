"""Masked steps contribute nothing, whatever they hold.

Past each sequence's length the inputs and the targets may be NaN, infinite or an
out-of-range class (padding): the outputs, the loss and every gradient are those
of the same batch with zero padding, for ``bptt``, ``autodiff``, ``rtrl``,
``bptt_segment`` and truncated BPTT, every cell, both directions; and ``bptt``
equals ``autodiff``. Class targets within the lengths are range-checked.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_rel_close

import jaxrnn
from jaxrnn.extend import CELLS

T, B, D, H, O = 6, 3, 2, 3, 3
LENGTHS = jnp.array([3, 6, 1])
RTOL = 1e-10


def _batch(loss, poison):
    """``(xs, targets)`` with the padding (steps at or past each length) set to ``poison``
    (NaN or inf; class targets -1 and 7, out of range) or to zeros."""
    k1, k2 = jax.random.split(jax.random.key(0))
    xs = jax.random.normal(k1, (T, B, D), jnp.float64)
    pad = np.asarray(jnp.arange(T)[:, None] >= LENGTHS[None, :])  # (T, B)
    if loss == "xent":
        targets = np.array(jax.random.randint(k2, (T, B), 0, O))
        targets[pad] = 0 if poison is None else np.where(np.arange(pad.sum()) % 2, -1, 7)
    else:
        targets = np.array(jax.random.normal(k2, (T, B, O), jnp.float64))
        targets[pad] = 0.0 if poison is None else poison
    xs = np.array(xs)
    xs[pad] = 0.0 if poison is None else poison
    return jnp.asarray(xs), jnp.asarray(targets)


# every cell once, two layers in both directions (the reverse direction reads each
# sequence from its own end, the padding last), the methods, losses and poisons in turn
METHODS, LOSSES, POISONS = ("bptt", "autodiff", "segment"), ("half_sse", "mse", "xent"), \
    (np.nan, np.inf)
CASES = [dict(cell=c, method=METHODS[i % 3], loss=LOSSES[(i + i // 3) % 3], poison=POISONS[i % 2])
         for i, c in enumerate(sorted(CELLS))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_padding_reaches_no_output_loss_or_gradient(case):
    seg = case["method"] == "segment"
    model = jaxrnn.RNN(cell=case["cell"], input_size=D, hidden_size=H, output_size=O,
                       num_layers=2, bidirectional=True,
                       bptt_segment=2 if seg else None)
    method = "bptt" if seg else case["method"]
    params = model.init(jax.random.key(1), jnp.float64)
    results = {}
    for name, poison in (("poisoned", case["poison"]), ("clean", None)):
        xs, targets = _batch(case["loss"], poison)
        ys, state = model.apply(params, xs, lengths=LENGTHS, method=method)
        loss, grads = model.loss_and_grad(params, xs, targets, case["loss"], method=method,
                                          lengths=LENGTHS)
        results[name] = (ys, state, loss, grads)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(results["poisoned"]))
    assert_trees_rel_close(results["poisoned"], results["clean"], 0.0)  # bit for bit
    xs, targets = _batch(case["loss"], case["poison"])
    _, want = model.loss_and_grad(params, xs, targets, case["loss"], method="autodiff",
                                  lengths=LENGTHS)
    assert_trees_rel_close(results["poisoned"][3], want, RTOL)


def test_padding_reaches_nothing_in_rtrl_and_truncated_bptt():
    model = jaxrnn.RNN(cell="elman", input_size=D, hidden_size=H, output_size=O)
    params = model.init(jax.random.key(1), jnp.float64)
    got = {}
    for name, poison in (("poisoned", np.nan), ("clean", None)):
        xs, targets = _batch("mse", poison)
        got[name] = model.loss_and_grad(params, xs, targets, "mse", method="rtrl",
                                        lengths=LENGTHS)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(got["poisoned"]))
    assert_trees_rel_close(got["poisoned"], got["clean"], 0.0)
    # truncated BPTT takes full-length sequences; its windows' carries come from the
    # same masked layer, so a poisoned step inside a window must not leak either: the
    # rule is the layer's (covered above); here the step runs and stays finite
    step = jaxrnn.make_tbptt_step(model, optax.sgd(0.1), k1=2, k2=3, loss="mse")
    xs, targets = _batch("mse", None)
    params2, _, metrics = step(params, optax.sgd(0.1).init(params), jaxrnn.Batch(xs, targets))
    assert bool(jnp.isfinite(metrics["loss"]))


def test_class_targets_out_of_range():
    """Within the lengths a class outside [0, O) is refused outside jit (one line naming
    the range) and gives a NaN loss under jit; past the lengths it is padding."""
    model = jaxrnn.RNN(cell="gru", input_size=D, hidden_size=H, output_size=O)
    params = model.init(jax.random.key(1), jnp.float64)
    xs, targets = _batch("xent", -1)  # padding -1 and 7: accepted
    loss, _ = model.loss_and_grad(params, xs, targets, "xent", lengths=LENGTHS)
    assert bool(jnp.isfinite(loss))
    valid = np.asarray(jnp.arange(T)[:, None] < LENGTHS[None, :])
    for bad in (3, 7, -1):
        t = targets.at[0, 1].set(bad)
        lo, hi = int(np.asarray(t)[valid].min()), int(np.asarray(t)[valid].max())
        with pytest.raises(ValueError, match=r"targets for loss='xent' must be classes in "
                                             rf"\[0, output_size=3\) within the lengths, got "
                                             rf"values in \[{lo}, {hi}\]"):
            model.loss(params, xs, t, "xent", lengths=LENGTHS)
        jitted = jax.jit(lambda p, x, t: jaxrnn.extend.loss_fn(model, "xent", "bptt", p, x, t,
                                                                None, LENGTHS))
        assert bool(jnp.isnan(jitted(params, xs, t)))


def test_lengths_under_jit_are_clipped_into_range():
    """Outside jit out-of-range lengths are refused; under jit they cannot be checked and
    are clipped into [1, T], the documented rule, in both directions."""
    model = jaxrnn.RNN(cell="gru", input_size=D, hidden_size=H, output_size=O,
                       bidirectional=True)
    params = model.init(jax.random.key(1), jnp.float64)
    xs, _ = _batch("mse", None)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, T=6\], got values in \[0, 9\]"):
        model.apply(params, xs, lengths=jnp.array([9, 6, 0]))
    run = jax.jit(lambda n: model.apply(params, xs, lengths=n))
    got, want = run(jnp.array([9, 6, 0])), run(jnp.array([6, 6, 1]))
    assert_trees_rel_close(got, want, 0.0)
