r"""Real-time recurrent learning (RTRL): the exact gradient, forward in time.

A third gradient method beside ``"bptt"`` (reverse scan) and ``"autodiff"``
(``jax.grad``), for a single-layer, unidirectional Elman network. Instead of
storing the sequence and running back through it, RTRL carries forward the
*sensitivity* of the state to every recurrent parameter,

.. math::
    P_t = \frac{\partial h_t}{\partial \theta}, \qquad
    \theta = (W_{ih}, W_{hh}, b), \qquad P_0 = 0,

and updates it with the step's Jacobians (:math:`a_t = W_{ih} x_t + b_{ih} +
W_{hh} h_{t-1} + b_{hh}`, :math:`h_t = \phi(a_t)`):

.. math::
    P_t = \mathrm{diag}(\phi'(a_t))\,\Big(\frac{\partial a_t}{\partial \theta}
          + W_{hh} P_{t-1}\Big), \qquad
    \frac{\partial a_t}{\partial W_{ih}[i, j]} = e_i\, x_t[j], \quad
    \frac{\partial a_t}{\partial W_{hh}[i, j]} = e_i\, h_{t-1}[j], \quad
    \frac{\partial a_t}{\partial b[i]} = e_i .

The gradient is accumulated online from each step's *immediate* loss gradient
(through the readout :math:`y_t = W_{hy} h_t + b_y` only):

.. math::
    \frac{\partial L}{\partial \theta}
    = \sum_t \Big(\frac{\partial \ell_t}{\partial h_t}\Big)^{\!\top} P_t, \qquad
    \frac{\partial \ell_t}{\partial h_t} = W_{hy}^\top \delta y_t, \qquad
    \frac{\partial L}{\partial W_{hy}} = \sum_t \delta y_t h_t^\top, \quad
    \frac{\partial L}{\partial b_y} = \sum_t \delta y_t,

where :math:`L = \sum_t \ell_t` (``half_sse`` is a sum over the steps; ``mse`` and
``xent`` are means, so each step's term is divided by the number of valid
``(t, b, o)`` or ``(t, b)`` positions of the whole batch). ``b_ih`` and ``b_hh``
enter :math:`a_t` identically, so one sensitivity serves both and their
gradients are equal. The gradient of the initial state is carried the same way,
:math:`S_t = \partial h_t / \partial h_0 = \mathrm{diag}(\phi'(a_t)) W_{hh} S_{t-1}`,
:math:`S_0 = I`.

Nothing is stored per step: memory is :math:`O(B H \cdot H (H + D))` whatever
``T`` is, and each step costs :math:`O(B H^2 \cdot H (H + D))`, i.e.
:math:`O(H^4)`. That is why RTRL is for small models; ``rtrl_loss_and_grad``
refuses above ``MAX_SENSITIVITY_ELEMENTS``. Steps past a sequence's length
(``lengths``) leave the state and the sensitivities unchanged and add no loss.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Literal, overload

import jax
import jax.numpy as jnp

from jaxrnn._src import losses as losses_lib
from jaxrnn._src.cells import CellParams
from jaxrnn._src.names import LossName

if TYPE_CHECKING:  # model imports this module lazily; types only
    from jaxrnn._src.model import RNN, RNNParams, State

# Refuse when the sensitivities P (and S) would hold more elements than this:
# 5e7 is 400 MB in float64 for P alone, and the update makes a few temporaries
# of the same size.
MAX_SENSITIVITY_ELEMENTS = 50_000_000


def sensitivity_size(batch: int, input_size: int, hidden_size: int, bias: bool = True,
                     state_grad: bool = False) -> int:
    r"""Elements of the sensitivities RTRL carries: :math:`B H (H D + H^2 [+ H]) [+ B H^2]`.

    Args:
        batch: B.
        input_size: D.
        hidden_size: H.
        bias: the layer has biases (one shared sensitivity for ``b_ih`` and ``b_hh``).
        state_grad: the initial state's sensitivity ``S (B, H, H)`` is carried too.
    """
    B, D, H = batch, input_size, hidden_size
    n = H * D + H * H + (H if bias else 0)  # recurrent parameters, flattened
    return B * H * n + (B * H * H if state_grad else 0)


def check_model(model, batch: int | None = None, state_grad: bool = False,
                max_elements: int = MAX_SENSITIVITY_ELEMENTS) -> None:
    """Checks that RTRL supports ``model`` (and, given ``batch``, its size limit).

    Args:
        model: an ``RNN``.
        batch: B; None checks the cell, layers and directions only.
        state_grad: the initial state's sensitivity is carried too.
        max_elements: the limit on the sensitivities' elements.

    Raises:
        ValueError: another cell, ``num_layers`` > 1, ``bidirectional``, a
            ``compute_dtype``, or (with
            ``batch``) sensitivities above ``max_elements``; the message says why and
            suggests ``method='bptt'``.
    """
    if model.cell != "elman":
        raise ValueError(f"method='rtrl' supports cell='elman' only, got cell={model.cell!r}; "
                         f"use method='bptt'")
    if model.num_layers != 1:
        raise ValueError(f"method='rtrl' supports num_layers=1 only, got "
                         f"num_layers={model.num_layers}; use method='bptt'")
    if model.bidirectional:
        raise ValueError("method='rtrl' runs forward in time: bidirectional=True is not "
                         "supported; use method='bptt'")
    if model.compute_dtype is not None:
        raise ValueError(f"method='rtrl' computes in the parameters' dtype: "
                         f"compute_dtype={model.compute_dtype!r} is not supported; use "
                         f"method='bptt'")
    if batch is None:
        return
    n = sensitivity_size(batch, model.input_size, model.hidden_size, model.bias, state_grad)
    if n > max_elements:
        raise ValueError(
            f"method='rtrl' is too large for this model: its sensitivities dh_t/dtheta hold "
            f"B*H*(H*D + H*H + H) = {n:,} elements for B={batch}, H={model.hidden_size}, "
            f"D={model.input_size} (limit max_elements={max_elements:,}); RTRL needs memory "
            f"O(B H^2 (H + D)) and time O(B H^4) per step. Use method='bptt' (or a smaller "
            f"hidden_size or batch)")


def _step_loss(loss: str, y, target, scored, count):
    r"""One step's term of the loss and its gradient wrt the outputs, by hand.

    Args:
        loss: ``"half_sse"``, ``"mse"`` or ``"xent"``.
        y: outputs at step t, (B, O).
        target: (B, O) floats, or (B,) integer classes for ``"xent"``.
        scored: boolean (B,): the positions this step contributes.
        count: the loss's divisor (1 for ``"half_sse"``).

    Returns:
        ``(l_t, dy_t)``: a scalar and (B, O), with :math:`\sum_t l_t = L`.
    """
    s = scored[:, None]
    if loss == "xent":
        logp = jax.nn.log_softmax(y)  # (B, O)
        in_range = (target >= 0) & (target < y.shape[-1])  # as losses.xent: else NaN
        nll = -jnp.take_along_axis(logp, jnp.where(in_range, target, 0)[:, None],
                                   axis=-1)[:, 0]  # -log p(target), (B,)
        nll = jnp.where(in_range, nll, jnp.nan)
        l_t = jnp.sum(jnp.where(scored, nll, 0)) / count  # averaged over the valid (t, b)
        onehot = jax.nn.one_hot(target, y.shape[-1], dtype=y.dtype)  # (B, O)
        dy = jnp.where(s, jnp.exp(logp) - onehot, 0) / count  # d(-log softmax)/dy = p - onehot
        return l_t, dy
    e = jnp.where(s, y - target, 0)  # residual, zero where not scored
    if loss == "half_sse":
        return 0.5 * jnp.sum(e * e), e  # d(1/2 e^2)/dy = e
    return jnp.sum(e * e) / count, 2 * e / count  # mse: d(e^2 / n)/dy = 2 e / n


def _masks(T: int, B: int, lengths, last_only: bool):
    """Which ``(t, b)`` positions the recurrence runs over, and which the loss scores.

    Args:
        T, B: the sequence length and the batch size.
        lengths: integer (B,) in [1, T], or None (every sequence is T long).
        last_only: score only the last step.

    Returns:
        ``(valid, scored)``, boolean (T, B) each.
    """
    valid = (jnp.ones((T, B), bool) if lengths is None
             else jnp.arange(T)[:, None] < lengths[None, :])  # (T, B)
    scored = valid if not last_only else valid & (jnp.arange(T) == T - 1)[:, None]
    return valid, scored


def _divisor(loss: str, scored, output_size: int, dtype):
    """The loss's divisor: 1 for a sum, else the count of valid positions of the batch.

    Args:
        loss: ``"half_sse"``, ``"mse"`` or ``"xent"``.
        scored: boolean (T, B), the positions the loss scores.
        output_size: O.
        dtype: the divisor's dtype.

    Returns:
        A scalar: 1 (``"half_sse"``), the valid ``(t, b, o)`` (``"mse"``) or ``(t, b)``
        (``"xent"``) positions, at least 1.
    """
    if loss == "half_sse":
        return jnp.ones((), dtype)  # a sum: no divisor
    if loss == "mse":
        return jnp.maximum(jnp.sum(scored), 1).astype(dtype) * output_size  # valid (t, b, o)
    return jnp.maximum(jnp.sum(scored), 1).astype(dtype)  # valid (t, b)


def _sensitivity_step(model, cell: CellParams, eye, h_prev, P, S, x, m):
    r"""One step of the recurrence and of its sensitivities (the module's :math:`P_t`, :math:`S_t`).

    Args:
        model: the ``RNN`` (its ``bias`` and ``nonlinearity``).
        cell: the layer's ``CellParams``: ``w_ih`` (H, D), ``w_hh`` (H, H), biases (H,).
        eye: the identity, (H, H).
        h_prev: :math:`h_{t-1}`, (B, H).
        P: :math:`\partial h_{t-1} / \partial\theta`, (B, H, n), ``n = H D + H H [+ H]``.
        S: :math:`\partial h_{t-1} / \partial h_0`, (B, H, H), or None (not carried).
        x: :math:`x_t`, (B, D).
        m: boolean (B,): the sequences still running at step t.

    Returns:
        ``(h, P, S)`` at step t, shapes as given; frozen where ``m`` is false.
    """
    B, D = x.shape
    H = eye.shape[0]
    a = x @ cell.w_ih.T + h_prev @ cell.w_hh.T  # a_t = W_ih x_t + W_hh h_{t-1} (+ b)
    if model.bias:
        a = a + cell.b_ih + cell.b_hh
    if model.nonlinearity == "tanh":
        h = jnp.tanh(a)  # h_t = tanh(a_t)
        dphi = 1 - h * h  # tanh'(a_t) = 1 - h_t^2
    else:
        h = jax.nn.relu(a)  # h_t = relu(a_t)
        dphi = (h > 0).astype(x.dtype)  # relu'(a_t) = [a_t > 0]
    # da_t/dtheta, (B, H, n): row k of W_ih x_t is sum_j W_ih[k, j] x_t[j], so
    # d a_t[k] / d W_ih[i, j] = [k = i] x_t[j], and likewise for W_hh with h_{t-1}.
    direct = [(eye[None, :, :, None] * x[:, None, None, :]).reshape(B, H, H * D),
              (eye[None, :, :, None] * h_prev[:, None, None, :]).reshape(B, H, H * H)]
    if model.bias:
        direct.append(jnp.broadcast_to(eye, (B, H, H)))  # d a_t[k] / d b[i] = [k = i]
    direct = jnp.concatenate(direct, axis=-1)
    # P_t = diag(phi'(a_t)) (da_t/dtheta + W_hh P_{t-1}): the chain rule through h_{t-1}
    P_new = dphi[:, :, None] * (direct + jnp.einsum("km,bmn->bkn", cell.w_hh, P))
    mk = m[:, None, None]
    P = jnp.where(mk, P_new, P)  # past the length: frozen
    if S is not None:
        # S_t = diag(phi'(a_t)) W_hh S_{t-1}: h_0 acts only through h_{t-1}
        S = jnp.where(mk, dphi[:, :, None] * jnp.einsum("km,bmn->bkn", cell.w_hh, S), S)
    h = jnp.where(m[:, None], h, h_prev)  # past the length: frozen
    return h, P, S


def _read_out(loss: str, readout, count, h, P, S, target, sc, acc):
    r"""Adds step t's loss term and its immediate gradient (through the readout only).

    Args:
        loss: ``"half_sse"``, ``"mse"`` or ``"xent"``.
        readout: ``ReadoutParams``: ``weight`` :math:`W_{hy}` (O, H), ``bias`` (O,) or None.
        count: the loss's divisor (``_divisor``).
        h: :math:`h_t`, (B, H).
        P: :math:`\partial h_t / \partial\theta`, (B, H, n).
        S: :math:`\partial h_t / \partial h_0`, (B, H, H), or None.
        target: (B, O) floats, or (B,) integer classes for ``"xent"``.
        sc: boolean (B,): the positions step t scores.
        acc: the sums so far, ``(g (n,), gS (B, H) or None, gW (O, H), gb (O,) or None,
            L ())``: dL/dtheta flattened, dL/dh_0, dL/dW_hy, dL/db_y and L.

    Returns:
        ``acc`` with step t's terms added.
    """
    g, gS, gW, gb, L = acc
    W, b_y = readout.weight, readout.bias
    y = h @ W.T  # y_t = W_hy h_t (+ b_y)
    if b_y is not None:
        y = y + b_y
    l_t, dy = _step_loss(loss, y, target, sc, count)  # dl_t/dy_t, zero where not scored
    dh = dy @ W  # dl_t/dh_t = W_hy^T dy_t
    g = g + jnp.einsum("bk,bkn->n", dh, P)  # dL/dtheta += (dl_t/dh_t)^T P_t, summed over b
    if S is not None:
        gS = gS + jnp.einsum("bk,bkn->bn", dh, S)  # dL/dh_0 += (dl_t/dh_t)^T S_t, per b
    gW = gW + dy.T @ h  # dL/dW_hy += dy_t^T h_t
    if gb is not None:
        gb = gb + dy.sum(axis=0)  # dL/db_y += sum_b dy_t
    return g, gS, gW, gb, L + l_t


def _assemble(params, g, gW, gb, input_size: int, bias: bool):
    """The parameter gradients as an ``RNNParams`` like ``params``.

    Args:
        params: the model's ``RNNParams``.
        g: dL/dtheta flattened as ``[W_ih (H*D), W_hh (H*H), b (H)]``, (n,).
        gW: dL/dW_hy, (O, H).
        gb: dL/db_y, (O,), or None.
        input_size: D.
        bias: the layer has biases.

    Returns:
        ``RNNParams``; ``b_ih`` and ``b_hh`` get the same gradient (one sensitivity).
    """
    D = input_size
    H = params.layers[0][0].w_hh.shape[0]
    g_ih = g[:H * D].reshape(H, D)
    g_hh = g[H * D:H * D + H * H].reshape(H, H)
    g_b = g[H * D + H * H:] if bias else None  # b_ih and b_hh: the same sensitivity
    return params._replace(
        layers=((CellParams(g_ih, g_hh, g_b, g_b),),),
        readout=params.readout._replace(weight=gW, bias=gb))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _rtrl(model, loss: str, last_only: bool, state_grad: bool, params, xs, targets, state,
          lengths):
    """``rtrl_loss_and_grad`` after validation: one forward scan, nothing stored per step."""
    T, B, D = xs.shape
    H = model.hidden_size
    cell = params.layers[0][0]
    W, b_y = params.readout.weight, params.readout.bias  # (O, H), (O,)
    dtype = xs.dtype
    valid, scored = _masks(T, B, lengths, last_only)
    count = _divisor(loss, scored, W.shape[0], dtype)
    # past each length the inputs and targets may hold anything (NaN): they reach nothing
    xs, targets = losses_lib.zero_masked(xs, valid), losses_lib.zero_masked(targets, valid)

    eye = jnp.eye(H, dtype=dtype)
    h0 = jnp.zeros((B, H), dtype) if state is None else state[0]
    n = H * D + H * H + (H if model.bias else 0)
    P0 = jnp.zeros((B, H, n), dtype)  # dh_0/dtheta = 0: theta has not acted yet
    S0 = jnp.broadcast_to(eye, (B, H, H)) if state_grad else None  # dh_0/dh_0 = I
    G0 = (jnp.zeros((n,), dtype),  # dL/dtheta, flattened [W_ih, W_hh, b]
          jnp.zeros((B, H), dtype) if state_grad else None,  # dL/dh_0
          jnp.zeros_like(W), None if b_y is None else jnp.zeros_like(b_y),  # dL/dW_hy, dL/db_y
          jnp.zeros((), dtype))  # L

    def body(carry, inputs):
        h_prev, P, S, acc = carry
        x, target, m, sc = inputs  # x_t (B, D), target_t, valid (B,), scored (B,)
        h, P, S = _sensitivity_step(model, cell, eye, h_prev, P, S, x, m)
        acc = _read_out(loss, params.readout, count, h, P, S, target, sc, acc)
        return (h, P, S, acc), None

    (_, _, _, (g, gS, gW, gb, L)), _ = jax.lax.scan(
        body, (h0, P0, S0, G0), (xs, targets, valid, scored))
    grads = _assemble(params, g, gW, gb, D, model.bias)
    if state_grad:
        return L, grads, gS[None]  # (1, B, H), the state's shape
    return L, grads


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
    sensitivities :math:`P_t = \partial h_t/\partial\theta` are updated step by
    step and the gradient accumulated online as :math:`\sum_t (\partial \ell_t /
    \partial h_t)^\top P_t`. Equal to ``model.loss_and_grad(method="bptt")`` and
    ``method="autodiff"`` up to rounding.

    Args:
        model: an ``RNN`` with ``cell="elman"`` (tanh or relu), ``num_layers=1``,
            ``bidirectional=False``.
        params: its parameters.
        xs: inputs, (T, B, input_size), time-major.
        targets: (T, B, O) floats for ``"half_sse"``/``"mse"``; (T, B) integer
            classes for ``"xent"``.
        loss: ``"half_sse"``, ``"mse"`` or ``"xent"``.
        state: initial state, (1, B, H); zeros if None.
        lengths: optional integer (B,) in [1, T].
        last_only: score only the last step (as ``model.loss_fn(last_only=True)``).
        state_grad: also return the gradient wrt the initial state (carries
            :math:`\partial h_t / \partial h_0`, B H^2 more elements).
        max_elements: refuse above this many sensitivity elements.

    Returns:
        ``(loss, grads)``, ``grads`` an ``RNNParams`` like ``params``; with
        ``state_grad``, ``(loss, grads, dstate)``, ``dstate`` (1, B, H).

    Raises:
        ValueError: another cell, ``num_layers`` > 1, ``bidirectional``, a model
            above ``max_elements`` (with the memory and time it would need), or bad
            inputs (as ``model.loss_and_grad``); ``last_only`` with ``lengths``.
        TypeError: bad dtypes, as ``model.loss_and_grad``.
    """
    xs, state, lengths = model.check_inputs(params, xs, state, lengths)
    check_model(model, xs.shape[1], state_grad, max_elements)
    targets = model.check_targets((xs.shape[0], xs.shape[1], model.output_size), targets, loss,
                                  lengths)
    losses_lib.get_loss(loss)
    if last_only and lengths is not None:
        raise ValueError("last_only scoring takes full-length sequences: lengths must be None")
    return _rtrl(model, loss, bool(last_only), bool(state_grad), params, xs, targets, state,
                 lengths)
