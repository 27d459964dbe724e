r"""How good is an estimator? Its gradient against the exact one, over draws and step by step.

Above the model (it validates through it); the measures themselves are in
``jaxrnn._src.estimators.measure``. For a model, a batch and an estimator:

* ``estimator_alignment``: N draws of the estimator's whole-sequence gradient
  against BPTT's: cosine, relative error and norm ratio per draw, and the
  relative variance :math:`\sum_j \mathrm{Var}(\hat g_j) / \|g\|^2` across draws
  (0 for a deterministic estimator);
* ``step_alignment``: each step's read-out :math:`(\partial\ell_t/\partial h_t)^\top
  \hat P_t` against exact RTRL's on the same trajectory, step by step.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrnn._src import estimators
from jaxrnn._src.estimators.base import Estimator
from jaxrnn._src.estimators.measure import Alignment, Paired, alignment, flatten
from jaxrnn._src.model import (RNN, RNNParams, State, estimated_loss_and_grad, layers_of,
                               loss_fn)
from jaxrnn._src.names import LossName, Method


class DrawAlignment(NamedTuple):
    """``estimator_alignment``'s result."""

    draws: Alignment  # each of the N draws against the exact gradient, (N,) arrays
    mean: Alignment  # the mean of the draws against the exact gradient, scalars
    rel_variance: jax.Array  # sum over entries of the draws' variance / |g|^2


def _checked(model: RNN, params: RNNParams, xs, targets, loss, method, state):
    """Validated, time-major ``(estimator, xs, targets, state)`` for a one-sequence measurement."""
    estimator = model.estimator(method)
    xs, state, _ = model.check_inputs(params, xs, state)
    targets = model.check_targets((xs.shape[0], xs.shape[1], model.output_size), targets, loss)
    model.check_estimator(estimator, params, xs.shape[1])
    return estimator, xs, targets, state


def estimator_alignment(model: RNN, params: RNNParams, xs: jax.Array, targets: jax.Array,
                        method: Method | Estimator, loss: LossName = "half_sse", *,
                        key: jax.Array, draws: int = 1,
                        state: State | None = None) -> DrawAlignment:
    """The estimator's gradient over ``draws`` random draws against BPTT's exact gradient.

    Only the recurrent layers' gradients are compared (the readout's is exact for
    every estimator).

    Args:
        model: the ``RNN`` (one direction).
        params: its parameters.
        xs: inputs, (T, B, D) (``(B, T, D)`` with ``batch_first``).
        targets: as ``model.loss``'s.
        method: an estimator's name or an ``Estimator``.
        loss: the loss's name.
        key: the draws' keys are ``split(key, draws)``.
        draws: N, the number of draws (1 suffices for a deterministic estimator).
        state: the network's state at the window's start (PyTorch's shape, as
            ``apply``'s), e.g. where a stream has brought it; zeros if None. The
            estimators start their own state afresh there, as at a sequence's start.

    Returns:
        A ``DrawAlignment``.
    """
    estimator, xs, targets, state = _checked(model, params, xs, targets, loss, method, state)
    return _draw_alignment(model.time_major(), estimator, loss, params, xs, targets, state,
                           jax.random.split(key, draws))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _draw_alignment(model, estimator, loss, params, xs, targets, state, keys):
    exact = jax.grad(loss_fn, argnums=3)(model, loss, "bptt", params, xs, targets, state, None)
    exact = layers_of(exact)

    def one(k):
        return layers_of(estimated_loss_and_grad(model, estimator, loss, params, xs, targets,
                                                 state, None, k)[1])

    est = jax.lax.map(one, keys)  # (N, ...) per leaf, one draw at a time
    per_draw = alignment(est, jax.tree.map(lambda e: jnp.broadcast_to(e, (keys.shape[0],)
                                                                      + e.shape), exact), 1)
    mean = jax.tree.map(lambda a: a.mean(0), est)
    var = jnp.sum(jnp.var(flatten(est, 1), axis=0)) / jnp.sum(flatten(exact) ** 2)
    return DrawAlignment(per_draw, alignment(mean, exact), var)


def step_alignment(model: RNN, params: RNNParams, xs: jax.Array, targets: jax.Array,
                   method: Method | Estimator, loss: LossName = "half_sse", *,
                   key: jax.Array | None = None, state: State | None = None) -> Alignment:
    r"""Each step's read-out against exact RTRL's, on one trajectory: ``Alignment`` of (T,) arrays.

    Step t compares :math:`(\partial\ell_t/\partial h_t)^\top \hat P_t` with
    :math:`(\partial\ell_t/\partial h_t)^\top P_t`: how well the estimator's
    sensitivities carry the past at that moment (NaN at a step whose exact term is
    zero). Costs RTRL's memory and time as well as the estimator's.

    Args: as ``estimator_alignment``'s, with one ``key`` (None for a deterministic
    estimator) and the ``state`` the window starts from.
    """
    estimator, xs, targets, state = _checked(model, params, xs, targets, loss, method, state)
    return _step_alignment(model.time_major(), Paired(estimator), loss, params, xs, targets,
                           state, key)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _step_alignment(model, paired, loss, params, xs, targets, state, key):
    carries0 = model.initial_carries(state, xs.shape[1], xs.dtype)
    readout = estimators.Readout(params.readout.weight, params.readout.bias)
    *_, (est, exact) = estimators.loss_and_grad(paired, model.cell_fn, layers_of(params),
                                                readout, loss, xs, targets, carries0, None,
                                                key, per_step=True)
    return alignment(est, exact, 1)
