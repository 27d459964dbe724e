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


def zero_masked(a: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``a (T, B, ...)`` with the positions where ``mask (T, B)`` is False set to zero.

    The one home of the padding rule: what lies past a sequence's length (inputs,
    targets: NaN, inf, an out-of-range class) reaches no output, no loss and no
    gradient. Masking a product's *result* is not enough for gradients: the
    cotangent through ``where`` is zero there, but ``0 * nan`` is NaN, so the values
    themselves are replaced before anything reads them.
    """
    if mask is None:
        return a
    return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim)), a, 0)


def half_sse(ys: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Half the sum of squared errors.

    Args:
        ys: predictions, (T, B, O).
        targets: regression targets, (T, B, O).
        mask: optional boolean (T, B); False steps contribute nothing.

    Returns:
        A scalar.
    """
    se = (ys - zero_masked(targets, mask)) ** 2  # padding targets reach nothing
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
    se = (ys - zero_masked(targets, mask)) ** 2  # padding targets reach nothing
    if mask is None:
        return jnp.mean(se)
    se = jnp.where(mask[:, :, None], se, 0)
    count = jnp.sum(mask) * ys.shape[-1]
    return jnp.sum(se) / jnp.maximum(count, 1)


def xent(ys: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Softmax cross-entropy (in nats), averaged over the valid (step, batch) positions.

    Args:
        ys: logits, (T, B, O).
        targets: integer classes in ``[0, O)``, (T, B); anything past the lengths
            (``mask`` False, e.g. -1 padding) is ignored.
        mask: optional boolean (T, B).

    Returns:
        A scalar: NaN when a scored target lies outside ``[0, O)`` (under ``jax.jit``,
        where the values cannot be checked first; the training loop's NaN guard
        then stops the run; outside ``jit`` the model's ``check_targets`` refuses
        them).
    """
    targets = zero_masked(targets, mask)  # padding classes reach nothing
    in_range = (targets >= 0) & (targets < ys.shape[-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(ys, jnp.where(in_range, targets, 0))
    nll = jnp.where(in_range, nll, jnp.nan)  # a class outside [0, O): NaN, not a wrong class
    if mask is None:
        return jnp.mean(nll)
    nll = jnp.where(mask, nll, 0)
    return jnp.sum(nll) / jnp.maximum(jnp.sum(mask), 1)


def divisor(name: str, scored: jax.Array, output_size: int) -> jax.Array:
    """What the loss called ``name`` divides its sum by, for the (T, B) positions ``scored``.

    1 for ``half_sse`` (a sum); the scored ``(t, b, o)`` positions for ``mse``; the
    scored ``(t, b)`` positions for ``xent``; at least 1 (as the losses above).
    """
    get_loss(name)
    if name == "half_sse":
        return jnp.ones((), jnp.float32)
    count = jnp.maximum(jnp.sum(scored), 1)
    return count * output_size if name == "mse" else count


def step_term(name: str, y: jax.Array, target: jax.Array, scored: jax.Array,
              total_divisor: jax.Array) -> jax.Array:
    r"""One step's share :math:`\ell_t` of a sequence loss: :math:`\sum_t \ell_t` is the loss.

    Every loss here is a sum over the steps divided by ``divisor``; this is the
    loss of the one step (computed by the loss itself, over a sequence of one step)
    times that step's own divisor, over the whole sequence's. Online estimators
    take its gradient with respect to ``y`` at every step.

    Args:
        name: the loss's name.
        y: the step's outputs, (B, O).
        target: its targets, (B, O) floats or (B,) integer classes.
        scored: (B,) bool, the positions the loss scores at this step.
        total_divisor: ``divisor(name, scored_over_all_steps, O)``.

    Returns:
        A scalar.
    """
    m = scored[None]
    one_step = get_loss(name)(y[None], target[None], m)
    return one_step * divisor(name, m, y.shape[-1]).astype(y.dtype) / total_divisor


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
