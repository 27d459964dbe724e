"""The layer x direction walk: one home for how a stack of recurrent layers is run.

Layer ``l``'s directions all read the layer's input ``h`` (the first, ``h``
itself; the second, each sequence reversed within its length, as PyTorch's
packed sequences); their outputs, back in the original time order, are
concatenated, ``(T, B, dirs*H)``, and inverted dropout (training only) is applied
between layers. The model's forward (``RNN.features``) and the diagnostics'
walk (which keeps each layer's forward trace for its reverse scans) both run it,
each with its own per-direction function.

The walk's order and naming, ``layer_directions``: layer by layer, direction by
direction, each named as PyTorch names its parameters (``_l{l}``, plus
``_reverse`` for the second direction); the PyTorch interop and the diagnostics'
summary name their keys by it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxrnn._src.cells import Carry, CellParams


def reverse_sequences(xs: jax.Array, lengths: jax.Array | None) -> jax.Array:
    """Reverses each sequence within its own length (PyTorch packed-sequence semantics).

    Args:
        xs: (T, B, ...).
        lengths: (B,) or None (all sequences have length T).

    Returns:
        (T, B, ...): ``out[t, b] = xs[lengths[b] - 1 - t, b]`` for ``t < lengths[b]``,
        ``xs[t, b]`` after. The map is its own inverse.
    """
    if lengths is None:
        return xs[::-1]
    t = jnp.arange(xs.shape[0])[:, None]
    idx = jnp.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)  # (T, B)
    idx = idx.reshape(idx.shape + (1,) * (xs.ndim - 2))
    return jnp.take_along_axis(xs, idx, axis=0)


def layer_suffix(l: int, d: int) -> str:
    """PyTorch's name suffix of layer ``l``, direction ``d``: ``"_l{l}"``, ``"_l{l}_reverse"``."""
    return f"_l{l}" + ("_reverse" if d else "")


def layer_directions(num_layers: int, num_directions: int) -> Iterator[tuple[int, int, str]]:
    """The stack's (layer, direction) pairs in order, each with its ``layer_suffix``.

    Args:
        num_layers: L.
        num_directions: 1, or 2 for a bidirectional stack.

    Yields:
        ``(l, d, suffix)`` for ``l`` in ``range(L)``, then ``d`` in
        ``range(num_directions)``; index ``l * num_directions + d`` in a flat list
        of carries, as ``run_stack`` counts them.
    """
    for l in range(num_layers):
        for d in range(num_directions):
            yield l, d, layer_suffix(l, d)


# (layer, direction, params, xs in the direction's scan order, carry0)
#   -> (hs in scan order, carry_T, whatever the caller keeps)
DirectionFn = Callable[[int, int, CellParams, jax.Array, Carry], tuple[jax.Array, Carry, Any]]


class StackRun(NamedTuple):
    """What ``run_stack`` returns."""

    h: jax.Array  # (T, B, dirs*H): the top layer's outputs, original time order
    finals: list  # [layer*dirs + direction]: each direction's final carry
    inputs: list  # [layer] (T, B, D_l): each layer's input, original order
    kept: list  # [layer][direction]: what each DirectionFn call kept
    keeps: list  # [layer]: the dropout mask after the layer (None where none)


def run_stack(direction_fn: DirectionFn, layers: Sequence[Sequence[CellParams]], xs: jax.Array,
              carries0: Sequence[Carry], lengths: jax.Array | None, dropout: float = 0.0,
              dropout_key: jax.Array | None = None) -> StackRun:
    """Runs ``direction_fn`` over every layer and direction of a stack.

    Args:
        direction_fn: one direction of one layer (see ``DirectionFn``).
        layers: ``[layer][direction]`` cell parameters.
        xs: inputs, (T, B, D), time-major.
        carries0: one initial carry per (layer, direction), index ``l * dirs + d``.
        lengths: optional integer (B,) sequence lengths.
        dropout: the drop probability between layers (applied when ``dropout_key``
            is given and ``dropout > 0``).
        dropout_key: a PRNG key for dropout, or None.
    """
    nd, L = len(layers[0]), len(layers)
    finals, inputs, kept, keeps = [], [], [], []
    h = xs
    for l in range(L):
        inputs.append(h)
        outs, ks = [], []
        for d in range(nd):
            x_in = h if d == 0 else reverse_sequences(h, lengths)
            hs, carry_T, k = direction_fn(l, d, layers[l][d], x_in, carries0[l * nd + d])
            outs.append(hs if d == 0 else reverse_sequences(hs, lengths))
            finals.append(carry_T)
            ks.append(k)
        kept.append(ks)
        h = outs[0] if nd == 1 else jnp.concatenate(outs, axis=-1)
        keep = None
        if dropout_key is not None and dropout > 0 and l < L - 1:
            keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, l), 1.0 - dropout,
                                        h.shape)
            h = jnp.where(keep, h / (1.0 - dropout), 0)  # inverted dropout
        keeps.append(keep)
    return StackRun(h, finals, inputs, kept, keeps)
