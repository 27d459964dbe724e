r"""Sequence losses, all aware of a (T, B) validity mask.

* ``half_sse``: :math:`L = \tfrac12 \sum_{t,b,o} (y_{tbo} - \hat y_{tbo})^2`, summed, not
  averaged (the reference example's loss);
* ``mse``: the mean of the squared errors over valid steps, batch elements and outputs;
* ``xent``: softmax cross-entropy against integer class targets ``(T, B)``, averaged
  over the valid (step, batch) positions.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[jax.Array, jax.Array, "jax.Array | None"], jax.Array]


def half_sse(ys: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Half the sum of squared errors.

    Args:
        ys: predictions, (T, B, O).
        targets: regression targets, (T, B, O).
        mask: optional boolean (T, B); False steps contribute nothing.

    Returns:
        A scalar.
    """
    se = (ys - targets) ** 2
    if mask is not None:
        se = jnp.where(mask[:, :, None], se, 0)
    return 0.5 * jnp.sum(se)


def mse(ys: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean squared error over the valid steps, batch elements and outputs.

    Args:
        ys: predictions, (T, B, O).
        targets: regression targets, (T, B, O).
        mask: optional boolean (T, B).

    Returns:
        A scalar.
    """
    se = (ys - targets) ** 2
    if mask is None:
        return jnp.mean(se)
    se = jnp.where(mask[:, :, None], se, 0)
    count = jnp.sum(mask) * ys.shape[-1]
    return jnp.sum(se) / jnp.maximum(count, 1)


def xent(ys: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Softmax cross-entropy (in nats), averaged over the valid (step, batch) positions.

    Args:
        ys: logits, (T, B, O).
        targets: integer classes in ``[0, O)``, (T, B).
        mask: optional boolean (T, B).

    Returns:
        A scalar.
    """
    nll = optax.softmax_cross_entropy_with_integer_labels(ys, targets)
    if mask is None:
        return jnp.mean(nll)
    nll = jnp.where(mask, nll, 0)
    return jnp.sum(nll) / jnp.maximum(jnp.sum(mask), 1)


# keys: names.LossName, which a test keeps equal
LOSSES: dict[str, LossFn] = {"half_sse": half_sse, "mse": mse, "xent": xent}


def get_loss(name: str) -> LossFn:
    """The loss called ``name``.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {name!r}")
    return LOSSES[name]
