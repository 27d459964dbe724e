r"""KF-RTRL: Kronecker-factored RTRL (Mujika, Meier & Steger, NeurIPS 2018).

For a one-layer cell whose parameters reach the step only through the
pre-activation :math:`a_t = W z_t`, with :math:`W = [W_{ih}\ W_{hh}\ b_{ih}\ b_{hh}]`
(H x K) and :math:`z_t = [x_t;\ h_{t-1};\ 1;\ 1]` (K = D + H + 2, one 1 per bias), the
immediate influence factorises: :math:`M_t = z_t^\top \otimes D_t`, i.e.
:math:`\partial h_{t,k}/\partial W_{ij} = (D_t)_{ki}\, z_{t,j}` with
:math:`D_t = \mathrm{diag}(\partial h_t/\partial a_t)` (H x H). So does
:math:`P_t \approx u_t^\top \otimes A_t`, :math:`(P_t)_{k,(i,j)} \approx (A_t)_{ki}\,
u_{t,j}`, with u (K,) and A (H, H) per example. With two independent random signs
:math:`c_1, c_2` per example and step (their Section 3; Marschall, Cho & Savin 2020's
``KF_RTRL``):

.. math::
    \rho_0 = \sqrt{\frac{\lVert J_t A_{t-1}\rVert}{\lVert u_{t-1}\rVert + \epsilon}}
        + \epsilon, \qquad
    \rho_1 = \sqrt{\frac{\lVert D_t\rVert}{\lVert z_t\rVert + \epsilon}} + \epsilon,

.. math::
    u_t = c_1 \rho_0\, u_{t-1} + c_2 \rho_1\, z_t, \qquad
    A_t = c_1 \frac{J_t A_{t-1}}{\rho_0} + c_2 \frac{D_t}{\rho_1}, \qquad
    u_0 = 0,\ A_0 = 0,

with :math:`J_t = \partial h_t/\partial h_{t-1}`. Unbiased:
:math:`E[c_1^2] = E[c_2^2] = 1` and :math:`E[c_1 c_2] = 0`, and :math:`\rho_0, \rho_1`
depend on no sign of step t, so :math:`E[u_t^\top\otimes A_t] = J_t E[u_{t-1}^\top
\otimes A_{t-1}] + z_t^\top \otimes D_t = P_t` by induction; the :math:`\rho`'s only
balance the factors' norms (the variance). :math:`\epsilon` (as UORO's) keeps the
first step, from zero, finite. The gradient read out at step t:
:math:`\partial L/\partial W_{ij} \mathrel{+}= \sum_b (\partial\ell_t/\partial h_{t,b}^\top
A_{t,b})_i\, u_{t,b,j}`, split by z's blocks into ``w_ih``, ``w_hh``, ``b_ih``, ``b_hh``.

:math:`D_t` is the cell's ``tangent_step`` with :math:`\dot{xp} = 1` and zero tangents
elsewhere; :math:`J_t A` is ``tangent_step`` on A's H columns (``jax.vmap``). Defined
for the Elman and leaky cells, one layer (``check`` refuses others).

Memory :math:`B (K + H^2)`; per step H state tangents, :math:`O(B H^3)` multiplies.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxrnn._src import cells
from jaxrnn._src.estimators.base import Cost, Estimator, hidden_size, zeros_like
from jaxrnn._src.estimators.uoro import keep, per_example_norm, scale

# the cells whose immediate Jacobian is D_t (z_t^T kron I): parameters only through a_t = W z_t
FACTORISED = ("elman", "leaky")


def inputs_row(p, x, h_prev) -> jax.Array:
    """:math:`z_t = [x_t;\\ h_{t-1};\\ 1 \\text{ per bias}]`, (B, K)."""
    ones = [jnp.ones_like(x[:, :1]) for b in (p.b_ih, p.b_hh) if b is not None]
    return jnp.concatenate([x, h_prev.astype(x.dtype)] + ones, axis=1)


def split_columns(p, W):
    """The (H, K) gradient of :math:`W = [W_{ih}\\ W_{hh}\\ b_{ih}\\ b_{hh}]` shaped like ``p``."""
    D, H = p.w_ih.shape[1], p.w_hh.shape[1]
    b_ih = None if p.b_ih is None else W[:, D + H]  # z's first 1
    b_hh = None if p.b_hh is None else W[:, -1]  # z's last 1
    return p._replace(w_ih=W[:, :D], w_hh=W[:, D:D + H], b_ih=b_ih, b_hh=b_hh)


@dataclasses.dataclass(frozen=True)
class KFRTRL(Estimator):
    r"""KF-RTRL (Mujika, Meier & Steger 2018): :math:`P_t \approx u_t^\top \otimes A_t`.

    See the module docstring for the update. The state is ``(u, A)``: ``u`` (B, K),
    ``A`` (B, H, H). Past a sequence's length both stay as they are.

    Args:
        eps: the :math:`\epsilon` of :math:`\rho_0, \rho_1`.
    """

    eps: float = 1e-7

    name: ClassVar[str] = "kf_rtrl"
    exact: ClassVar[bool] = False
    stochastic: ClassVar[bool] = True

    def check(self, cell, num_layers):
        if type(cell) not in tuple(cells.CELLS.get(n) for n in FACTORISED) or num_layers != 1:
            raise ValueError(
                f"method='kf_rtrl' needs one layer of the 'elman' or 'leaky' cell (its immediate "
                f"Jacobian must factorise as z_t^T kron D_t), got {num_layers} layer(s) of "
                f"{cell.name!r}")

    def init(self, cell, layers, carries0, key):
        self.check(cell, len(layers))
        (p,), h0 = layers, carries0[0][0]
        B, H = h0.shape
        K = p.w_ih.shape[1] + H + sum(b is not None for b in (p.b_ih, p.b_hh))  # z_t's length
        return jnp.zeros((B, K), h0.dtype), jnp.zeros((B, H, H), h0.dtype)  # u_0 = 0, A_0 = 0

    def signs(self, key, B, dtype):
        """The step's :math:`(c_1, c_2)`: independent random signs, (B,) each."""
        return tuple(jax.random.rademacher(key, (2, B), dtype))

    def update(self, cell, layers, state, traces, key):
        u, A = state
        (p,), (tr,) = layers, traces
        eps, zero_p = self.eps, zeros_like(p)
        tangent = lambda dh_prev, dxp: cell.tangent_step(  # noqa: E731
            p, tr.carry_prev, tr.xp, tr.carry, tr.res, zero_p, (dh_prev,), dxp)[0]
        zero_h, zero_xp = jnp.zeros_like(tr.carry[0]), jnp.zeros_like(tr.xp)
        d = tangent(zero_h, jnp.ones_like(tr.xp))  # diag(D_t) = dh_t/da_t, (B, H)
        JA = jax.vmap(lambda a: tangent(a, zero_xp), in_axes=2, out_axes=2)(A)  # J_t A, (B, H, H)
        z = inputs_row(p, tr.x, tr.carry_prev[0])  # z_t = [x_t, h_{t-1}, 1, 1], (B, K)
        c1, c2 = self.signs(key, u.shape[0], u.dtype)  # independent random signs, (B,) each
        rho0 = jnp.sqrt(per_example_norm(JA) / (per_example_norm(u) + eps)) + eps  # rho_0 (B,)
        rho1 = jnp.sqrt(per_example_norm(d) / (per_example_norm(z) + eps)) + eps  # rho_1 (B,)
        u_new = scale(c1 * rho0, u) + scale(c2 * rho1, z)  # c1 rho0 u + c2 rho1 z
        D = jax.vmap(jnp.diag)(d)  # D_t, (B, H, H)
        A_new = scale(c1 / rho0, JA) + scale(c2 / rho1, D)  # c1 J A / rho0 + c2 D / rho1
        return keep(tr.m, u_new, u), keep(tr.m, A_new, A)  # frozen past a sequence's end

    def read_out(self, cell, layers, state, dh, dy, readout_weight):
        u, A = state
        q = jnp.einsum("bk,bki->bi", dh, A)  # dl_t/dh_t^T A_t, per example (B, H)
        return (split_columns(layers[0], q.T @ u),)  # dW = sum_b q_b u_b^T, (H, K)

    def cost(self, cell, layers, batch):
        (p,) = layers
        H = hidden_size(cell, p)
        K = p.w_ih.shape[1] + H + sum(b is not None for b in (p.b_ih, p.b_hh))  # z_t's length
        return Cost(state=batch * (K + H * H), work=batch * H * H,
                    flops=2 * batch * H ** 3 + 2 * batch * H * K,
                    formula="state B (K + H^2), K = D + H + 2 (biases); work B H^2; H state tangents "
                            "per step, O(B H^3)")
