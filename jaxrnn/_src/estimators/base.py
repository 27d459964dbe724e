r"""The estimator interface: what one step of the network gives a gradient estimator.

An *estimator* computes the gradient of a sequence loss forward in time, as the
sequence runs, without storing it: real-time recurrent learning (RTRL, exact) and
its approximations (SnAp, UORO, KF-RTRL, RFLO, e-prop). Each carries a state (the
sensitivities :math:`P_t \approx \partial s_t / \partial\theta` of the network's
state :math:`s_t` to its recurrent parameters, or a factorisation of them) and

* ``init(cell, layers, carries0, key) -> state``;
* ``update(cell, layers, state, traces, key) -> state``: from the step's
  ``Trace`` of every layer (its input, input projection, carries before and after,
  residuals, mask), applying :math:`P_t = J_t P_{t-1} + M_t` or its approximation,
  with :math:`J_t = \partial s_t/\partial s_{t-1}` and
  :math:`M_t = \partial s_t/\partial\theta` (the immediate influence);
* ``read_out(cell, layers, state, dh, dy, readout_weight) -> grads``: step t's
  term of the gradient, :math:`(\partial \ell_t/\partial h_t)^\top P_t`, shaped like
  ``layers``; ``dh (B, H)`` is the loss's gradient at the top layer's output
  (through the true readout), ``dy (B, O)`` at the readout's output (for
  estimators with their own feedback);
* ``cost(cell, layers, batch) -> Cost``: the state's elements and the multiplies
  per step, in H, D and the parameter count.

The tangents an estimator needs come from the cell's own ``tangent_step`` (handwritten
for the built-in cells, ``jax.jvp`` of ``step`` for users' cells):
``stack_tangent`` applies :math:`J_t` and :math:`M_t` to given tangents for every
layer of a stack at once. Everything here sits below the model: it takes the
cell, the layers' parameters and validated, time-major arrays, never an ``RNN``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxrnn._src.cells import Carry, Cell, CellParams
from jaxrnn._src.scan import input_bias, project_inputs

Layers = tuple  # (CellParams, ...): one per layer (one direction)

# Refuse an estimator whose state (and its working arrays) would hold more elements
# than this: 5e7 is 400 MB in float64, and an update makes a few temporaries of the
# same size.
MAX_STATE_ELEMENTS = 50_000_000


class Trace(NamedTuple):
    """What one step of one layer gives the estimators (one example per row)."""

    x: jax.Array  # (B, D_l): the layer's input at step t
    xp: jax.Array  # (B, G*H): its input projection W_ih x_t + b (as the scan's)
    carry_prev: Carry  # the carry before the step, (B, w_k) each
    carry: Carry  # the carry after the step (frozen where the mask is False)
    res: Any  # the cell's residuals of the step (leading axis B)
    m: jax.Array  # (B,) bool: the sequences still running at step t


class Cost(NamedTuple):
    """An estimator's memory and time, in elements and multiplies (per example: x B)."""

    state: int  # elements of the estimator's state
    work: int  # elements of its largest per-step temporaries beyond the state
    flops: int  # multiplies per step (leading order)
    formula: str  # the same in symbols, e.g. "B n S" (n parameters, S state size)


@dataclasses.dataclass(frozen=True)
class Estimator:
    """A forward-in-time gradient estimator (see the module docstring).

    A frozen dataclass (hashable: a static ``jax.jit`` argument) whose fields are
    its options. ``exact``: its gradient equals BPTT's in exact arithmetic;
    ``stochastic``: it draws random numbers (``update`` gets a key).
    """

    name: ClassVar[str] = "estimator"
    exact: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False

    @property
    def method(self) -> str:
        """The name it goes by as a gradient method (``"snap2"`` for ``SnAp(2)``)."""
        return self.name

    def check(self, cell: Cell, num_layers: int) -> None:
        """Raises a one-line ``ValueError`` for a cell or depth it is not defined on."""

    def init(self, cell: Cell, layers: Layers, carries0: Sequence[Carry], key) -> Any:
        raise NotImplementedError

    def update(self, cell: Cell, layers: Layers, state, traces: Sequence[Trace], key) -> Any:
        raise NotImplementedError

    def read_out(self, cell: Cell, layers: Layers, state, dh: jax.Array, dy: jax.Array,
                 readout_weight: jax.Array) -> Layers:
        raise NotImplementedError

    def cost(self, cell: Cell, layers: Layers, batch: int) -> Cost:
        raise NotImplementedError


# --- the network, one step at a time ---------------------------------------------------

