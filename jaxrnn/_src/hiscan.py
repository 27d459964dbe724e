r"""The handwritten BPTT as a ``jax.experimental.hijax`` primitive: reverse *and* forward mode.

``jax.custom_vjp`` gives a function a reverse-mode rule only: ``jax.jvp``,
``jax.jacfwd`` and ``jax.linearize`` through it raise ``can't apply forward-mode
autodiff (jvp) to a custom_vjp function`` (jax#16049). A ``VJPHiPrimitive``
carries both rules:

- reverse mode (``vjp_fwd`` / ``vjp_bwd_retval``): the layer's forward scan that
  keeps the residuals, then the handwritten reverse scan, the very functions the
  ``custom_vjp`` path uses, so first-order gradients are bit for bit the same;
- forward mode (``jvp``, and ``lin`` / ``linearized`` for ``jax.linearize``): the
  forward scan keeping its residuals, then the handwritten tangent scan
  (``scan.tangent_scan``), the cell's ``tangent_step`` at every step:

.. math::
    \dot{carry}_t = \frac{\partial\, \mathrm{step}}{\partial (params, carry, xp)}
    \cdot (\dot{params}, \dot{carry}_{t-1}, \dot{xp}_t)

- ``vmap`` over the data (unmapped parameters): the mapped axis merged into the
  layer's batch axis, one layer over ``V*B`` rows (``HiLayer.batch``); an ensemble
  (mapped parameters) vmaps the rules (hijax's ``VmapOf``).

hijax is experimental: it is used only on the jax versions in ``SUPPORTED``, and
only when ``JAXRNN_BPTT_RULE=hijax`` (``scan.bptt_rule``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

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

    Params (static, hashed): ``rules.primal(static, params, xs, carry0, mask)`` the
    forward scan; ``rules.fwd(static, ...) -> (out, residuals)`` and
    ``rules.bwd(static, residuals, cotangents) -> (dparams, dxs, dcarry0, None)`` the
    handwritten BPTT; ``rules.lin(static, ...) -> (out, saved)`` and
    ``rules.linearized(static, saved, dparams, dxs, dcarry0) -> tangents`` the
    handwritten tangent scan; ``static`` a hashable tuple (the cell, the segment,
    the compute dtype).
    """

    def __init__(self, rules, static, args):
        self.in_avals = jax.tree.map(jax.typeof, args)
        closed, out_tree = jax.make_jaxpr(lambda *a: rules.primal(static, *a),
                                          return_shape=True)(*args)
        self.out_aval = jax.tree.unflatten(jax.tree.structure(out_tree), closed.out_avals)
        self.params = dict(rules=rules, static=static)
        super().__init__()

    # -- the primal: the forward scan ---------------------------------------------------
    def expand(self, params, xs, carry0, mask):
        return self.rules.primal(self.static, params, xs, carry0, mask)

    # -- reverse mode: the handwritten reverse scan ---------------------------------------
    def vjp_fwd(self, nzs_in, params, xs, carry0, mask):
        return self.rules.fwd(self.static, params, xs, carry0, mask)

    def vjp_bwd_retval(self, res, cotangents):
        dparams, dxs, dcarry0, _ = self.rules.bwd(self.static, res, _instantiate(cotangents))
        mask_aval = self.in_avals[3]
        dmask = None if mask_aval is None else Zero(mask_aval.to_ct_aval())  # boolean
        return dparams, dxs, dcarry0, dmask

    # -- forward mode: the handwritten tangent scan ---------------------------------------
    def jvp(self, primals, tangents):
        out, saved = self.rules.lin(self.static, *primals)
        tp, tx, tc, _ = _instantiate(tangents)  # the mask is boolean: no tangent
        return out, self.rules.linearized(self.static, saved, tp, tx, tc)

    def lin(self, nzs_in, params, xs, carry0, mask):
        return self.rules.lin(self.static, params, xs, carry0, mask)

    def linearized(self, saved, tp, tx, tc, tmask):
        return self.rules.linearized(self.static, saved, *_instantiate((tp, tx, tc)))

    # -- vmap: the mapped axis folded into the layer's batch --------------------------------
    def batch(self, axis_data, args, dims):
        """``jax.vmap`` over examples: one layer over ``V*B`` rows, not ``V`` layers.

        With the parameters unmapped (a model vmapped over its data, as Equinox runs
        a batch), the rows of a layer are independent, so the mapped axis ``V`` is
        merged into the batch axis ``B``: ``xs (T, B, D)`` mapped becomes ``(T, V*B,
        D)``, each carry ``(V*B, H)``, the mask ``(T, V*B)``, and the layer runs
        once; its reverse scan then forms each weight gradient as one product over
        all ``T*V*B`` rows, which is the sum over the mapped axis that ``vmap``'s
        transpose wants for an unmapped input. Mapped parameters (an ensemble), or a
        vmap over a mesh axis, take hijax's default, the rules vmapped.
        """
        params_dims, xs_dim, carry_dims, mask_dim = dims
        mapped_params = any(d is not None for d in jax.tree.leaves(params_dims))
        if mapped_params or axis_data.spmd_name or axis_data.explicit_mesh_axis:
            return super().batch(axis_data, args, dims)
        params, xs, carry0, mask = args
        V = axis_data.size
        xs = _fold(xs, xs_dim, 1, V)  # (T, V*B, D)
        carry0 = jax.tree.map(lambda c, d: _fold(c, d, 0, V), carry0, carry_dims)
        mask = None if mask is None else _fold(mask, mask_dim, 1, V)
        hs, carry_T = hi_layer(self.rules, self.static, params, xs, carry0, mask)
        unfold = lambda a, axis: a.reshape(a.shape[:axis] + (V, -1) + a.shape[axis + 1:])  # noqa: E731
        return ((unfold(hs, 1), jax.tree.map(lambda c: unfold(c, 0), carry_T)),
                (1, jax.tree.map(lambda _: 0, carry_T)))

    def batch_dim_rule(self, axis_data, dims):
        """hijax's default (``VmapOf``, the rules vmapped): every output mapped on axis 0."""
        return jax.tree.map(lambda _: 0, self.out_aval)


def _fold(a, dim, axis: int, size: int):
    """``a`` with its mapped axis ``dim`` (None: unmapped, broadcast to ``size``) merged
    into its batch axis ``axis``, mapped-major: ``(..., V*B, ...)``."""
    a = jnp.broadcast_to(a[None], (size,) + a.shape) if dim is None else jnp.moveaxis(a, dim, 0)
    a = jnp.moveaxis(a, 0, axis)  # (..., V, B, ...)
    return a.reshape(a.shape[:axis] + (-1,) + a.shape[axis + 2:])


class Rules(NamedTuple):
    """A layer's rules as ``HiLayer`` calls them (module-level functions: hashable)."""

    primal: Callable
    fwd: Callable
    bwd: Callable
    lin: Callable
    linearized: Callable


def hi_layer(rules: Rules, static, params, xs, carry0, mask):
    """Binds ``HiLayer``: ``(hs, carry_T)`` with both reverse- and forward-mode rules."""
    args = (params, xs, carry0, mask)
    return HiLayer(rules, static, args)(*args)
