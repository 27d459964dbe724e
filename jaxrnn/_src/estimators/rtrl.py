r"""Exact real-time recurrent learning (Williams & Zipser 1989) for every cell and depth.

The estimator's state is the sensitivity of the whole stack's state
:math:`s_t` (every layer's carry) to every recurrent parameter,
:math:`P_t = \partial s_t / \partial \theta` (one column per parameter entry,
:math:`n` in all), updated with the step's Jacobians:

.. math::
    P_t = J_t P_{t-1} + M_t, \qquad J_t = \frac{\partial s_t}{\partial s_{t-1}}, \quad
    M_t = \frac{\partial s_t}{\partial \theta}, \qquad P_0 = 0,

column by column as the tangent of the step, :math:`P_t e_j = \dot s_t` for
:math:`\dot\theta = e_j,\ \dot s_{t-1} = P_{t-1} e_j` (``base.stack_tangent``, the
cell's ``tangent_step``: handwritten for the built-in cells). The gradient is read
out online: :math:`\partial L/\partial\theta = \sum_t (\partial \ell_t/\partial h_t)^\top
P_t`. A layer above the first sees the layer below's tangent through its input, so
layers are exact too; a step past a sequence's length leaves :math:`P` unchanged.

Memory :math:`B n S` (S the state's size per example, n the parameters) whatever
T is; each step costs :math:`n` tangents of the stack, :math:`2 n B G H (D + H)`
multiplies per layer: :math:`O(H^4)` for one layer. For small models.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jaxrnn._src.estimators.base import (Cost, Estimator, num_params, stack_tangent, state_size,
                                         step_flops)


# Columns of P updated at once: the unit tangents e_j are built per block of this many
# (a block's one-hots take BLOCK * n elements, not n^2).
BLOCK = 128


def unravel_like(layers, g):
    """A flat (n,) gradient as a pytree like ``layers``."""
    return ravel_pytree(layers)[1](g)


def sensitivity_update(cell, layers, P, traces, unit: bool):
    r"""One column per leading index j of ``P``: :math:`P_t e_j = J_t P_{t-1} e_j (+ M_t e_j)`.

    Args:
        cell, layers, traces: the step's (``base.stack_step``).
        P: carries' tangents with a leading (n,) axis, one per layer.
        unit: add the immediate term of the j-th parameter (``P`` has one column per
            parameter, in ``ravel_pytree(layers)``'s order); False: ``J_t P`` only.

    Returns:
        The new ``P``, like ``P``.
    """
    flat, unravel = ravel_pytree(layers)

    def column(j, p):
        d = unravel(jax.nn.one_hot(j, flat.size, dtype=flat.dtype)) if unit else None
        return stack_tangent(cell, layers, traces, d, p)

    n = jax.tree.leaves(P)[0].shape[0]
    new = jax.lax.map(lambda a: column(*a), (jnp.arange(n), P), batch_size=min(n, BLOCK))
    return tuple(tuple(c) for c in new)


@dataclasses.dataclass(frozen=True)
class RTRL(Estimator):
    r"""Exact RTRL: :math:`P_t = J_t P_{t-1} + M_t`, every parameter, every layer.

    Args:
        state_grad: also carry :math:`Q_t = \partial s_t / \partial s_0` (one column per
            entry of one example's initial state: S more columns) and read out the
            initial state's gradient, per example; ``read_out`` then returns
            ``(grads, dcarries0)``.
    """

    state_grad: bool = False

    name: ClassVar[str] = "rtrl"
    exact: ClassVar[bool] = True

    def init(self, cell, layers, carries0, key):
        n = num_params(layers)
        P = tuple(tuple(jnp.zeros((n,) + c.shape, c.dtype) for c in carry) for carry in carries0)
        if not self.state_grad:
            return P
        # Q_0 = ds_0/ds_0 = I: column k is the k-th entry of every example's state
        S = sum(c.shape[-1] for carry in carries0 for c in carry)
        eye, cols, Q = None, 0, []
        for carry in carries0:
            parts = []
            for c in carry:
                w = c.shape[-1]
                block = jnp.zeros((S, w), c.dtype).at[cols:cols + w].set(jnp.eye(w, dtype=c.dtype))
                parts.append(jnp.broadcast_to(block[:, None, :], (S,) + c.shape))
                cols += w
            Q.append(tuple(parts))
        del eye
        return P, tuple(Q)

    def update(self, cell, layers, state, traces, key):
        P, Q = (state, None) if not self.state_grad else state
        P = sensitivity_update(cell, layers, P, traces, True)  # P_t = J_t P_{t-1} + M_t
        if Q is None:
            return P
        return P, sensitivity_update(cell, layers, Q, traces, False)  # Q_t = J_t Q_{t-1}

    def read_out(self, cell, layers, state, dh, dy, readout_weight):
        P, Q = (state, None) if not self.state_grad else state
        g = unravel_like(layers, jnp.einsum("bi,nbi->n", dh, P[-1][0]))  # dl_t/dh_t^T P_t
        if Q is None:
            return g
        gq = jnp.einsum("bi,kbi->bk", dh, Q[-1][0])  # dl_t/dh_t^T Q_t, per example (B, S)
        return g, gq

    def cost(self, cell, layers, batch):
        n, S = num_params(layers), state_size(cell, layers)
        block = min(n, BLOCK)
        return Cost(state=batch * n * S, work=block * n + batch * n * S,
                    flops=n * step_flops(cell, layers, batch),
                    formula="state B n S, work (128 + B S) n; per step n tangents of the step, "
                            "2 n B G H (D + H) per layer: O(B H^4)")
