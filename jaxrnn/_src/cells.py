r"""Recurrent cells: parameters, initialisation, forward step, hand-derived backward step.

Every cell shares one parameter layout, PyTorch's (``nn.RNN``, ``nn.LSTM``,
``nn.GRU``), with the gate blocks stacked along the first axis::

    w_ih (G*H, D)   w_hh (G*H, H)   b_ih (G*H,)   b_hh (G*H,)

where ``G`` is the number of gate blocks (1 for Elman, 4 for LSTM, 3 for GRU). The
projected LSTM (``ProjectedLSTM``, PyTorch's ``proj_size=P``) has ``w_hh (4H, P)``
and a fifth matrix, ``w_hr (P, H)``.

The work of a layer is split so that the sequential part is as small as possible:

* the input projection ``xp_t = W_ih x_t + b_ih`` for *all* steps is one matrix
  product before the loop (``scan.project_inputs``);
* ``step(params, carry, xp_t) -> (carry, residuals)`` is the recurrence;
* ``backward_step(params, carry_prev, carry, residuals, dcarry) ->
  (dcarry_prev, dgi, dgh)`` is its hand-derived derivative. ``dcarry`` is the
  *total* cotangent of the carry at step t (the loss's ``dh_t`` already added);
  ``dgi`` is the cotangent of the input pre-activation ``xp_t`` (it gives
  ``dW_ih``, ``db_ih`` and ``dx_t``) and ``dgh`` the cotangent of the recurrent
  pre-activation ``W_hh h_{t-1} + b_hh`` (it gives ``dW_hh`` and ``db_hh``).
  Weight gradients are *not* formed here: ``scan.py`` forms them after the loop
  as single matrix products over all steps.

A carry is always a tuple whose first element is the hidden state ``h``
(``(h,)`` for Elman and GRU, ``(h, c)`` for LSTM), so the generic scan can read
and add to ``h`` without knowing the cell.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jaxrnn._src.validation import check_forget_bias, check_int, check_nonlinearity

Carry = tuple[jax.Array, ...]


class CellParams(NamedTuple):
    """Parameters of one recurrent layer in one direction, PyTorch's layout."""

    w_ih: jax.Array  # (G*H, D)
    w_hh: jax.Array  # (G*H, H)
    b_ih: jax.Array | None  # (G*H,), or None without bias
    b_hh: jax.Array | None  # (G*H,), or None without bias


class Outer(NamedTuple):
    r"""A parameter gradient that the generic reverse scan forms after the loop.

    A ``backward_step`` may return it for a parameter of shape (M, K): the
    parameter's gradient is then :math:`\sum_t dg_t^\top a_t`, formed once, after the
    loop, as one (M, K) product over all T*B rows (as ``dW_ih`` and ``dW_hh`` are),
    instead of one small product per step.
    """

    dg: jax.Array  # (B, M): step t's cotangent side (zeroed by the scan where masked)
    a: jax.Array  # (B, K): step t's input side


@dataclasses.dataclass(frozen=True)
class Cell:
    r"""A recurrent cell: the extension point of jaxrnn (subclass it for your own cell).

    A cell is a frozen dataclass (hashable: a static ``jax.jit`` argument) whose
    fields are its static options. Pass an instance as ``RNN(cell=MyCell(), ...)``:
    it then goes through every path the built-in cells do (layers, directions,
    lengths, initial states, dropout, ``bptt_segment``, ``method="bptt"`` and
    ``"autodiff"``, training steps, diagnostics, checkpoints), and
    ``jaxrnn.check_cell`` checks its ``backward_step`` against ``jax.vjp`` of its
    ``step``. Shapes below: ``B`` batch, ``D`` input size, ``H`` hidden size,
    ``G = num_gates``.

    **Class attributes.** ``name`` (str); ``num_gates`` G, the number of (H,)
    blocks of the input projection; ``carry_size``, the number of arrays in the
    carry; ``residual_over_input`` (default False): see its comment below, a speed
    option only; ``fold_recurrent_bias``: True when the recurrent pre-activation enters
    the step only added to the input projection, so that ``dgh`` *is* ``dgi``
    (Elman, LSTM): the scan then adds ``b_hh`` to the input projection and keeps
    one of the two cotangents; False when they differ (GRU: its n block is scaled
    by r).

    **Parameters.** ``init(key, input_size, hidden_size, bias, dtype)`` returns a
    ``NamedTuple`` with at least the fields ``w_ih (G*H, D)``, ``w_hh``,
    ``b_ih (G*H,)`` and ``b_hh`` (either bias may be None). The default gives
    ``CellParams`` with PyTorch's layout and initialisation, ``w_hh (G*H, H)``. A
    cell may return its own NamedTuple with more fields (gains, peephole weights,
    ...), or with a ``w_hh`` that is not a matrix; every array field must then get
    its gradient from ``backward_step``'s fourth value (below).

    **Forward.** The scan computes ``xp_t = x_t W_ih^T + b_ih`` (+ ``b_hh`` when
    folded), (B, G*H), and calls ``step(params, carry, xp_t) -> (carry_t,
    residuals_t)``. ``carry`` is a tuple of ``carry_size`` arrays whose first is the
    output ``h (B, state_sizes(H)[0])``; ``residuals_t`` is any pytree of arrays with
    a leading batch axis, stored for every step. ``recurrent_preactivation(params,
    h_prev)`` gives ``h_{t-1} W_hh^T`` (+ ``b_hh`` when not folded), (B, G*H).

    **Backward.** ``backward_step(params, carry_prev, carry, residuals, dcarry)``
    receives the carry before and after step t, the step's residuals and ``dcarry``,
    the *total* cotangent of ``carry_t`` (the loss's ``dL/dh_t`` already added to the
    first part), and returns

    * ``dcarry_prev``: the cotangent of ``carry_{t-1}``, shaped like ``carry``;
    * ``dgi (B, G*H)``: the cotangent of ``xp_t``; the scan forms ``dW_ih``,
      ``db_ih`` and ``dx_t`` from it, after the loop;
    * ``dgh (B, G*H)``: the cotangent of the recurrent pre-activation; the scan
      forms ``dW_hh = sum_t dgh_t^T h_{t-1}`` (when ``w_hh`` is a matrix) and
      ``db_hh`` from it;
    * optionally a fourth value, a dict ``{field: gradient of step t}`` for the
      parameters the scan does not handle (or overrides): either an array of shape
      ``(B,) + field.shape``, one term per example, which the scan masks and sums
      over the batch and the steps inside the loop (small parameters: vectors), or
      an ``Outer(dg (B, M), a (B, K))`` for an (M, K) field, formed after the loop.

    The weight matrices' gradients are never formed per step: that is what keeps
    the large products out of the loop.

    **Forward mode** (optional). ``tangent_step(params, carry_prev, xp, carry, res,
    dparams, dcarry_prev, dxp) -> dcarry`` is ``step``'s directional derivative:
    the tangent of ``carry_t`` given the tangents of the parameters, of
    ``carry_{t-1}`` and of ``xp_t`` (the scan forms ``dxp_t`` from those of ``x_t``,
    ``W_ih`` and the biases, for all steps at once), reading the stored ``carry_t``
    and residuals as ``backward_step`` does. ``jax.jvp``, ``jax.linearize`` and
    ``jax.jacfwd`` through ``method="bptt"`` run it in the tangent scan. The default
    is ``jax.jvp`` of ``step`` (exact, recomputing the step); the built-in cells
    write theirs by hand, and ``jaxrnn.check_cell`` checks either against
    ``jax.jvp``.
    """

    name: ClassVar[str] = "cell"
    num_gates: ClassVar[int] = 1
    carry_size: ClassVar[int] = 1  # number of arrays in the carry
    # True when b_hh can be folded into the input projection (it enters the
    # pre-activation additively); False for the GRU's n-gate, which scales it by r.
    fold_recurrent_bias: ClassVar[bool] = True
    # True lets the forward scan store the first residual leaf shaped like xp_t (B, G*H)
    # over the input projection's own buffer (no second (T, B, G*H) buffer, no zero
    # fill). Safe for speed only when that leaf is an elementwise function of xp_t
    # (the built-in LSTM, GRU and peephole cells): otherwise XLA copies the whole
    # buffer at every step, quadratic in T (the layer-norm LSTM: 378 vs 119 ms for a
    # gradient at T=200, B=32, H=128). Off by default.
    residual_over_input: ClassVar[bool] = False

    def init(self, key: jax.Array, input_size: int, hidden_size: int, bias: bool = True,
             dtype=jnp.float32) -> CellParams:
        """PyTorch's initialisation: every entry ~ U(-1/sqrt(H), 1/sqrt(H)).

        Args:
            key: a JAX PRNG key.
            input_size: D, features per input step.
            hidden_size: H, hidden units.
            bias: whether to create ``b_ih`` and ``b_hh``.
            dtype: floating dtype of the parameters.

        Returns:
            ``CellParams`` with ``w_ih (G*H, D)``, ``w_hh (G*H, H)`` and biases
            ``(G*H,)`` or ``None``.
        """
        gh = self.num_gates * hidden_size
        bound = 1.0 / math.sqrt(hidden_size)
        k1, k2, k3, k4 = jax.random.split(key, 4)
        u = lambda k, shape: jax.random.uniform(k, shape, dtype, -bound, bound)  # noqa: E731
        return CellParams(
            w_ih=u(k1, (gh, input_size)),
            w_hh=u(k2, (gh, self.state_sizes(hidden_size)[0])),
            b_ih=u(k3, (gh,)) if bias else None,
            b_hh=u(k4, (gh,)) if bias else None,
        )

    def state_sizes(self, hidden_size: int) -> tuple[int, ...]:
        """The width of each carry part: ``(H,) * carry_size`` unless a cell says otherwise.

        The first is the width of the layer's output ``h``.
        """
        return (hidden_size,) * self.carry_size

    def zero_carry(self, batch: int, hidden_size: int, dtype=jnp.float32) -> Carry:
        """The zero initial carry: ``carry_size`` arrays of shape (B, ``state_sizes(H)[k]``)."""
        return tuple(jnp.zeros((batch, n), dtype) for n in self.state_sizes(hidden_size))

    def recurrent_preactivation(self, params: CellParams, h_prev: jax.Array) -> jax.Array:
        """``W_hh h_{t-1} (+ b_hh unless folded into the input projection)``, (B, G*H).

        Under a compute dtype (mixed precision) ``h_{t-1}``, kept in the carry's
        dtype, is cast to the weights' for the product, as Flax's ``Dense(dtype=...)``
        casts its input.
        """
        if h_prev.dtype != params.w_hh.dtype:
            h_prev = h_prev.astype(params.w_hh.dtype)  # the product in the compute dtype
        gh = h_prev @ params.w_hh.T
        if params.b_hh is not None and not self.fold_recurrent_bias:
            gh = gh + params.b_hh
        return gh

    def recurrent_tangent(self, params: CellParams, h_prev: jax.Array, dparams: CellParams,
                          dh_prev: jax.Array) -> jax.Array:
        """The tangent of ``recurrent_preactivation``: ``dh_{t-1} W_hh^T + h_{t-1} dW_hh^T``
        (``+ db_hh`` unless folded), (B, G*H), in the weights' dtype as the product is."""
        w = params.w_hh
        h_prev, dh_prev = (a if a.dtype == w.dtype else a.astype(w.dtype) for a in (h_prev, dh_prev))
        dgh = dh_prev @ w.T + h_prev @ dparams.w_hh.T  # product rule on h_{t-1} W_hh^T
        if params.b_hh is not None and not self.fold_recurrent_bias:
            dgh = dgh + dparams.b_hh  # + b_hh
        return dgh

    def step(self, params: CellParams, carry: Carry, xp: jax.Array):
        """One step of the recurrence: ``(carry, xp_t (B, G*H)) -> (carry, residuals)``."""
        raise NotImplementedError(f"{type(self).__name__} must define step")

    def tangent_step(self, params: CellParams, carry_prev: Carry, xp: jax.Array, carry: Carry,
                     res, dparams: CellParams, dcarry_prev: Carry, dxp: jax.Array) -> Carry:
        """Forward-mode derivative of ``step``: the tangent of ``carry_t``.

        The default is ``jax.jvp`` of ``step`` at ``(params, carry_prev, xp)`` (it
        recomputes the step and ignores ``carry`` and ``res``); a cell may write its
        own from the stored carry and residuals, as ``backward_step`` reads them.
        """
        step = lambda p, c, x: self.step(p, c, x)[0]  # noqa: E731
        return jax.jvp(step, (params, tuple(carry_prev), xp),
                       (dparams, tuple(dcarry_prev), dxp))[1]

    def backward_step(self, params: CellParams, carry_prev: Carry, carry: Carry, res,
                      dcarry: Carry):
        """Derivative of ``step``: ``-> (dcarry_prev, dgi (B, G*H), dgh (B, G*H)[, dparams])``."""
        raise NotImplementedError(f"{type(self).__name__} must define backward_step")