def select(m: jax.Array, new, old):
    """``new`` where the (B,) mask ``m`` is True, else ``old``, leaf-wise.

    The leaves are ``(..., B, w)``: a carry (B, w), or sensitivities with leading
    direction axes; ``m[:, None]`` broadcasts over both.
    """
    return jax.tree.map(lambda a, b: jnp.where(m[:, None], a, b), new, old)


def stack_step(cell: Cell, layers: Layers, carries: Sequence[Carry], x: jax.Array,
               m: jax.Array) -> tuple[list[Carry], list[Trace]]:
    """One step of every layer of a one-direction stack, keeping each layer's ``Trace``.

    Args:
        cell: the cell.
        layers: one parameter NamedTuple per layer.
        carries: the carries before the step, one per layer.
        x: the step's input, (B, D).
        m: (B,) bool: the sequences still running (elsewhere the carries stay).

    Returns:
        ``(carries, traces)``: the carries after the step and one ``Trace`` per layer.
    """
    new_carries, traces = [], []
    for p, carry in zip(layers, carries):
        xp = project_inputs(cell, p, x)  # W_ih x_t + b_ih (+ b_hh where folded)
        new, res = cell.step(p, tuple(carry), xp)
        new = select(m, tuple(new), tuple(carry))  # frozen past the sequence's end
        traces.append(Trace(x, xp, tuple(carry), new, res, m))
        new_carries.append(new)
        x = new[0]  # the next layer's input
    return new_carries, traces


def stack_tangent(cell: Cell, layers: Layers, traces: Sequence[Trace], dlayers,
                  dcarries_prev: Sequence[Carry]) -> list[Carry]:
    r"""The step's tangent through every layer: :math:`\dot s_t = J_t \dot s_{t-1} + M_t \dot	heta`.

    Layer by layer, with the cell's ``tangent_step``: the input projection's tangent
    is :math:`\dot x^{(l)}_t W_{ih}^	op + x^{(l)}_t \dot W_{ih}^	op + \dot b` with
    :math:`\dot x^{(l)}_t` the layer below's new output tangent (zero for the inputs).
    Linear in ``(dlayers, dcarries_prev)``; ``jax.vmap`` it over directions.

    Args:
        cell, layers: as ``stack_step``'s.
        traces: ``stack_step``'s traces of this step.
        dlayers: the parameters' tangent, shaped like ``layers`` (None for none).
        dcarries_prev: the carries' tangents before the step, one per layer.

    Returns:
        The carries' tangents after the step, one per layer (unchanged where masked).
    """
    new, dx = [], None
    for l, (p, tr, dc_prev) in enumerate(zip(layers, traces, dcarries_prev)):
        dp = zeros_like(p) if dlayers is None else dlayers[l]
        dxp = tr.x @ dp.w_ih.T  # x_t dW_ih^T
        if dx is not None:
            dxp = dxp + dx @ p.w_ih.T  # + dx_t W_ih^T: the layer below's tangent
        db = input_bias(cell, dp)
        if db is not None:
            dxp = dxp + db  # + db_ih (+ db_hh where folded)
        dc = cell.tangent_step(p, tr.carry_prev, tr.xp, tr.carry, tr.res, dp, tuple(dc_prev),
                               dxp)
        dc = select(tr.m, tuple(dc), tuple(dc_prev))  # frozen where masked
        new.append(dc)
        dx = dc[0]
    return new


def zeros_like(tree):
    """Zeros shaped like ``tree`` (its None leaves stay None)."""
    return jax.tree.map(jnp.zeros_like, tree)


def num_params(layers: Layers) -> int:
    """n: the recurrent parameters' count, every layer."""
    return sum(a.size for a in jax.tree.leaves(layers))


def hidden_size(cell: Cell, p) -> int:
    """H of one layer's parameters: ``w_ih``'s rows over the cell's gates."""
    return p.w_ih.shape[0] // cell.num_gates


def state_size(cell: Cell, layers: Layers) -> int:
    """S: one example's state, the widths of every layer's carry parts."""
    return sum(sum(cell.state_sizes(hidden_size(cell, p))) for p in layers)


def step_flops(cell: Cell, layers: Layers, batch: int) -> int:
    """Multiplies of one tangent of the stack (``stack_tangent``), leading order.

    Per layer: ``dx W_ih^T``, ``x dW_ih^T``, ``dh W_hh^T`` and ``h dW_hh^T``:
    :math:`2 B G H (D_l + H)`.
    """
    return sum(2 * batch * p.w_ih.shape[0] * (p.w_ih.shape[1] + hidden_size(cell, p))
               for p in layers)
