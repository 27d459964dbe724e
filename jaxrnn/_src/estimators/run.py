r"""One driver for every estimator: the network forward in time, the gradient read out online.

.. math::
    s_t = f(s_{t-1}, x_t; \theta), \qquad
    P_t = \mathrm{update}(P_{t-1}, \text{step } t), \qquad
    g \mathrel{+}= \mathrm{read\_out}\big(P_t, \partial\ell_t/\partial h_t\big)

over a chunk of steps, starting from given network and estimator states and
returning both at its end: the whole sequence at once (``loss_and_grad``, one
update at the end, what ``model.loss_and_grad(method=NAME)`` computes) or one chunk
of ``k`` steps of a stream between two optimizer updates (online training). The
readout's gradient :math:`\sum_t \delta y_t h_t^\top` is exact for every estimator;
only the recurrent layers' gradients are estimated.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxrnn._src import losses as losses_lib
from jaxrnn._src.cells import Carry, Cell
from jaxrnn._src.estimators.base import Estimator, Layers, stack_step, zeros_like


class Readout(NamedTuple):
    """The readout ``y = h W^T + b`` as the estimators see it."""

    weight: jax.Array  # (O, H)
    bias: jax.Array | None  # (O,)


class ChunkResult(NamedTuple):
    """What ``run_chunk`` returns."""

    loss: jax.Array  # the chunk's loss (its sum of step terms)
    grads: Any  # read_out's sum over the steps: shaped like ``layers`` (or the estimator's)
    dreadout: Readout  # the readout's exact gradient
    carries: list  # the network's carries at the chunk's end, one per layer
    state: Any  # the estimator's state at the chunk's end


def run_chunk(estimator: Estimator, cell: Cell, layers: Layers, readout: Readout, loss: str,
              xs: jax.Array, targets: jax.Array, carries0: Sequence[Carry], valid: jax.Array,
              scored: jax.Array, total_divisor: jax.Array, state, key, t0=0,
              per_step: bool = False) -> ChunkResult:
    """Runs the network over a chunk, updating the estimator and reading out its gradient.

    Args:
        estimator: the estimator.
        cell: the cell.
        layers: one parameter NamedTuple per layer.
        readout: the readout's parameters.
        loss: the loss's name (``losses.LOSSES``).
        xs: inputs, (T, B, D), zero where not ``valid``.
        targets: (T, B, O) floats or (T, B) classes, zero where not ``valid``.
        carries0: the carries at the chunk's start, one per layer.
        valid: (T, B) bool: the steps the recurrence runs (elsewhere the state stays).
        scored: (T, B) bool: the positions the loss scores.
        total_divisor: the loss's divisor (``losses.divisor``) over what it averages.
        state: the estimator's state at the chunk's start.
        key: the estimator's PRNG key (None for a deterministic one); step t of the
            chunk uses ``fold_in(key, t0 + t)``.
        t0: the chunk's first step's index in its stream.
        per_step: also return every step's read-out, stacked, (T, ...) (to measure
            an estimator step by step).

    Returns:
        A ``ChunkResult``; with ``per_step``, ``(ChunkResult, read-outs)``.
    """
    W, b = readout
    T = xs.shape[0]

    def term(y, target, s):
        return losses_lib.step_term(loss, y, target, s, total_divisor)

    def body(carry, inputs):
        carries, est, (L, g, dW, db) = carry
        t, x, target, m, s = inputs
        carries, traces = stack_step(cell, layers, carries, x, m)
        k = None if key is None else jax.random.fold_in(key, t0 + t)
        est = estimator.update(cell, layers, est, traces, k)
        h = carries[-1][0]  # the top layer's output h_t, (B, H)
        y = h @ W.T if b is None else h @ W.T + b  # y_t = W h_t + b
        l_t, dy = jax.value_and_grad(term)(y, target, s)  # dl_t/dy_t, zero where not scored
        dh = dy @ W  # dl_t/dh_t through the readout
        g_t = estimator.read_out(cell, layers, est, dh, dy, W)
        acc = (L + l_t, jax.tree.map(jnp.add, g, g_t), dW + dy.T @ h,  # dL/dW += dy_t^T h_t
               None if db is None else db + dy.sum(0))  # dL/db += sum_b dy_t
        return (carries, est, acc), (g_t if per_step else None)

    probe = jax.eval_shape(lambda: _first_read_out(estimator, cell, layers, state, xs, carries0,
                                                   valid, W))
    g0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), probe)
    acc0 = (jnp.zeros((), xs.dtype), g0, jnp.zeros_like(W), None if b is None else jnp.zeros_like(b))
    (carries, state, (L, g, dW, db)), steps = jax.lax.scan(
        body, (list(map(tuple, carries0)), state, acc0),
        (jnp.arange(T), xs, targets, valid, scored))
    out = ChunkResult(L, g, Readout(dW, db), carries, state)
    return (out, steps) if per_step else out


def _first_read_out(estimator, cell, layers, state, xs, carries0, valid, W):
    """The shapes of one read-out (for the accumulator's zeros)."""
    carries, traces = stack_step(cell, layers, carries0, xs[0], valid[0])
    dh = jnp.zeros_like(carries[-1][0])
    dy = jnp.zeros((dh.shape[0], W.shape[0]), dh.dtype)
    return estimator.read_out(cell, layers, state, dh, dy, W)


def masks(T: int, B: int, lengths, last_only: bool) -> tuple[jax.Array, jax.Array]:
    """``(valid, scored)``, (T, B) bool each: the steps the recurrence runs, the scored ones."""
    valid = (jnp.ones((T, B), bool) if lengths is None
             else jnp.arange(T)[:, None] < lengths[None, :])
    scored = valid & (jnp.arange(T) == T - 1)[:, None] if last_only else valid
    return valid, scored


def loss_and_grad(estimator: Estimator, cell: Cell, layers: Layers, readout: Readout, loss: str,
                  xs: jax.Array, targets: jax.Array, carries0: Sequence[Carry], lengths,
                  key, last_only: bool = False, per_step: bool = False):
    """The loss and the estimator's gradient of a whole sequence: one update at its end.

    Args: as ``run_chunk``'s; ``lengths`` an optional (B,) integer array in [1, T];
    ``last_only`` scores the last step only (full-length sequences); ``per_step``
    also returns every step's read-out, stacked (``run_chunk``'s).

    Returns:
        ``(loss, grads, dreadout)``: ``grads`` as the estimator's ``read_out`` (shaped
        like ``layers``), ``dreadout`` a ``Readout``; with ``per_step``, the read-outs
        (T, ...) as a fourth value.
    """
    T, B = xs.shape[:2]
    valid, scored = masks(T, B, lengths, last_only)
    # past each length the inputs and targets may hold anything (NaN): they reach nothing
    xs, targets = losses_lib.zero_masked(xs, valid), losses_lib.zero_masked(targets, valid)
    div = losses_lib.divisor(loss, scored, readout.weight.shape[0]).astype(xs.dtype)
    k_init, k_run = (None, None) if key is None else jax.random.split(key)
    state = estimator.init(cell, layers, carries0, k_init)
    out = run_chunk(estimator, cell, layers, readout, loss, xs, targets, carries0, valid, scored,
                    div, state, k_run, per_step=per_step)
    if per_step:
        out, steps = out
        return out.loss, out.grads, out.dreadout, steps
    return out.loss, out.grads, out.dreadout