def split_gates(a: jax.Array, n: int) -> list[jax.Array]:
    return jnp.split(a, n, axis=-1)


def gate_blocks(a: jax.Array, n: int) -> list[jax.Array]:
    """The ``n`` gate blocks of ``a (B, n*H)`` as basic slices, (B, H) each."""
    H = a.shape[-1] // n
    return [a[..., k * H:(k + 1) * H] for k in range(n)]


def gate_constants(scales: tuple[float, ...], H: int, dtype):
    """Per-column ``scale`` and ``offset`` (each (len(scales)*H,)) of the one-tanh activation.

    ``tanh(x * scale) * scale + offset`` is ``sigmoid(x)`` in a block with scale 1/2
    (offset 1/2) and ``tanh(x)`` in a block with scale 1 (offset 0).
    """
    scale = jnp.repeat(jnp.asarray(scales, dtype), H)
    offset = jnp.repeat(jnp.asarray([0.5 if s == 0.5 else 0.0 for s in scales], dtype), H)
    return scale, offset


@dataclasses.dataclass(frozen=True)
class Elman(Cell):
    r"""The Elman (vanilla) cell, ``torch.nn.RNN``.

    .. math::
        a_t = W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh}, \qquad h_t = \phi(a_t)

    with :math:`\phi \in \{\tanh, \mathrm{relu}\}`. Backward, given the total
    :math:`\partial L/\partial h_t` (the loss's own term plus ``dh_next``):

    .. math::
        \delta a_t = \frac{\partial L}{\partial h_t}\,\phi'(a_t), \qquad
        \texttt{dh\_next} = W_{hh}^\top \delta a_t,

    where :math:`\phi'(a_t) = 1 - h_t^2` for tanh and :math:`[h_t > 0]` for relu,
    both read from the stored output :math:`h_t`, so no residual is kept.
    """

    nonlinearity: str = "tanh"

    name: ClassVar[str] = "elman"
    num_gates: ClassVar[int] = 1
    carry_size: ClassVar[int] = 1

    def __post_init__(self):
        check_nonlinearity(self.nonlinearity)

    def _phi(self, a):
        return jnp.tanh(a) if self.nonlinearity == "tanh" else jax.nn.relu(a)

    def step(self, params, carry, xp):
        (h_prev,) = carry
        a = xp + self.recurrent_preactivation(params, h_prev)  # a_t = W_ih x_t + b + W_hh h_{t-1}
        h = self._phi(a)  # h_t = phi(a_t)
        return (h,), ()

    def backward_step(self, params, carry_prev, carry, res, dcarry):
        (h,) = carry
        (dh,) = dcarry  # dL/dh_t: the loss's term at t plus dh_next from t+1
        if self.nonlinearity == "tanh":
            da = dh * (1 - h * h)  # back through tanh: tanh'(a) = 1 - h^2
        else:
            da = jnp.where(h > 0, dh, 0)  # back through relu: relu'(a) = [a > 0] = [h > 0]
        dh_next = da @ params.w_hh  # dL/dh_{t-1} through a_t = ... + W_hh h_{t-1}
        return (dh_next,), da, da

    def tangent_step(self, params, carry_prev, xp, carry, res, dparams, dcarry_prev, dxp):
        (h_prev,), (h,), (dh_prev,) = carry_prev, carry, dcarry_prev
        da = dxp + self.recurrent_tangent(params, h_prev, dparams, dh_prev)  # a_t's tangent
        if self.nonlinearity == "tanh":
            return (da * (1 - h * h),)  # through tanh: tanh'(a) = 1 - h^2
        return (jnp.where(h > 0, da, 0),)  # through relu: [h > 0]


