r"""A fixed sparsity mask for the recurrent weights (the sparse networks of Menick et al. 2021).

SnAp-n keeps the sensitivities a parameter reaches within n steps of the recurrent
graph (``snap``); with a dense ``w_hh`` two steps reach every unit and SnAp-2 is
RTRL. Menick et al. (2021, Sec. 5) train networks whose recurrent weights are
sparse, with a fixed random pattern; this module gives that pattern:

* ``recurrent_mask(key, tree, density)``: True on a random ``density`` fraction of
  each ``w_hh`` matrix (its unit diagonal always kept), True everywhere else;
* ``apply_mask(tree, masks)``: zeros outside the mask;
* ``fixed_sparsity(masks)``: an optax ``GradientTransformation`` that zeroes the
  updates outside the mask, so that training keeps the zeros (put it last in the
  chain, after the optimizer, as weight decay or momentum would otherwise move them).

``tree`` is any pytree of parameters holding NamedTuples with a ``w_hh`` field: one
direction's ``layers`` tuple, or a model's whole ``RNNParams``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax


def _is_recurrent_matrix(path, leaf) -> bool:
    """A ``w_hh`` field of shape (G*H, H) (IndRNN's vector is its own diagonal: all kept)."""
    last = path[-1] if path else None
    return (isinstance(last, jax.tree_util.GetAttrKey) and last.name == "w_hh"
            and getattr(leaf, "ndim", 0) == 2 and leaf.shape[0] % leaf.shape[1] == 0)


@functools.partial(jax.jit, static_argnums=(1, 2))  # one small program, not a dozen eager ops
def _random_mask(key, shape: tuple[int, int], density: float) -> jax.Array:
    """(G*H, H) bool: the G*H unit-diagonal entries ``[g*H+i, i]``, plus random others.

    Exactly ``max(round(density * size), G*H)`` entries are True: the diagonal, then
    the rest drawn uniformly without replacement from the off-diagonal entries.
    """
    rows, H = shape
    diag = jnp.tile(jnp.eye(H, dtype=bool), (rows // H, 1)).ravel()  # W[g*H+i, i]
    extra = max(round(density * rows * H) - rows, 0)  # off-diagonal entries to keep
    score = jax.random.uniform(key, (rows * H,))  # a random order of the entries
    score = jnp.where(diag, -1.0, score)  # the diagonal never competes (already kept)
    chosen = jnp.zeros(rows * H, bool)
    if extra:
        chosen = score >= jnp.sort(score)[-extra]  # the `extra` highest off-diagonal scores
    return (diag | chosen).reshape(shape)


def recurrent_mask(key: jax.Array, tree, density: float):
    """A fixed random sparsity mask for every recurrent matrix ``w_hh`` of ``tree``.

    Args:
        key: a JAX PRNG key (each ``w_hh`` gets its own ``fold_in``).
        tree: parameters: a pytree holding NamedTuples with a ``w_hh (G*H, H)`` field
            (a ``layers`` tuple, or ``RNNParams``).
        density: the fraction of each ``w_hh``'s entries kept, in (0, 1]; the G*H
            unit-diagonal entries ``[g*H+i, i]`` are always kept (SnAp-1's pattern).

    Returns:
        A pytree of bool arrays like ``tree`` (its None leaves stay None): True on the
        kept entries of each ``w_hh``, True everywhere on every other leaf.

    Raises:
        ValueError: ``density`` outside (0, 1].
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) \
            or not 0 < density <= 1 or math.isnan(density):
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    count = iter(range(10**9))

    def mask(path, leaf):
        if _is_recurrent_matrix(path, leaf):
            return _random_mask(jax.random.fold_in(key, next(count)), leaf.shape, density)
        return jnp.ones(jnp.shape(leaf), bool)

    return jax.tree_util.tree_map_with_path(mask, tree)


def apply_mask(tree, masks):
    """``tree`` with zeros outside ``masks`` (bools like it: ``recurrent_mask``'s)."""
    return jax.tree.map(lambda a, m: jnp.where(m, a, jnp.zeros_like(a)), tree, masks)


def fixed_sparsity(masks) -> optax.GradientTransformation:
    """An optax transformation that zeroes the updates outside ``masks``.

    With parameters that are zero outside the mask (``apply_mask``), ``optax.
    apply_updates`` then keeps them zero. Put it last in the chain.

    Args:
        masks: a pytree of bools like the parameters (``recurrent_mask``'s).

    Returns:
        A stateless ``optax.GradientTransformation``.
    """

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return apply_mask(updates, masks), state

    return optax.GradientTransformation(init, update)
