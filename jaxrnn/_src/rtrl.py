r"""``rtrl_loss_and_grad``: exact real-time recurrent learning on an ``RNN``, with the state's gradient.

The method itself lives below the model, in ``jaxrnn._src.estimators.rtrl`` (every
cell and depth, from the cells' ``tangent_step``); this module is its public
entry point from the model, as it was before the estimators existed: the loss,
the parameter gradients and, with ``state_grad``, the initial state's gradient,
all exact, forward in time, nothing stored per step:

.. math::
    P_t = \frac{\partial s_t}{\partial \theta} = J_t P_{t-1} + M_t, \qquad
    \frac{\partial L}{\partial \theta} = \sum_t
    \Big(\frac{\partial \ell_t}{\partial h_t}\Big)^{\!\top} P_t .

Memory :math:`B n S` (n parameters, S state entries per example) whatever T is;
each step costs n tangents of the step, :math:`O(H^4)` for one layer. That is why
RTRL is for small models; it refuses above ``MAX_SENSITIVITY_ELEMENTS``.
"""

from __future__ import annotations

from typing import Any, Literal, overload

import jax

from jaxrnn._src import estimators
from jaxrnn._src import losses as losses_lib
from jaxrnn._src import validation
from jaxrnn._src.estimators.rtrl import RTRL
from jaxrnn._src.model import RNN, RNNParams, State, estimated_loss_and_grad
from jaxrnn._src.names import LossName

# Refuse when the sensitivities and their work arrays would hold more elements
# than this (estimators.MAX_STATE_ELEMENTS: 400 MB in float64).
MAX_SENSITIVITY_ELEMENTS = estimators.MAX_STATE_ELEMENTS


def sensitivity_size(batch: int, input_size: int, hidden_size: int, bias: bool = True,
                     state_grad: bool = False) -> int:
    r"""Elements of the sensitivities RTRL carries for a one-layer Elman model.

    :math:`B H n [+ B H^2]` with :math:`n = H D + H^2 [+ 2H]` parameters (the
    general rule, every cell and depth: ``RTRL().cost``).

    Args:
        batch: B.
        input_size: D.
        hidden_size: H.
        bias: the layer has biases ``b_ih`` and ``b_hh``.
        state_grad: the initial state's sensitivity ``S (B, H, H)`` is carried too.
    """
    B, D, H = batch, input_size, hidden_size
    n = H * D + H * H + (2 * H if bias else 0)  # recurrent parameters, flattened
    return B * H * n + (B * H * H if state_grad else 0)


def check_model(model, batch: int | None = None, state_grad: bool = False,
                max_elements: int = MAX_SENSITIVITY_ELEMENTS, params=None) -> None:
    """Checks that RTRL supports ``model`` (and, given ``batch`` and ``params``, its size).

    Args:
        model: an ``RNN``.
        batch: B; None checks the cell, layers and directions only.
        state_grad: the initial state's sensitivity is carried too.
        max_elements: the limit on the sensitivities' and their work arrays' elements.
        params: the model's parameters (for the size check with ``batch``).

    Raises:
        ValueError: a bidirectional model, a ``compute_dtype``, or (with ``batch``
            and ``params``) sensitivities above ``max_elements``; the message says
            why and suggests ``method='bptt'``.
    """
    estimator = RTRL(state_grad=state_grad)
    if batch is None or params is None:
        estimators.check_model(estimator, model.cell_fn, model.num_layers, model.bidirectional,
                               model.compute_dtype)
    else:
        model.check_estimator(estimator, params, batch, max_elements)


@overload
def rtrl_loss_and_grad(model: RNN, params: RNNParams, xs: jax.Array, targets: jax.Array,
                       loss: LossName = ..., state: State | None = ...,
                       lengths: jax.Array | None = ..., *, last_only: bool = ...,
                       state_grad: Literal[False] = ...,
                       max_elements: int = ...) -> tuple[jax.Array, RNNParams]: ...
@overload
def rtrl_loss_and_grad(model: RNN, params: RNNParams, xs: jax.Array, targets: jax.Array,
                       loss: LossName = ..., state: State | None = ...,
                       lengths: jax.Array | None = ..., *, last_only: bool = ...,
                       state_grad: Literal[True],
                       max_elements: int = ...) -> tuple[jax.Array, RNNParams, jax.Array]: ...
def rtrl_loss_and_grad(model: RNN, params: RNNParams, xs: jax.Array, targets: jax.Array,
                       loss: LossName = "half_sse", state: State | None = None,
                       lengths: jax.Array | None = None, *, last_only: bool = False,
                       state_grad: bool = False,
                       max_elements: int = MAX_SENSITIVITY_ELEMENTS) -> Any:
    r"""The loss and its exact gradient by real-time recurrent learning; jit-compiled.

    Forward in time only (see the module docstring for the math): the
    sensitivities :math:`P_t = \partial s_t/\partial\theta` are updated step by
    step and the gradient accumulated online as :math:`\sum_t (\partial \ell_t /
    \partial h_t)^\top P_t`. Equal to ``model.loss_and_grad(method="bptt")`` and
    ``method="autodiff"`` up to rounding; ``model.loss_and_grad(method="rtrl")`` is
    this without the state's gradient.

    Args:
        model: an ``RNN`` of any cell and depth, ``bidirectional=False``, no
            ``compute_dtype``.
        params: its parameters.
        xs: inputs, (T, B, input_size), time-major.
        targets: (T, B, O) floats for ``"half_sse"``/``"mse"``; (T, B) integer
            classes for ``"xent"``.
        loss: ``"half_sse"``, ``"mse"`` or ``"xent"``.
        state: initial state, (L, B, H) (a pair for the LSTM); zeros if None.
        lengths: optional integer (B,) in [1, T].
        last_only: score only the last step (as ``model.loss_fn(last_only=True)``).
        state_grad: also return the gradient wrt the initial state (carries
            :math:`\partial s_t / \partial s_0`, B S^2 more elements).
        max_elements: refuse above this many sensitivity elements.

    Returns:
        ``(loss, grads)``, ``grads`` an ``RNNParams`` like ``params``; with
        ``state_grad``, ``(loss, grads, dstate)``, ``dstate`` in the state's shape.

    Raises:
        ValueError: ``bidirectional``, a ``compute_dtype``, a model
            above ``max_elements`` (with the memory and time it would need), or bad
            inputs (as ``model.loss_and_grad``); ``last_only`` with ``lengths``.
        TypeError: bad dtypes, as ``model.loss_and_grad``.
    """
    validation.check_readout(model.output_size, "rtrl_loss_and_grad")
    xs, state, lengths = model.check_inputs(params, xs, state, lengths)
    targets = model.check_targets((xs.shape[0], xs.shape[1], model.output_size), targets, loss,
                                  lengths)
    losses_lib.get_loss(loss)
    if last_only and lengths is not None:
        raise ValueError("last_only scoring takes full-length sequences: lengths must be None")
    check_model(model, xs.shape[1], state_grad, max_elements, params)
    return estimated_loss_and_grad(model, RTRL(state_grad=bool(state_grad)), loss, params, xs,
                                   targets, state, lengths, None, bool(last_only),
                                   bool(state_grad))