@dataclasses.dataclass(frozen=True)
class Leaky(Cell):
    r"""The leaky RNN (Marschall, Cho & Savin 2020, JMLR): an Elman step, leakily integrated.

    .. math::
        a_t = W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh}, \qquad
        h_t = (1 - \alpha)\, h_{t-1} + \alpha\, \phi(a_t)

    with :math:`\phi \in \{\tanh, \mathrm{relu}\}` and a fixed leak
    :math:`\alpha \in (0, 1]` (the field ``alpha``; :math:`\alpha = 1` is the Elman
    cell). Backward, given the total :math:`\partial L/\partial h_t` (the loss's own
    term plus ``dh_next``):

    .. math::
        \delta a_t = \alpha\, \frac{\partial L}{\partial h_t}\,\phi'(a_t), \qquad
        \texttt{dh\_next} = (1 - \alpha)\, \frac{\partial L}{\partial h_t}
            + W_{hh}^\top \delta a_t,

    where :math:`\phi'(a_t) = 1 - u_t^2` for tanh and :math:`[u_t > 0]` for relu, read
    from the stored residual :math:`u_t = \phi(a_t)` (B, H): unlike Elman's, the
    output :math:`h_t` does not give it. Forward mode, the tangent of :math:`h_t`:
    :math:`(1 - \alpha)\, \dot h_{t-1} + \alpha\, \phi'(a_t)\, \dot a_t`. Parameters and
    initialisation: PyTorch's ``nn.RNN`` (``CellParams``).

    Args:
        nonlinearity: ``"tanh"`` or ``"relu"``.
        alpha: the leak, a real number in (0, 1].
    """

    nonlinearity: str = "tanh"
    alpha: float = 0.5

    name: ClassVar[str] = "leaky"
    num_gates: ClassVar[int] = 1
    carry_size: ClassVar[int] = 1

    def __post_init__(self):
        check_nonlinearity(self.nonlinearity)
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not 0 < a <= 1:
            raise ValueError(f"alpha must be a real number in (0, 1], got {a!r}")
        object.__setattr__(self, "alpha", float(a))  # one spelling: alpha=1 is alpha=1.0

    def step(self, params, carry, xp):
        (h_prev,) = carry
        a = xp + self.recurrent_preactivation(params, h_prev)  # a_t = W_ih x_t + b + W_hh h_{t-1}
        u = jnp.tanh(a) if self.nonlinearity == "tanh" else jax.nn.relu(a)  # u_t = phi(a_t)
        h = (1 - self.alpha) * h_prev + self.alpha * u  # h_t = (1 - alpha) h_{t-1} + alpha u_t
        return (h,), u

    def backward_step(self, params, carry_prev, carry, res, dcarry):
        u = res  # u_t = phi(a_t)
        (dh,) = dcarry  # dL/dh_t: the loss's term at t plus dh_next from t+1
        if self.nonlinearity == "tanh":
            da = self.alpha * dh * (1 - u * u)  # back through alpha tanh(a): tanh'(a) = 1 - u^2
        else:
            da = jnp.where(u > 0, self.alpha * dh, 0)  # back through alpha relu(a): [u > 0]
        # dL/dh_{t-1}: the leak path (1 - alpha) h_{t-1} plus a_t = ... + W_hh h_{t-1}
        dh_next = (1 - self.alpha) * dh + da @ params.w_hh
        return (dh_next,), da, da

    def tangent_step(self, params, carry_prev, xp, carry, res, dparams, dcarry_prev, dxp):
        (h_prev,), (dh_prev,), u = carry_prev, dcarry_prev, res
        da = dxp + self.recurrent_tangent(params, h_prev, dparams, dh_prev)  # a_t's tangent
        if self.nonlinearity == "tanh":
            du = da * (1 - u * u)  # through tanh: tanh'(a) = 1 - u^2
        else:
            du = jnp.where(u > 0, da, 0)  # through relu: [u > 0]
        # h_t = (1 - alpha) h_{t-1} + alpha u_t: the leak path plus alpha phi(a_t)
        return ((1 - self.alpha) * dh_prev + self.alpha * du,)


@dataclasses.dataclass(frozen=True)
class LSTM(Cell):
    r"""Long short-term memory, ``torch.nn.LSTM`` (gates in PyTorch's order i, f, g, o).

    .. math::
        [\hat\imath, \hat f, \hat g, \hat o] = W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh} \\
        i = \sigma(\hat\imath),\ f = \sigma(\hat f),\ g = \tanh(\hat g),\ o = \sigma(\hat o) \\
        c_t = f \odot c_{t-1} + i \odot g, \qquad h_t = o \odot \tanh(c_t)

    Backward, with :math:`\delta h_t, \delta c_t` the total cotangents of the carry:

    .. math::
        \delta c = \delta c_t + \delta h_t \odot o \odot (1 - \tanh^2 c_t) \\
        \delta o = \delta h_t \odot \tanh c_t,\ \delta i = \delta c \odot g,\
        \delta g = \delta c \odot i,\ \delta f = \delta c \odot c_{t-1} \\
        \delta\hat\imath = \delta i\, i(1-i),\ \delta\hat f = \delta f\, f(1-f),\
        \delta\hat g = \delta g\,(1-g^2),\ \delta\hat o = \delta o\, o(1-o) \\
        \delta c_{t-1} = \delta c \odot f, \qquad \delta h_{t-1} = W_{hh}^\top \delta\hat{\text{gates}}

    Residual per step: the activated gates ``[i, f, g, o]`` (B, 4H); ``tanh(c_t)`` is
    recomputed from the carry in the backward step.

    Written for speed (docs/experiments/step_formulations): the four activations are
    one ``tanh`` over the whole (B, 4H) pre-activation, using
    :math:`\sigma(x) = \tfrac12 + \tfrac12\tanh(x/2)`, instead of four slices each
    activated on its own and concatenated again for the residual; the backward step
    likewise applies the activations' derivatives to the whole (B, 4H) array, as
    :math:`\sigma' = \tfrac14 - (\sigma - \tfrac12)^2` and :math:`\tanh' = 1 - g^2`.
    """

    forget_bias: float = 0.0  # added to the forget gate's b_ih at initialisation

    name: ClassVar[str] = "lstm"
    num_gates: ClassVar[int] = 4
    carry_size: ClassVar[int] = 2
    residual_over_input: ClassVar[bool] = True  # the gates: elementwise in xp_t

    def init(self, key, input_size, hidden_size, bias=True, dtype=jnp.float32):
        """PyTorch's initialisation, plus ``forget_bias`` on the forget block of ``b_ih``.

        Raises:
            ValueError: ``forget_bias`` without ``bias``.
        """
        check_forget_bias(self.forget_bias, bias, "b_ih")
        p = super().init(key, input_size, hidden_size, bias, dtype)
        if self.forget_bias:
            H = hidden_size
            p = p._replace(b_ih=p.b_ih.at[H:2 * H].add(self.forget_bias))  # gates i, f, g, o
        return p

    def step(self, params, carry, xp):
        h_prev, c_prev = carry
        H = h_prev.shape[-1]
        pre = xp + self.recurrent_preactivation(params, h_prev)  # all four gates at once
        scale, offset = gate_constants((0.5, 0.5, 1.0, 0.5), H, pre.dtype)
        # i, f, o = sigmoid(.) = 1/2 + 1/2 tanh(./2) and g = tanh(.), in one tanh
        gates = jnp.tanh(pre * scale) * scale + offset
        # jnp.split, not four basic slices: jax.grad (method="autodiff") transposes it
        # into one concatenation, the slices into four zero-padded sums (47 vs 59 ms
        # for an autodiff LSTM layer at T=100, B=32, H=128)
        i, f, g, o = split_gates(gates, 4)
        c = f * c_prev + i * g  # c_t = f c_{t-1} + i g
        h = o * jnp.tanh(c)  # h_t = o tanh(c_t)
        return (h, c), gates

    def backward_step(self, params, carry_prev, carry, res, dcarry):
        _, c_prev = carry_prev
        _, c = carry
        gates = res
        H = c.shape[-1]
        i, f, g, o = gate_blocks(gates, 4)
        dh, dc_next = dcarry  # total dL/dh_t and dL/dc_t (from step t+1)
        tc = jnp.tanh(c)  # tanh(c_t), recomputed rather than stored
        dc = dc_next + dh * o * (1 - tc * tc)  # h_t = o tanh(c_t): add the path through tanh(c_t)
        # c_t = f c_{t-1} + i g and h_t = o tanh(c_t): dL/d[i, f, g, o] = [dc g, dc c_{t-1},
        # dc i, dh tanh(c_t)], as one product of two (B, 4H) concatenations (XLA fuses
        # them into the activation's derivative: 75 vs 104 us/step for four products
        # concatenated, docs/experiments/step_formulations)
        dact = (jnp.concatenate([dc, dc, dc, dh], axis=-1)
                * jnp.concatenate([g, c_prev, i, tc], axis=-1))
        scale, offset = gate_constants((0.5, 0.5, 1.0, 0.5), H, gates.dtype)
        u = gates - offset  # sigma - 1/2 in the sigmoid blocks, g in the tanh block
        dgates = dact * (scale * scale - u * u)  # back through sigmoid (1/4 - u^2), tanh (1 - g^2)
        dh_prev = dgates @ params.w_hh  # through W_hh h_{t-1}
        dc_prev = dc * f  # through f c_{t-1}
        return (dh_prev, dc_prev), dgates, dgates

    def tangent_step(self, params, carry_prev, xp, carry, res, dparams, dcarry_prev, dxp):
        (h_prev, c_prev), (_, c), (dh_prev, dc_prev) = carry_prev, carry, dcarry_prev
        gates = res
        H = c.shape[-1]
        dpre = dxp + self.recurrent_tangent(params, h_prev, dparams, dh_prev)  # gates' input
        scale, offset = gate_constants((0.5, 0.5, 1.0, 0.5), H, gates.dtype)
        u = gates - offset  # sigma - 1/2 in the sigmoid blocks, g in the tanh block
        dgates = dpre * (scale * scale - u * u)  # through sigmoid (1/4 - u^2), tanh (1 - g^2)
        i, f, g, o = gate_blocks(gates, 4)
        di, df, dg, do = gate_blocks(dgates, 4)
        dc = df * c_prev + f * dc_prev + di * g + i * dg  # c_t = f c_{t-1} + i g
        tc = jnp.tanh(c)  # tanh(c_t), recomputed rather than stored
        return (do * tc + o * (1 - tc * tc) * dc, dc)  # h_t = o tanh(c_t)


