"""Tasks: data sources for training and the reference worked example."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrnn.cells import CellParams
from jaxrnn.model import RNN, ReadoutParams, RNNParams


class Batch(NamedTuple):
    """One training batch, time-major."""

    xs: jax.Array  # (T, B, D)
    targets: jax.Array  # (T, B, O) floats, or (T, B) integer classes for xent
    lengths: jax.Array | None = None  # (B,) integers in [1, T], or None


class Example(NamedTuple):
    """The reference worked example (``shared/seed-worked-example.md``)."""

    model: RNN
    params: RNNParams
    batch: Batch
    h0: jax.Array  # (1, 1, 1) initial state
    lr: float


def reference_example(xs=(1.0, 2.0, 3.0), targets=(0.5, 1.0, 1.5), w_xh: float = 0.5,
                      w_hh: float = 0.1, w_hy: float = 1.0, h0: float = 0.0, lr: float = 0.1,
                      dtype=jnp.float32) -> Example:
    """The one-unit, bias-free tanh RNN of the worked example, or a variant of it.

    Defaults are the example's: ``x = [1, 2, 3]``, ``t = [0.5, 1.0, 1.5]``,
    ``W_xh = 0.5``, ``W_hh = 0.1``, ``W_hy = 1.0``, ``h_0 = 0``, ``lr = 0.1``.

    Args:
        xs: the T inputs (one feature, one sequence).
        targets: the T targets.
        w_xh, w_hh, w_hy: the three weights.
        h0: the initial hidden state.
        lr: the learning rate of the plain gradient step.
        dtype: floating dtype of every array.

    Returns:
        An ``Example``: the model, its params, a ``Batch`` with ``xs (T, 1, 1)`` and
        ``targets (T, 1, 1)``, the initial state ``(1, 1, 1)`` and ``lr``.
    """
    xs = jnp.asarray(xs, dtype).reshape(-1, 1, 1)
    targets = jnp.asarray(targets, dtype).reshape(-1, 1, 1)
    if xs.shape[0] == 0:
        raise ValueError("xs is an empty sequence: give at least one input")
    if targets.shape != xs.shape:
        raise ValueError(f"targets must have one value per input: {xs.shape[0]} inputs, "
                         f"got {targets.shape[0]} targets")
    model = RNN(cell="elman", input_size=1, hidden_size=1, output_size=1, bias=False,
                readout_bias=False, nonlinearity="tanh")
    w = lambda v: jnp.full((1, 1), v, dtype)  # noqa: E731
    params = RNNParams(layers=((CellParams(w_ih=w(w_xh), w_hh=w(w_hh), b_ih=None, b_hh=None),),),
                       readout=ReadoutParams(weight=w(w_hy), bias=None))
    return Example(model, params, Batch(xs, targets), jnp.full((1, 1, 1), h0, dtype), lr)
