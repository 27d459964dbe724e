r"""The handwritten BPTT as a ``jax.experimental.hijax`` primitive: reverse *and* forward mode.

``jax.custom_vjp`` gives a function a reverse-mode rule only: ``jax.jvp``,
``jax.jacfwd`` and ``jax.linearize`` through it raise ``can't apply forward-mode
autodiff (jvp) to a custom_vjp function`` (jax#16049). A ``VJPHiPrimitive``
carries both rules:

- reverse mode (``vjp_fwd`` / ``vjp_bwd_retval``): the layer's forward scan that
  keeps the residuals, then the handwritten reverse scan, the very functions the
  ``custom_vjp`` path uses, so first-order gradients are bit for bit the same;
- forward mode (``jvp``, and ``lin`` / ``linearized`` for ``jax.linearize``): the
  tangent scan is ``jax.jvp`` (``jax.linearize``) of the primal forward scan,
  exact forward-mode differentiation of the same computation:

.. math::
    (\dot{carry}_t, \dot{h}_t) = \frac{\partial\, \mathrm{step}}{\partial (params, carry, xp)}
    \cdot (\dot{params}, \dot{carry}_{t-1}, \dot{xp}_t)

- ``vmap``: every output is batched on axis 0 (hijax's ``VmapOf`` vmaps the rules).

hijax is experimental: it is used only on the jax versions in ``SUPPORTED``, and
only when ``JAXRNN_BPTT_RULE=hijax`` (``scan.bptt_rule``).
"""

from __future__ import annotations

import jax

SUPPORTED = ((0, 10), (0, 11))  # [lowest, first unsupported) jax (major, minor)

try:
    if not SUPPORTED[0] <= tuple(jax.__version_info__[:2]) < SUPPORTED[1]:
        raise ImportError(f"jax {jax.__version__} is outside {SUPPORTED}")
    from jax.experimental.hijax import VJPHiPrimitive, Zero, instantiate_zeros
    AVAILABLE, REASON = True, ""
except (ImportError, AttributeError) as e:  # pragma: no cover - depends on the jax installed
    VJPHiPrimitive, Zero = object, None
    AVAILABLE, REASON = False, str(e)


def _is_zero(t) -> bool:
    return Zero is not None and isinstance(t, Zero)


def _instantiate(tree):
    """Symbolic zero tangents as arrays of zeros of their type."""
    return jax.tree.map(lambda t: instantiate_zeros(t) if _is_zero(t) else t,  # keeps the vma
                        tree, is_leaf=_is_zero)


class HiLayer(VJPHiPrimitive):
    """One recurrent layer ``(params, xs, carry0, mask) -> (hs, carry_T)`` as a primitive.

    Params (static, hashed): ``primal(static, params, xs, carry0, mask)`` the forward
    scan; ``fwd(static, ...) -> (out, residuals)`` and ``bwd(static, residuals,
    cotangents) -> (dparams, dxs, dcarry0, None)`` the handwritten BPTT; ``static``
    a hashable tuple (the cell, the segment).
    """

    def __init__(self, primal, fwd, bwd, static, args):
        self.in_avals = jax.tree.map(jax.typeof, args)
        closed, out_tree = jax.make_jaxpr(lambda *a: primal(static, *a), return_shape=True)(*args)
        self.out_aval = jax.tree.unflatten(jax.tree.structure(out_tree), closed.out_avals)
        self.params = dict(primal=primal, fwd=fwd, bwd=bwd, static=static)
        super().__init__()

    # -- the primal: the forward scan ---------------------------------------------------
    def expand(self, params, xs, carry0, mask):
        return self.primal(self.static, params, xs, carry0, mask)

    # -- reverse mode: the handwritten reverse scan ---------------------------------------
    def vjp_fwd(self, nzs_in, params, xs, carry0, mask):
        return self.fwd(self.static, params, xs, carry0, mask)

    def vjp_bwd_retval(self, res, cotangents):
        dparams, dxs, dcarry0, _ = self.bwd(self.static, res, _instantiate(cotangents))
        mask_aval = self.in_avals[3]
        dmask = None if mask_aval is None else Zero(mask_aval.to_ct_aval())  # boolean
        return dparams, dxs, dcarry0, dmask

    # -- forward mode: jvp / linearize of the forward scan ------------------------------
    def _differentiable(self, mask):
        return lambda p, x, c: self.primal(self.static, p, x, c, mask)

    def jvp(self, primals, tangents):
        params, xs, carry0, mask = primals
        tp, tx, tc, _ = _instantiate(tangents)  # the mask is boolean: no tangent
        return jax.jvp(self._differentiable(mask), (params, xs, carry0), (tp, tx, tc))

    def lin(self, nzs_in, params, xs, carry0, mask):
        out, f_jvp = jax.linearize(self._differentiable(mask), params, xs, carry0)
        return out, f_jvp

    def linearized(self, f_jvp, tp, tx, tc, tmask):
        return f_jvp(*_instantiate((tp, tx, tc)))

    # -- vmap: every output batched on axis 0 ----------------------------------------------
    def batch_dim_rule(self, axis_data, dims):
        return jax.tree.map(lambda _: 0, self.out_aval)


def hi_layer(primal, fwd, bwd, static, params, xs, carry0, mask):
    """Binds ``HiLayer``: ``(hs, carry_T)`` with both reverse- and forward-mode rules."""
    args = (params, xs, carry0, mask)
    return HiLayer(primal, fwd, bwd, static, args)(*args)