class LSTMPParams(NamedTuple):
    """Parameters of one projected-LSTM layer in one direction, PyTorch's layout."""

    w_ih: jax.Array  # (4H, D)
    w_hh: jax.Array  # (4H, P): the recurrence reads the projected h_{t-1}
    b_ih: jax.Array | None  # (4H,), or None without bias
    b_hh: jax.Array | None  # (4H,), or None without bias
    w_hr: jax.Array  # (P, H): the projection h_t = W_hr m_t


@dataclasses.dataclass(frozen=True)
class ProjectedLSTM(LSTM):
    r"""LSTM with a projected output, ``torch.nn.LSTM(proj_size=P)`` (Sak et al. 2014).

    The LSTM's recurrence, with its output ``m_t`` projected to ``P < H`` features,
    which are both the layer's output and what the next step's gates read:

    .. math::
        [\hat\imath, \hat f, \hat g, \hat o] = W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh} \\
        c_t = f \odot c_{t-1} + i \odot g, \qquad m_t = o \odot \tanh(c_t), \qquad
        h_t = W_{hr} m_t

    with ``W_hh (4H, P)`` and ``W_hr (P, H)``; the carry is ``(h (B, P), c (B, H))``.
    Backward, with :math:`\delta h_t` (P wide) and :math:`\delta c_t` the total
    cotangents of the carry:

    .. math::
        \delta m_t = W_{hr}^\top \delta h_t, \qquad
        \frac{\partial L}{\partial W_{hr}} = \sum_t \delta h_t^\top m_t

    and then the LSTM's backward step (``LSTM``) with :math:`\delta m_t` in place of
    its :math:`\delta h_t`, which gives :math:`\delta c_{t-1}`, the gate cotangents
    and :math:`\delta h_{t-1} = W_{hh}^\top \delta\hat{\text{gates}}` (P wide). The
    ``W_hr`` gradient is returned as an ``Outer``, so the scan forms it after the
    loop as one product over all steps. Residual per step: the activated gates, as
    the LSTM; ``m_t`` is recomputed from ``o`` and ``c_t`` in the backward step.
    """

    proj_size: int = dataclasses.field(kw_only=True)  # P, 0 < P < H (keyword, required)

    def __post_init__(self):
        P = self.proj_size
        check_int("proj_size", P, 1, context=" for ProjectedLSTM")

    def state_sizes(self, hidden_size: int) -> tuple[int, ...]:
        """``(P, H)``: the carry is ``(h (B, P), c (B, H))``."""
        return (self.proj_size, hidden_size)

    def init(self, key, input_size, hidden_size, bias=True, dtype=jnp.float32) -> LSTMPParams:
        """PyTorch's initialisation: every entry, ``w_hr`` included, ~ U(-1/sqrt(H), 1/sqrt(H)).

        ``forget_bias`` is added to the forget block of ``b_ih``, as for the LSTM.

        Returns:
            ``LSTMPParams`` with ``w_ih (4H, D)``, ``w_hh (4H, P)``, biases ``(4H,)``
            or None, ``w_hr (P, H)``.

        Raises:
            ValueError: ``proj_size`` is not smaller than ``hidden_size``.
        """
        if self.proj_size >= hidden_size:
            raise ValueError(f"proj_size must be smaller than hidden_size={hidden_size} "
                             f"(as PyTorch), got proj_size={self.proj_size}")
        k_lstm, k_hr = jax.random.split(key)
        p = super().init(k_lstm, input_size, hidden_size, bias, dtype)  # w_hh (4H, P): state_sizes
        bound = 1.0 / math.sqrt(hidden_size)
        w_hr = jax.random.uniform(k_hr, (self.proj_size, hidden_size), dtype, -bound, bound)
        return LSTMPParams(*p, w_hr=w_hr)

    def step(self, params, carry, xp):
        h_prev, c_prev = carry  # h_{t-1} (B, P), c_{t-1} (B, H)
        H = c_prev.shape[-1]
        pre = xp + self.recurrent_preactivation(params, h_prev)  # all four gates at once
        scale, offset = gate_constants((0.5, 0.5, 1.0, 0.5), H, pre.dtype)
        # i, f, o = sigmoid(.) = 1/2 + 1/2 tanh(./2) and g = tanh(.), in one tanh (as LSTM.step)
        gates = jnp.tanh(pre * scale) * scale + offset
        i, f, g, o = split_gates(gates, 4)  # jnp.split, as LSTM.step (for jax.grad's transpose)
        c = f * c_prev + i * g  # c_t = f c_{t-1} + i g
        m = o * jnp.tanh(c)  # m_t = o tanh(c_t), the LSTM's output
        h = m @ params.w_hr.T  # h_t = W_hr m_t, (B, P)
        return (h, c), gates

    def backward_step(self, params, carry_prev, carry, res, dcarry):
        _, c = carry
        H = c.shape[-1]
        dh, dc_next = dcarry  # total dL/dh_t (B, P) and dL/dc_t (B, H)
        o = res[..., 3 * H:]  # the output gate, from the stored gates [i, f, g, o]
        m = o * jnp.tanh(c)  # m_t = o tanh(c_t), recomputed rather than stored
        dm = dh @ params.w_hr  # back through h_t = W_hr m_t: dL/dm_t = W_hr^T dh_t
        # the LSTM's backward step from dL/dm_t (its dh): dc_{t-1}, the gates' cotangents,
        # dh_{t-1} = dgates W_hh (B, P); it reads neither h_t nor its width
        dcarry_prev, dgi, dgh = super().backward_step(params, carry_prev, carry, res,
                                                      (dm, dc_next))
        # dL/dW_hr = sum_t dh_t^T m_t: both sides stacked, one product after the loop
        return dcarry_prev, dgi, dgh, {"w_hr": Outer(dg=dh, a=m)}

    def tangent_step(self, params, carry_prev, xp, carry, res, dparams, dcarry_prev, dxp):
        _, c = carry
        H = c.shape[-1]
        # the LSTM's tangent step gives those of m_t = o tanh(c_t) (its h) and c_t
        dm, dc = super().tangent_step(params, carry_prev, xp, carry, res, dparams,
                                      dcarry_prev, dxp)
        m = res[..., 3 * H:] * jnp.tanh(c)  # m_t = o tanh(c_t), recomputed rather than stored
        return (dm @ params.w_hr.T + m @ dparams.w_hr.T, dc)  # h_t = W_hr m_t: product rule


