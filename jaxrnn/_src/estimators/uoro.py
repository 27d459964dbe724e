r"""UORO: Unbiased Online Recurrent Optimization (Tallec & Ollivier, ICLR 2018).

UORO keeps an unbiased rank-one estimate of each example's sensitivity
:math:`P_t = \partial s_t/\partial\theta` (S x n: the whole stack's state against every
recurrent parameter), :math:`P_t \approx \tilde u_t \tilde v_t^\top`, with
:math:`\tilde u_t` shaped like the state and :math:`\tilde v_t` like the parameters.
With :math:`\nu` a vector of independent random signs (Rademacher, one per state
entry and example) drawn afresh at every step (their Algorithm 1):

.. math::
    \rho_0 = \sqrt{\frac{\lVert\tilde v_{t-1}\rVert}{\lVert J_t\tilde u_{t-1}\rVert + \epsilon}}
        + \epsilon, \qquad
    \rho_1 = \sqrt{\frac{\lVert\nu^\top M_t\rVert}{\lVert\nu\rVert + \epsilon}} + \epsilon,

.. math::
    \tilde u_t = \rho_0\, J_t \tilde u_{t-1} + \rho_1\, \nu, \qquad
    \tilde v_t = \tilde v_{t-1}/\rho_0 + \nu^\top M_t/\rho_1, \qquad
    \tilde u_0 = 0,\ \tilde v_0 = 0,

with :math:`J_t = \partial s_t/\partial s_{t-1}` and :math:`M_t = \partial s_t/\partial
\theta`. Unbiased: :math:`E[\nu\nu^\top] = I`, and the cross terms are odd in
:math:`\nu` (:math:`\rho_1` is even in it) so they have mean zero; :math:`\rho_0` depends
on the past only. So :math:`E[\tilde u_t\tilde v_t^\top] = J_t E[\tilde u_{t-1}\tilde
v_{t-1}^\top] + M_t = P_t` by induction. The norms are per
example; :math:`\rho_0, \rho_1` only balance the two factors' scales (the variance),
never the mean. The gradient read out at step t is
:math:`\sum_b (\partial\ell_t/\partial h_{t,b} \cdot \tilde u_{t,b})\, \tilde v_{t,b}`.

:math:`J_t\tilde u_{t-1}` is one tangent of the stack (``base.stack_tangent``, the
cells' ``tangent_step``); :math:`\nu^\top M_t` is its exact transpose in the
parameters: ``jax.vjp`` of the (linear) map :math:`\dot\theta \mapsto M_t\dot\theta`
(``stack_tangent`` with zero state tangents) on one example, ``jax.vmap``-ed over the
examples. So UORO serves every cell, built-in or a user's, and any depth (the
state is the whole stack's).

Memory :math:`B (n + S)`; per step one tangent and one transposed tangent of the
stack, :math:`O(B n)` multiplies (:math:`4 B G H (D + H)` per layer).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxrnn._src.estimators.base import (Cost, Estimator, num_params, stack_tangent, state_size,
                                         step_flops, zeros_like)


def per_example_norm(tree) -> jax.Array:
    """The Euclidean norm of each example's part of ``tree`` (leaves (B, ...)), (B,)."""
    sq = [jnp.sum(a.reshape(a.shape[0], -1) ** 2, axis=1) for a in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(sq))


def scale(c: jax.Array, tree):
    """Each example's part of ``tree`` (leaves (B, ...)) times ``c[b]``, c (B,)."""
    return jax.tree.map(lambda a: a * c.reshape((-1,) + (1,) * (a.ndim - 1)), tree)


