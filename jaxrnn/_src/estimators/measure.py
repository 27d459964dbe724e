r"""Measuring an estimator against the exact gradient: alignment, error, spread, step by step.

For an estimate :math:`\hat g` of the exact gradient :math:`g` (both flattened over
every recurrent parameter):

.. math::
    \cos(\hat g, g) = \frac{\hat g \cdot g}{\|\hat g\|\,\|g\|}, \qquad
    \mathrm{err}(\hat g, g) = \frac{\|\hat g - g\|}{\|g\|}, \qquad
    \rho = \frac{\|\hat g\|}{\|g\|} .

``Paired`` runs an estimator and exact RTRL side by side in one pass, so that each
step's read-out :math:`(\partial\ell_t/\partial h_t)^\top \hat P_t` can be set
beside the exact :math:`(\partial\ell_t/\partial h_t)^\top P_t` (the per-step
alignment Marschall et al. 2020 plot), on the same trajectory.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jaxrnn._src.estimators.base import Cost, Estimator
from jaxrnn._src.estimators.rtrl import RTRL


class Alignment(NamedTuple):
    """An estimate against the exact gradient (scalars, or arrays with leading axes)."""

    cosine: jax.Array  # cos(g_hat, g): 1 for a perfect direction
    rel_error: jax.Array  # |g_hat - g| / |g|
    norm_ratio: jax.Array  # |g_hat| / |g|


def flatten(tree, axes: int = 0) -> jax.Array:
    """Every leaf of ``tree`` flattened after its first ``axes`` axes, concatenated."""
    leaves = jax.tree.leaves(tree)
    lead = leaves[0].shape[:axes]
    return jnp.concatenate([a.reshape(lead + (-1,)) for a in leaves], axis=-1)


def alignment(estimate, exact, axes: int = 0) -> Alignment:
    """``Alignment`` of ``estimate`` against ``exact`` (pytrees of the same structure).

    Args:
        estimate: the estimated gradient.
        exact: the exact gradient.
        axes: leading axes of every leaf that are not the gradient's (steps, draws):
            one alignment per index of them.

    Returns:
        An ``Alignment``; where the exact gradient is zero the ratios are NaN.
    """
    a, b = flatten(estimate, axes), flatten(exact, axes)
    na, nb = jnp.linalg.norm(a, axis=-1), jnp.linalg.norm(b, axis=-1)
    cos = jnp.sum(a * b, axis=-1) / (na * nb)
    return Alignment(cos, jnp.linalg.norm(a - b, axis=-1) / nb, na / nb)


@dataclasses.dataclass(frozen=True)
class Paired(Estimator):
    """An estimator run beside exact RTRL: its read-out is the pair ``(estimate, exact)``.

    Memory and time: the sum of the two (RTRL's dominate).
    """

    estimator: Estimator = RTRL()

    name: ClassVar[str] = "paired"

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.estimator.stochastic

    def check(self, cell, num_layers):
        self.estimator.check(cell, num_layers)

    def init(self, cell, layers, carries0, key):
        return self.estimator.init(cell, layers, carries0, key), RTRL().init(cell, layers,
                                                                             carries0, None)

    def update(self, cell, layers, state, traces, key):
        s, p = state
        return (self.estimator.update(cell, layers, s, traces, key),
                RTRL().update(cell, layers, p, traces, None))

    def read_out(self, cell, layers, state, dh, dy, readout_weight):
        s, p = state
        return (self.estimator.read_out(cell, layers, s, dh, dy, readout_weight),
                RTRL().read_out(cell, layers, p, dh, dy, readout_weight))

    def cost(self, cell, layers, batch):
        a, b = self.estimator.cost(cell, layers, batch), RTRL().cost(cell, layers, batch)
        return Cost(a.state + b.state, a.work + b.work, a.flops + b.flops,
                    f"{a.formula}; plus RTRL's")