@dataclasses.dataclass(frozen=True)
class GRU(Cell):
    r"""Gated recurrent unit, ``torch.nn.GRU`` (gates in PyTorch's order r, z, n).

    .. math::
        r = \sigma(W_{ir} x + b_{ir} + W_{hr} h + b_{hr}),\quad
        z = \sigma(W_{iz} x + b_{iz} + W_{hz} h + b_{hz}) \\
        n = \tanh(W_{in} x + b_{in} + r \odot (W_{hn} h + b_{hn})),\quad
        h_t = (1 - z) \odot n + z \odot h_{t-1}

    Backward, with :math:`\delta h` the total cotangent of :math:`h_t` and
    :math:`\hat h_n = W_{hn} h_{t-1} + b_{hn}`:

    .. math::
        \delta n = \delta h (1 - z),\ \delta z = \delta h (h_{t-1} - n),\
        \delta\hat n = \delta n (1 - n^2) \\
        \delta r = \delta\hat n \odot \hat h_n,\ \delta\hat h_n = \delta\hat n \odot r,\
        \delta\hat r = \delta r\, r(1-r),\ \delta\hat z = \delta z\, z(1-z) \\
        \delta h_{t-1} = \delta h \odot z + W_{hh}^\top [\delta\hat r, \delta\hat z, \delta\hat h_n]

    The input-side cotangent is ``[dr^, dz^, dn^]`` and the recurrent-side one
    ``[dr^, dz^, dhn^]``: they differ in the n block, so ``b_hh`` is not folded.
    Residuals per step: the activated r, z, n (B, 3H) and ``hn^`` (B, H).

    The step is written as the math reads (``jnp.split``, two sigmoids): the LSTM's
    one-tanh, whole-array form measured no faster for the GRU's handwritten BPTT
    (0.92-1.06x) and made ``jax.grad`` through it 2-13% slower
    (docs/experiments/step_formulations, variant ``one_tanh``).
    """

    name: ClassVar[str] = "gru"
    num_gates: ClassVar[int] = 3
    carry_size: ClassVar[int] = 1
    fold_recurrent_bias: ClassVar[bool] = False
    residual_over_input: ClassVar[bool] = True  # r, z, n: elementwise in xp_t

    def step(self, params, carry, xp):
        (h_prev,) = carry
        gh = self.recurrent_preactivation(params, h_prev)  # W_hh h_{t-1} + b_hh, (B, 3H)
        xr, xz, xn = split_gates(xp, 3)
        hr, hz, hn = split_gates(gh, 3)
        r = jax.nn.sigmoid(xr + hr)  # reset gate
        z = jax.nn.sigmoid(xz + hz)  # update gate
        n = jnp.tanh(xn + r * hn)  # candidate
        h = (1 - z) * n + z * h_prev  # h_t = (1 - z) n + z h_{t-1}
        return (h,), (jnp.concatenate([r, z, n], axis=-1), hn)

    def backward_step(self, params, carry_prev, carry, res, dcarry):
        (h_prev,) = carry_prev
        rzn, hn = res
        r, z, n = split_gates(rzn, 3)
        (dh,) = dcarry  # total dL/dh_t
        dn = dh * (1 - z)  # h_t = (1 - z) n + z h_{t-1}
        dz = dh * (h_prev - n)  # h_t = (1 - z) n + z h_{t-1}
        dan = dn * (1 - n * n)  # back through tanh
        dhn = dan * r  # n's pre-activation holds r * hn
        dar = dan * hn * r * (1 - r)  # through r * hn, then back through sigmoid
        daz = dz * z * (1 - z)  # back through sigmoid
        dgi = jnp.concatenate([dar, daz, dan], axis=-1)  # cotangent of W_ih x + b_ih
        dgh = jnp.concatenate([dar, daz, dhn], axis=-1)  # cotangent of W_hh h + b_hh
        dh_prev = dh * z + dgh @ params.w_hh  # direct path z h_{t-1} plus through W_hh
        return (dh_prev,), dgi, dgh

    def tangent_step(self, params, carry_prev, xp, carry, res, dparams, dcarry_prev, dxp):
        (h_prev,), (dh_prev,) = carry_prev, dcarry_prev
        rzn, hn = res
        r, z, n = split_gates(rzn, 3)
        dxr, dxz, dxn = split_gates(dxp, 3)
        dhr, dhz, dhn = split_gates(self.recurrent_tangent(params, h_prev, dparams, dh_prev), 3)
        dr = (dxr + dhr) * r * (1 - r)  # r = sigmoid(xr + hr)
        dz = (dxz + dhz) * z * (1 - z)  # z = sigmoid(xz + hz)
        dn = (dxn + dr * hn + r * dhn) * (1 - n * n)  # n = tanh(xn + r hn)
        return ((1 - z) * dn + z * dh_prev + dz * (h_prev - n),)  # h = (1 - z) n + z h_{t-1}


class PeepholeLSTMParams(NamedTuple):
    """Parameters of one peephole-LSTM layer: PyTorch's LSTM layout plus the peepholes."""

    w_ih: jax.Array  # (4H, D)
    w_hh: jax.Array  # (4H, H)
    b_ih: jax.Array | None  # (4H,), or None without bias
    b_hh: jax.Array | None  # (4H,), or None without bias
    w_peep: jax.Array  # (3, H): rows p_i, p_f, p_o (diagonal peephole weights)


@dataclasses.dataclass(frozen=True)
class PeepholeLSTM(Cell):
    r"""LSTM with peephole connections (Gers & Schmidhuber 2000), gates in PyTorch's order.

    .. math::
        [\hat\imath, \hat f, \hat g, \hat o] = W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh} \\
        i = \sigma(\hat\imath + p_i \odot c_{t-1}),\
        f = \sigma(\hat f + p_f \odot c_{t-1}),\ g = \tanh(\hat g) \\
        c_t = f \odot c_{t-1} + i \odot g, \qquad
        o = \sigma(\hat o + p_o \odot c_t), \qquad h_t = o \odot \tanh(c_t)

    The output gate peeks at the *new* cell state :math:`c_t`, the input and forget
    gates at the old one. Backward, with :math:`\delta h_t, \delta c_t` the total
    cotangents of the carry and :math:`a_i, a_f, a_o` the gates' full pre-activations:

    .. math::
        \delta a_o = \delta h_t \odot \tanh(c_t)\, o(1-o) \\
        \delta c = \delta c_t + \delta h_t \odot o \odot (1 - \tanh^2 c_t)
                   + \delta a_o \odot p_o \\
        \delta a_i = \delta c \odot g\, i(1-i),\ \delta a_f = \delta c \odot c_{t-1}\, f(1-f),\
        \delta\hat g = \delta c \odot i\,(1-g^2) \\
        \delta c_{t-1} = \delta c \odot f + \delta a_i \odot p_i + \delta a_f \odot p_f,
        \qquad \delta h_{t-1} = W_{hh}^\top [\delta a_i, \delta a_f, \delta\hat g, \delta a_o] \\
        \frac{\partial L}{\partial p_i} = \sum_{t,b} \delta a_i \odot c_{t-1},\
        \frac{\partial L}{\partial p_f} = \sum_{t,b} \delta a_f \odot c_{t-1},\
        \frac{\partial L}{\partial p_o} = \sum_{t,b} \delta a_o \odot c_t

    The peepholes enter inside the step, not through either projection, so the
    cotangent of :math:`\hat\imath` is that of :math:`a_i` (and so on) and ``b_hh``
    folds into the input projection as for ``LSTM`` (``dgh`` is ``dgi``). Residual per
    step: the activated gates ``[i, f, g, o]`` (B, 4H); ``tanh(c_t)`` is recomputed.
    Written as the math reads (four activations on the four blocks), not in the
    LSTM's one-tanh form, which was not measured for this cell.

    Initialisation: every array, the peepholes included, ~ U(-1/sqrt(H), 1/sqrt(H))
    (PyTorch's LSTM rule), plus ``forget_bias`` on the forget block [H:2H] of ``b_ih``.
    """

    forget_bias: float = 0.0  # added to the forget gate's b_ih at initialisation

    name: ClassVar[str] = "peephole_lstm"
    num_gates: ClassVar[int] = 4
    carry_size: ClassVar[int] = 2
    residual_over_input: ClassVar[bool] = True  # the gates: elementwise in xp_t

    def init(self, key, input_size, hidden_size, bias=True, dtype=jnp.float32):
        """PyTorch's LSTM initialisation, the peepholes likewise, plus ``forget_bias``.

        Returns:
            ``PeepholeLSTMParams``: ``w_ih (4H, D)``, ``w_hh (4H, H)``, biases ``(4H,)``
            or None, ``w_peep (3, H)``.

        Raises:
            ValueError: ``forget_bias`` without ``bias``.
        """
        check_forget_bias(self.forget_bias, bias, "b_ih")
        k1, k2 = jax.random.split(key)
        p = super().init(k1, input_size, hidden_size, bias, dtype)
        H = hidden_size
        bound = 1.0 / math.sqrt(H)
        b_ih = p.b_ih
        if self.forget_bias:
            b_ih = b_ih.at[H:2 * H].add(self.forget_bias)  # gates i, f, g, o
        return PeepholeLSTMParams(p.w_ih, p.w_hh, b_ih, p.b_hh,
                                  jax.random.uniform(k2, (3, H), dtype, -bound, bound))

    def step(self, params, carry, xp):
        h_prev, c_prev = carry
        pre = xp + self.recurrent_preactivation(params, h_prev)  # [i^, f^, g^, o^], (B, 4H)
        ai, af, ag, ao = split_gates(pre, 4)
        p_i, p_f, p_o = params.w_peep
        i = jax.nn.sigmoid(ai + p_i * c_prev)  # input gate peeks at c_{t-1}
        f = jax.nn.sigmoid(af + p_f * c_prev)  # forget gate peeks at c_{t-1}
        g = jnp.tanh(ag)  # candidate
        c = f * c_prev + i * g  # c_t = f c_{t-1} + i g
        o = jax.nn.sigmoid(ao + p_o * c)  # output gate peeks at c_t
        h = o * jnp.tanh(c)  # h_t = o tanh(c_t)
        return (h, c), jnp.concatenate([i, f, g, o], axis=-1)

    def backward_step(self, params, carry_prev, carry, res, dcarry):
        _, c_prev = carry_prev
        _, c = carry
        i, f, g, o = split_gates(res, 4)
        p_i, p_f, p_o = params.w_peep
        dh, dc_next = dcarry  # total dL/dh_t and dL/dc_t (from step t+1)
        tc = jnp.tanh(c)  # tanh(c_t), recomputed rather than stored
        dao = dh * tc * o * (1 - o)  # h_t = o tanh(c_t), back through sigmoid
        dc = dc_next + dh * o * (1 - tc * tc) + dao * p_o  # paths via tanh(c_t) and o's peephole
        dai = dc * g * i * (1 - i)  # c_t = ... + i g, back through sigmoid
        daf = dc * c_prev * f * (1 - f)  # c_t = f c_{t-1} + ..., back through sigmoid
        dag = dc * i * (1 - g * g)  # c_t = ... + i g, back through tanh
        dgates = jnp.concatenate([dai, daf, dag, dao], axis=-1)  # dL/d[i^, f^, g^, o^]
        dh_prev = dgates @ params.w_hh  # through W_hh h_{t-1}
        dc_prev = dc * f + dai * p_i + daf * p_f  # through f c_{t-1} and the i, f peepholes
        dpeep = jnp.stack([dai * c_prev, daf * c_prev, dao * c], axis=1)  # dL/d[p_i, p_f, p_o]
        return (dh_prev, dc_prev), dgates, dgates, {"w_peep": dpeep}

    def tangent_step(self, params, carry_prev, xp, carry, res, dparams, dcarry_prev, dxp):
        (h_prev, c_prev), (_, c), (dh_prev, dc_prev) = carry_prev, carry, dcarry_prev
        i, f, g, o = split_gates(res, 4)
        p_i, p_f, p_o = params.w_peep
        dp_i, dp_f, dp_o = dparams.w_peep
        dai, daf, dag, dao = split_gates(dxp + self.recurrent_tangent(params, h_prev, dparams,
                                                                      dh_prev), 4)
        di = (dai + dp_i * c_prev + p_i * dc_prev) * i * (1 - i)  # i = sigmoid(ai + p_i c_{t-1})
        df = (daf + dp_f * c_prev + p_f * dc_prev) * f * (1 - f)  # f = sigmoid(af + p_f c_{t-1})
        dg = dag * (1 - g * g)  # g = tanh(ag)
        dc = df * c_prev + f * dc_prev + di * g + i * dg  # c_t = f c_{t-1} + i g
        do = (dao + dp_o * c + p_o * dc) * o * (1 - o)  # o = sigmoid(ao + p_o c_t)
        tc = jnp.tanh(c)  # tanh(c_t), recomputed rather than stored
        return (do * tc + o * (1 - tc * tc) * dc, dc)  # h_t = o tanh(c_t)