def keep(m: jax.Array, new, old):
    """``new`` for the examples still running (``m`` (B,) bool), else ``old``; leaves (B, ...)."""
    return jax.tree.map(lambda a, b: jnp.where(m.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
                        new, old)


def rademacher_like(key, tree):
    """Independent random signs (+-1, equally likely) shaped like ``tree``'s leaves."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.rademacher(k, a.shape, a.dtype)
                              for k, a in zip(keys, leaves)])


def immediate_transpose(cell, layers, traces, nu):
    r"""Each example's :math:`\nu_b^\top M_t`: shaped like ``layers`` with a leading (B,) axis.

    The transpose of :math:`\dot\theta \mapsto M_t\dot\theta` (``stack_tangent`` from
    zero state tangents, linear in :math:`\dot\theta`), by ``jax.vjp`` on one example
    (a batch of 1), ``jax.vmap``-ed over the batch: exact.

    Args:
        cell, layers, traces: as ``stack_tangent``'s (traces' leaves (B, ...)).
        nu: the cotangent, shaped like the stack's carries (one tuple per layer, (B, w)).
    """
    def one(trace_b, nu_b):  # one example: its trace and cotangent, batch axis added back
        tr = jax.tree.map(lambda a: a[None], trace_b)
        ct = [tuple(c[None] for c in carry) for carry in nu_b]
        zero_state = jax.tree.map(jnp.zeros_like, ct)
        _, vjp = jax.vjp(lambda d: stack_tangent(cell, layers, tr, d, zero_state),
                         zeros_like(layers))
        return vjp(ct)[0]  # nu_b^T M_t, shaped like layers

    return jax.vmap(one)(list(traces), list(nu))


@dataclasses.dataclass(frozen=True)
class UORO(Estimator):
    r"""UORO (Tallec & Ollivier 2018, Algorithm 1): :math:`P_t \approx \tilde u_t\tilde v_t^\top`.

    See the module docstring for the update. The state is ``(u, v)``: ``u`` shaped
    like the stack's carries (one tuple per layer, (B, w) each: B S in all), ``v``
    like ``layers`` with a leading (B,) axis (B n). Past a sequence's length both
    stay as they are.

    Args:
        eps: the :math:`\epsilon` of :math:`\rho_0, \rho_1` (their Algorithm 1: it
            keeps the first step, from :math:`\tilde u_0 = \tilde v_0 = 0`, finite).
    """

    eps: float = 1e-7

    name: ClassVar[str] = "uoro"
    exact: ClassVar[bool] = False
    stochastic: ClassVar[bool] = True

    def init(self, cell, layers, carries0, key):
        B = carries0[0][0].shape[0]
        u = tuple(tuple(jnp.zeros_like(c) for c in carry) for carry in carries0)  # u_0 = 0
        v = jax.tree.map(lambda a: jnp.zeros((B,) + a.shape, a.dtype), layers)  # v_0 = 0
        return u, v

    def signs(self, key, u):
        """The step's :math:`\\nu`: random signs shaped like ``u``."""
        return rademacher_like(key, u)

    def update(self, cell, layers, state, traces, key):
        u, v = state
        eps = self.eps
        Ju = tuple(map(tuple, stack_tangent(cell, layers, traces, None, u)))  # J_t u_{t-1}
        nu = self.signs(key, u)  # nu: independent random signs, (B, S) in all
        nuM = immediate_transpose(cell, layers, traces, nu)  # nu^T M_t per example, (B, n)
        rho0 = jnp.sqrt(per_example_norm(v) / (per_example_norm(Ju) + eps)) + eps  # rho_0 (B,)
        rho1 = jnp.sqrt(per_example_norm(nuM) / (per_example_norm(nu) + eps)) + eps  # rho_1 (B,)
        u_new = jax.tree.map(jnp.add, scale(rho0, Ju), scale(rho1, nu))  # rho0 J u + rho1 nu
        v_new = jax.tree.map(jnp.add, scale(1 / rho0, v), scale(1 / rho1, nuM))  # v/rho0 + nuM/rho1
        m = traces[0].m
        return keep(m, u_new, u), keep(m, v_new, v)  # frozen past a sequence's end

    def read_out(self, cell, layers, state, dh, dy, readout_weight):
        u, v = state
        q = jnp.sum(dh * u[-1][0], axis=1)  # dl_t/dh_t . u_t, per example (B,)
        return jax.tree.map(lambda a: jnp.tensordot(q, a, 1), v)  # sum_b q_b v_b

    def cost(self, cell, layers, batch):
        n, S = num_params(layers), state_size(cell, layers)
        return Cost(state=batch * (n + S), work=batch * (n + S),
                    flops=2 * step_flops(cell, layers, batch) + 4 * batch * (n + S),
                    formula="state B (n + S); work B (n + S); one tangent and one transposed "
                            "tangent per step, O(B n)")