class LayerNormLSTMParams(NamedTuple):
    """Parameters of one layer-normalised LSTM layer (Ba, Kiros & Hinton 2016)."""

    w_ih: jax.Array  # (4H, D)
    w_hh: jax.Array  # (4H, H)
    b_ih: None  # always None: the bias is added after normalisation (``bias``)
    b_hh: None  # always None, likewise
    bias: jax.Array | None  # (4H,): b of the gates, after normalisation; None without bias
    ln_ih_gain: jax.Array  # (4H,): alpha_x, gain of LN(W_ih x_t)
    ln_hh_gain: jax.Array  # (4H,): alpha_h, gain of LN(W_hh h_{t-1})
    ln_c_gain: jax.Array  # (H,): alpha_c, gain of LN(c_t)
    ln_c_bias: jax.Array  # (H,): beta_c, bias of LN(c_t)


def _layer_norm(z: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    r"""The normalised ``z`` over its last axis and ``1/sigma``: ``(z^ (B, N), rstd (B, 1))``.

    :math:`\hat z = (z - \mu) / \sigma`, :math:`\sigma = \sqrt{\mathrm{var}(z) + \epsilon}`.
    At least in float32, as Flax's ``LayerNorm`` computes its statistics: under a
    bfloat16 compute dtype, bfloat16 statistics put the layer-norm LSTM's gradient
    179% (relative) from float64's at T=50, float32 ones 50%; that case is
    ill-conditioned (docs/mixed_precision.md). A no-op for float32 and float64 ``z``.
    """
    z = z.astype(jnp.promote_types(z.dtype, jnp.float32))  # float32 statistics (no-op above)
    zc = z - z.mean(axis=-1, keepdims=True)  # z - mu
    rstd = jax.lax.rsqrt((zc * zc).mean(axis=-1, keepdims=True) + eps)  # 1 / sigma
    return zc * rstd, rstd


def _layer_norm_backward(dzn: jax.Array, zn: jax.Array, rstd: jax.Array) -> jax.Array:
    r"""The cotangent of ``z`` from that of ``z^ = LN(z)`` (no gain):
    :math:`\delta z = (\delta\hat z - \overline{\delta\hat z}
    - \hat z\, \overline{\delta\hat z \odot \hat z}) / \sigma`, means over the last axis."""
    mean_d = dzn.mean(axis=-1, keepdims=True)  # through the mean mu
    mean_dz = (dzn * zn).mean(axis=-1, keepdims=True)  # through sigma
    return (dzn - mean_d - zn * mean_dz) * rstd  # back through (z - mu) / sigma


@dataclasses.dataclass(frozen=True)
class LayerNormLSTM(Cell):
    r"""Layer-normalised LSTM (Ba, Kiros & Hinton 2016, eq. 20-22), gates in order i, f, g, o.

    .. math::
        [\hat\imath, \hat f, \hat g, \hat o] = \mathrm{LN}(W_{hh} h_{t-1}; \alpha_h)
            + \mathrm{LN}(W_{ih} x_t; \alpha_x) + b \\
        c_t = \sigma(\hat f) \odot c_{t-1} + \sigma(\hat\imath) \odot \tanh(\hat g), \qquad
        h_t = \sigma(\hat o) \odot \tanh(\mathrm{LN}(c_t; \alpha_c, \beta_c))

    with :math:`\mathrm{LN}(z; \alpha, \beta) = \alpha \odot (z - \mu)/\sigma + \beta`,
    :math:`\mu, \sigma^2 + \epsilon` the mean and variance over the vector: the whole
    4H pre-activation for the two projections (as the paper), the H units for
    :math:`c_t`; :math:`\epsilon = 10^{-5}` (PyTorch's ``LayerNorm`` default). The two
    projections' own LN biases would only add to :math:`b`, so they are left out.
    The normalisation is of :math:`W x` and :math:`W h` *without* bias, so the scan's
    ``b_ih``/``b_hh`` (added to the projection before ``step``) are None and :math:`b`
    is the cell's own field ``bias``.

    Backward, with :math:`\delta h_t, \delta c_t` the total cotangents of the carry,
    :math:`\hat c = (c_t - \mu_c)/\sigma_c`, :math:`n = \alpha_c \hat c + \beta_c`, and
    for a normalised :math:`\hat z` of :math:`z`:
    :math:`\mathrm{LN}^*(\delta\hat z) = (\delta\hat z - \overline{\delta\hat z}
    - \hat z\,\overline{\delta\hat z \odot \hat z})/\sigma` (means over the vector):

    .. math::
        \delta n = \delta h_t \odot o \odot (1 - \tanh^2 n), \qquad
        \delta c = \delta c_t + \mathrm{LN}^*_c(\alpha_c \odot \delta n) \\
        \delta[\hat\imath, \hat f, \hat g, \hat o] = [\delta c\, g\, i(1-i),\
            \delta c\, c_{t-1} f(1-f),\ \delta c\, i (1 - g^2),\ \delta h_t \tanh(n)\, o(1-o)] \\
        \delta gi = \mathrm{LN}^*_x(\alpha_x \odot \delta\hat{\text{gates}}),\quad
        \delta gh = \mathrm{LN}^*_h(\alpha_h \odot \delta\hat{\text{gates}}),\quad
        \delta c_{t-1} = \delta c \odot f,\quad \delta h_{t-1} = W_{hh}^\top \delta gh \\
        \frac{\partial L}{\partial b} = \sum \delta\hat{\text{gates}},\
        \frac{\partial L}{\partial \alpha_x} = \sum \delta\hat{\text{gates}} \odot \hat x,\
        \frac{\partial L}{\partial \alpha_h} = \sum \delta\hat{\text{gates}} \odot \hat h,\
        \frac{\partial L}{\partial \alpha_c} = \sum \delta n \odot \hat c,\
        \frac{\partial L}{\partial \beta_c} = \sum \delta n

    (sums over steps and batch, by the generic reverse scan from per-example terms).
    ``dgi`` and ``dgh`` differ, so ``fold_recurrent_bias`` is False. Residuals per step:
    the gates ``[i, f, g, o]``, the normalised projections :math:`\hat x, \hat h`
    (B, 4H) each, :math:`\hat c` (B, H) and the three :math:`1/\sigma` (B, 1);
    :math:`\tanh(n)` is recomputed from :math:`\hat c` (elementwise, cheap).

    Initialisation: ``w_ih``, ``w_hh`` and ``bias`` ~ U(-1/sqrt(H), 1/sqrt(H)) (PyTorch's
    LSTM rule), plus ``forget_bias`` on the forget block [H:2H] of ``bias``; the gains 1,
    ``ln_c_bias`` 0 (PyTorch's ``LayerNorm``).
    """

    forget_bias: float = 0.0  # added to the forget block of ``bias`` at initialisation
    eps: float = 1e-5  # added to each variance, as torch.nn.LayerNorm

    name: ClassVar[str] = "layernorm_lstm"
    num_gates: ClassVar[int] = 4
    carry_size: ClassVar[int] = 2
    fold_recurrent_bias: ClassVar[bool] = False

    def init(self, key, input_size, hidden_size, bias=True, dtype=jnp.float32):
        """Uniform weights and bias, unit gains, zero ``ln_c_bias``, plus ``forget_bias``.

        Returns:
            ``LayerNormLSTMParams``: ``w_ih (4H, D)``, ``w_hh (4H, H)``, ``b_ih = b_hh =
            None``, ``bias (4H,)`` or None, gains ``(4H,)``, ``(4H,)``, ``(H,)`` and
            ``ln_c_bias (H,)``.

        Raises:
            ValueError: ``forget_bias`` without ``bias``.
        """
        check_forget_bias(self.forget_bias, bias, "the gates' bias")
        H = hidden_size
        bound = 1.0 / math.sqrt(H)
        k1, k2, k3 = jax.random.split(key, 3)
        u = lambda k, shape: jax.random.uniform(k, shape, dtype, -bound, bound)  # noqa: E731
        b = None
        if bias:
            b = u(k3, (4 * H,))
            if self.forget_bias:
                b = b.at[H:2 * H].add(self.forget_bias)  # gates i, f, g, o
        return LayerNormLSTMParams(
            w_ih=u(k1, (4 * H, input_size)), w_hh=u(k2, (4 * H, H)), b_ih=None, b_hh=None,
            bias=b, ln_ih_gain=jnp.ones((4 * H,), dtype), ln_hh_gain=jnp.ones((4 * H,), dtype),
            ln_c_gain=jnp.ones((H,), dtype), ln_c_bias=jnp.zeros((H,), dtype))

    def step(self, params, carry, xp):
        h_prev, c_prev = carry
        xn, rx = _layer_norm(xp, self.eps)  # x^ = (W_ih x_t - mu) / sigma, over 4H
        hn, rh = _layer_norm(self.recurrent_preactivation(params, h_prev), self.eps)  # h^
        pre = params.ln_ih_gain * xn + params.ln_hh_gain * hn  # LN(W_ih x) + LN(W_hh h)
        if params.bias is not None:
            pre = pre + params.bias  # + b
        ai, af, ag, ao = split_gates(pre, 4)
        i, f, g, o = jax.nn.sigmoid(ai), jax.nn.sigmoid(af), jnp.tanh(ag), jax.nn.sigmoid(ao)
        c = f * c_prev + i * g  # c_t = f c_{t-1} + i g
        cn, rc = _layer_norm(c, self.eps)  # c^ = (c_t - mu) / sigma, over H
        h = o * jnp.tanh(params.ln_c_gain * cn + params.ln_c_bias)  # h_t = o tanh(LN(c_t))
        return (h, c), (jnp.concatenate([i, f, g, o], axis=-1), xn, hn, cn, rx, rh, rc)

    def backward_step(self, params, carry_prev, carry, res, dcarry):
        _, c_prev = carry_prev
        gates, xn, hn, cn, rx, rh, rc = res
        i, f, g, o = split_gates(gates, 4)
        dh, dc_next = dcarry  # total dL/dh_t and dL/dc_t (from step t+1)
        tn = jnp.tanh(params.ln_c_gain * cn + params.ln_c_bias)  # tanh(LN(c_t)), recomputed
        dn = dh * o * (1 - tn * tn)  # h_t = o tanh(n), back through tanh
        dc = dc_next + _layer_norm_backward(dn * params.ln_c_gain, cn, rc)  # n = a_c c^ + b_c
        dai = dc * g * i * (1 - i)  # c_t = ... + i g, back through sigmoid
        daf = dc * c_prev * f * (1 - f)  # c_t = f c_{t-1} + ..., back through sigmoid
        dag = dc * i * (1 - g * g)  # c_t = ... + i g, back through tanh
        dao = dh * tn * o * (1 - o)  # h_t = o tanh(n), back through sigmoid
        dpre = jnp.concatenate([dai, daf, dag, dao], axis=-1)  # dL/d[i^, f^, g^, o^]
        dgi = _layer_norm_backward(dpre * params.ln_ih_gain, xn, rx)  # pre = a_x x^ + ...
        dgh = _layer_norm_backward(dpre * params.ln_hh_gain, hn, rh)  # pre = ... + a_h h^
        dh_prev = dgh @ params.w_hh  # through W_hh h_{t-1}
        dc_prev = dc * f  # through f c_{t-1}
        dparams = {"ln_ih_gain": dpre * xn,  # pre = a_x x^ + ...: dL/da_x
                   "ln_hh_gain": dpre * hn,  # pre = ... + a_h h^: dL/da_h
                   "ln_c_gain": dn * cn,  # n = a_c c^ + b_c: dL/da_c
                   "ln_c_bias": dn}  # n = a_c c^ + b_c: dL/db_c
        if params.bias is not None:
            dparams["bias"] = dpre  # pre = ... + b: dL/db
        return (dh_prev, dc_prev), dgi, dgh, dparams

    def tangent_step(self, params, carry_prev, xp, carry, res, dparams, dcarry_prev, dxp):
        # LN's Jacobian is symmetric: its tangent map is _layer_norm_backward's formula
        (h_prev, c_prev), (dh_prev, dc_prev) = carry_prev, dcarry_prev
        gates, xn, hn, cn, rx, rh, rc = res
        i, f, g, o = split_gates(gates, 4)
        dxn = _layer_norm_backward(dxp, xn, rx)  # x^ = LN(W_ih x_t)
        dhn = _layer_norm_backward(self.recurrent_tangent(params, h_prev, dparams, dh_prev),
                                   hn, rh)  # h^ = LN(W_hh h_{t-1})
        dpre = (dparams.ln_ih_gain * xn + params.ln_ih_gain * dxn  # a_x x^
                + dparams.ln_hh_gain * hn + params.ln_hh_gain * dhn)  # + a_h h^
        if params.bias is not None:
            dpre = dpre + dparams.bias  # + b
        dai, daf, dag, dao = split_gates(dpre, 4)
        di, df, dg, do = dai * i * (1 - i), daf * f * (1 - f), dag * (1 - g * g), dao * o * (1 - o)
        dc = df * c_prev + f * dc_prev + di * g + i * dg  # c_t = f c_{t-1} + i g
        dcn = _layer_norm_backward(dc, cn, rc)  # c^ = LN(c_t)
        tn = jnp.tanh(params.ln_c_gain * cn + params.ln_c_bias)  # tanh(n), recomputed
        dnn = dparams.ln_c_gain * cn + params.ln_c_gain * dcn + dparams.ln_c_bias  # n = a_c c^ + b_c
        return (do * tn + o * (1 - tn * tn) * dnn, dc)  # h_t = o tanh(n)


@dataclasses.dataclass(frozen=True)
class IndRNN(Cell):
    r"""The independently recurrent network (Li et al. 2018): one recurrent weight per unit.

    .. math::
        a_t = W_{ih} x_t + b_{ih} + u \odot h_{t-1} + b_{hh}, \qquad h_t = \phi(a_t)

    with a vector :math:`u` (H,) (the field ``w_hh``) and :math:`\phi \in \{\tanh,
    \mathrm{relu}\}`: no recurrent matrix product at all. Backward, given the total
    :math:`\partial L/\partial h_t`:

    .. math::
        \delta a_t = \frac{\partial L}{\partial h_t}\,\phi'(a_t), \qquad
        \texttt{dh\_next} = u \odot \delta a_t, \qquad
        \frac{\partial L}{\partial u} = \sum_t \sum_b \delta a_t \odot h_{t-1}

    (the last summed by the generic reverse scan from the per-example terms that
    ``backward_step`` returns). Initialisation: ``w_ih`` and the biases as PyTorch's
    ``nn.RNN``, ``u ~ U(0, recurrent_max)``: ``U(0, 1)`` by default (Li et al.'s choice
    for their long-sequence tasks, with relu). Li et al. bound
    :math:`|u| \le 2^{1/T}` for sequences of length T (a unit's state can then grow
    at most 2-fold over the sequence): ``IndRNN("relu", recurrent_max=2 ** (1 / T))``
    draws ``u`` in that range, and ``jaxrnn._src.train.clip_recurrent(2 ** (1 / T))`` at the
    end of the optimizer chain keeps it there during training.

    Args:
        nonlinearity: ``"tanh"`` or ``"relu"``.
        recurrent_max: the upper end of ``u``'s initial range, > 0; None for 1.
    """

    nonlinearity: str = "tanh"
    recurrent_max: float | None = None

    name: ClassVar[str] = "indrnn"
    num_gates: ClassVar[int] = 1
    carry_size: ClassVar[int] = 1

    def __post_init__(self):
        check_nonlinearity(self.nonlinearity)
        r = self.recurrent_max
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float))
                              or not 0 < r < math.inf):
            raise ValueError(f"recurrent_max must be a finite number > 0 or None, got {r!r}")

    def init(self, key, input_size, hidden_size, bias=True, dtype=jnp.float32):
        """PyTorch's ``nn.RNN`` initialisation for ``w_ih`` and the biases; ``u ~ U(0, recurrent_max)``."""
        k1, k2 = jax.random.split(key)
        p = super().init(k1, input_size, hidden_size, bias, dtype)
        top = 1.0 if self.recurrent_max is None else float(self.recurrent_max)
        return p._replace(w_hh=jax.random.uniform(k2, (hidden_size,), dtype, 0.0, top))  # u (H,)

    def recurrent_preactivation(self, params, h_prev):
        return params.w_hh * h_prev  # u * h_{t-1}: elementwise, no product (b_hh is folded)

    def step(self, params, carry, xp):
        (h_prev,) = carry
        a = xp + self.recurrent_preactivation(params, h_prev)  # a_t = W_ih x_t + b + u h_{t-1}
        h = jnp.tanh(a) if self.nonlinearity == "tanh" else jax.nn.relu(a)  # h_t = phi(a_t)
        return (h,), ()

    def backward_step(self, params, carry_prev, carry, res, dcarry):
        (h_prev,) = carry_prev
        (h,) = carry
        (dh,) = dcarry  # dL/dh_t: the loss's term at t plus dh_next from t+1
        if self.nonlinearity == "tanh":
            da = dh * (1 - h * h)  # back through tanh: tanh'(a) = 1 - h^2
        else:
            da = jnp.where(h > 0, dh, 0)  # back through relu: relu'(a) = [h > 0]
        dh_next = da * params.w_hh  # dL/dh_{t-1} through a_t = ... + u h_{t-1}
        return (dh_next,), da, da, {"w_hh": da * h_prev}  # dL/du, one term per example

    def recurrent_tangent(self, params, h_prev, dparams, dh_prev):
        return dparams.w_hh * h_prev + params.w_hh * dh_prev  # u h_{t-1}: product rule

    # h_t = phi(xp_t + u h_{t-1}): the Elman cell's tangent step, with the tangent of
    # u h_{t-1} from recurrent_tangent above
    tangent_step = Elman.tangent_step


CELLS: dict[str, type[Cell]] = {"elman": Elman, "lstm": LSTM, "gru": GRU, "indrnn": IndRNN,
                                "peephole_lstm": PeepholeLSTM, "layernorm_lstm": LayerNormLSTM,
                                "leaky": Leaky}
# cells with a forget gate (forget_bias applies) and cells with a nonlinearity option
# (CELLS' keys: names.CellName, which a test keeps equal)
_FORGET_GATE = ("lstm", "peephole_lstm", "layernorm_lstm")
_NONLINEARITY = ("elman", "indrnn", "leaky")


def check_cell_class(cell: Cell) -> None:
    """Checks that ``cell`` is a usable ``Cell`` instance (class attributes, hashable).

    Raises:
        ValueError: naming what is wrong.
    """
    if not isinstance(cell, Cell):
        raise ValueError(f"cell must be a jaxrnn.Cell instance, got {type(cell).__name__}")
    name = type(cell).__name__
    for attr in ("num_gates", "carry_size"):
        v = getattr(cell, attr)
        check_int(f"{name}.{attr}", v, 1)
    if not isinstance(cell.name, str):
        raise ValueError(f"{name}.name must be a string, got {cell.name!r}")
    try:
        hash(cell)
    except TypeError as e:
        raise ValueError(f"cell {name} must be hashable (a frozen dataclass, "
                         f"@dataclasses.dataclass(frozen=True)): {e}") from None
    for method in ("step", "backward_step"):
        if getattr(type(cell), method) is getattr(Cell, method):
            raise ValueError(f"cell {name} must define {method}")


def make_cell(kind: str, nonlinearity: str = "tanh", *, proj_size: int = 0,
              forget_bias: float = 0.0, hidden_size: int | None = None,
              bias: bool = True) -> Cell:
    """Returns the built-in cell named ``kind`` with its options.

    Args:
        kind: a name in ``CELLS``.
        nonlinearity: ``'tanh'`` or ``'relu'`` for ``'elman'``, ``'indrnn'`` and ``'leaky'``
            (IndRNN's default in ``RNN`` is tanh, as for Elman; ``'leaky'`` gets the
            default ``alpha``, 0.5: pass ``Leaky(alpha=...)`` for another).
        proj_size: ``'lstm'`` only, 0 < P < hidden_size; 0 for none.
        forget_bias: cells with a forget gate only.
        hidden_size, bias: the model's, to validate ``proj_size`` and ``forget_bias``.

    Raises:
        ValueError: for an unknown ``kind`` or an option the cell does not take.
    """
    if kind not in CELLS:
        raise ValueError(f"cell must be one of {sorted(CELLS)}, got {kind!r}")
    if nonlinearity != "tanh" and kind not in _NONLINEARITY:
        cells = f"{', '.join(_NONLINEARITY[:-1])} and {_NONLINEARITY[-1]}"
        raise ValueError(f"nonlinearity={nonlinearity!r} applies to the {cells} cells only; "
                         f"cell={kind!r} takes nonlinearity='tanh'")
    if forget_bias and kind not in _FORGET_GATE:
        raise ValueError(f"forget_bias={forget_bias!r} applies to cells with a forget gate "
                         f"{list(_FORGET_GATE)}; cell={kind!r} has none")
    check_forget_bias(forget_bias, bias, "the forget gate's bias")
    if proj_size:
        if kind != "lstm":
            raise ValueError(f"proj_size={proj_size!r} applies to cell='lstm' only, "
                             f"got cell={kind!r}")
        check_int("proj_size", proj_size, 0)
        if hidden_size is not None and proj_size >= hidden_size:
            raise ValueError(f"proj_size must be smaller than hidden_size={hidden_size} "
                             f"(as PyTorch), got proj_size={proj_size}")
    if kind in _NONLINEARITY:
        return CELLS[kind](nonlinearity)
    if proj_size:  # validated above: cell='lstm', 0 < P < hidden_size
        return ProjectedLSTM(forget_bias=float(forget_bias), proj_size=proj_size)
    if kind in _FORGET_GATE:
        return CELLS[kind](forget_bias=float(forget_bias))
    return CELLS[kind]()
