"""One home for the library's argument rules; every message names the argument.

The command line maps argument names to its options; it never rewrites these
messages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn._src import losses as losses_lib


def check_int(name: str, value, minimum: int, *, bound: str = "", context: str = "") -> None:
    """``value`` must be an integer (a Python or numpy int, not a bool) ``>= minimum``.

    Args:
        name: the argument's name, first in the message.
        value: what was given.
        minimum: the smallest allowed value.
        bound: how the message names ``minimum`` when it comes from another
            argument (``"k1 = 3"``); default: the number itself.
        context: words appended after the bound (``" for ProjectedLSTM"``).

    Raises:
        ValueError: ``"{name} must be an integer >= {bound}{context}, got {value!r}"``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {bound or minimum}{context}, "
                         f"got {value!r}")


def check_forget_bias(forget_bias, bias: bool, what: str) -> None:
    """``forget_bias`` initialises a bias, so it needs ``bias=True``.

    Args:
        forget_bias: the value given (0 or None: nothing to check).
        bias: whether the cell has biases.
        what: the bias it initialises, for the message (``"b_ih"``).

    Raises:
        ValueError: naming ``forget_bias`` and ``bias``.
    """
    if forget_bias and not bias:
        raise ValueError(f"forget_bias={forget_bias!r} needs bias=True: it initialises {what}")


# --- a model's inputs, state and targets ---------------------------------------
# RNN.check_inputs and RNN.check_targets compose these; the model supplies its sizes.

def check_type(name: str, value, expected: type, hint: str = "") -> None:
    """``value`` must be an instance of ``expected``.

    Raises:
        TypeError: ``"{name} must be {expected}{hint}, got {type}"``.
    """
    if not isinstance(value, expected):
        raise TypeError(f"{name} must be {expected.__name__}{hint}, got {type(value).__name__}")


def check_xs(xs, input_size: int, dtype) -> jax.Array:
    """``xs`` as an array: (T, B, input_size), T and B at least 1, of ``dtype``.

    Args:
        xs: inputs, (T, B, input_size), time-major (anything ``jnp.asarray`` takes).
        input_size: D, the model's features per step.
        dtype: the parameters' floating dtype.

    Raises:
        ValueError: a rank other than 3, T=0, B=0, or a last axis other than D.
        TypeError: a non-floating dtype, or a dtype other than ``dtype``.
    """
    xs = jnp.asarray(xs)
    expected = f"(T, B, input_size={input_size})"
    if xs.ndim != 3:
        raise ValueError(f"xs must have shape {expected} (time-major), got shape {xs.shape}")
    T, B, D = xs.shape
    if T == 0:
        raise ValueError(f"xs is an empty sequence: shape {xs.shape} has T=0 steps")
    if B == 0:
        raise ValueError(f"xs is an empty batch: shape {xs.shape} has B=0")
    if D != input_size:
        raise ValueError(f"xs must have shape {expected}, got shape {xs.shape}")
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        raise TypeError(f"xs must be a floating array, got dtype {xs.dtype}")
    if xs.dtype != dtype:
        raise TypeError(f"xs has dtype {xs.dtype} but the parameters have dtype {dtype}; "
                        f"cast one to the other")
    return xs


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_lengths(lengths, num_steps: int, batch: int) -> jax.Array:
    """``lengths`` as an integer (B,) array; its values, when known at trace time, in [1, T].

    Args:
        lengths: per-sequence lengths (anything ``jnp.asarray`` takes).
        num_steps: T.
        batch: B.

    Raises:
        ValueError: a shape other than (B,), or (concrete values) outside [1, T].
        TypeError: a non-integer dtype.
    """
    lengths = jnp.asarray(lengths)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape (B,) = ({batch},), got shape {lengths.shape}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"lengths must be an integer array, got dtype {lengths.dtype}")
    if _is_concrete(lengths):
        lo, hi = int(np.min(np.asarray(lengths))), int(np.max(np.asarray(lengths)))
        if lo < 1 or hi > num_steps:
            raise ValueError(f"lengths must lie in [1, T={num_steps}], got values in [{lo}, {hi}]")
    return lengths


def check_state(state, shapes: list[tuple[int, int, int]], dtype, *, cell_name: str,
                hidden_size: int, proj_size: int = 0):
    """An initial state in PyTorch's shape: one array, or a tuple of ``len(shapes)``.

    Args:
        state: an array (L*dirs, B, H), or for a cell with k > 1 carries (the LSTM's
            pair ``(h0, c0)``) a tuple or list of k arrays.
        shapes: the k expected shapes ``(L*dirs, B, width)``.
        dtype: the parameters' dtype.
        cell_name: the cell's name, for the message.
        hidden_size, proj_size: the model's, to name a width in the message.

    Returns:
        The state as an array, or a tuple of k arrays.

    Raises:
        ValueError: not a k-tuple, or a part of the wrong shape.
        TypeError: a part of another dtype.
    """
    if len(shapes) > 1:
        if not (isinstance(state, (tuple, list)) and len(state) == len(shapes)):
            if len(shapes) == 2:
                what = "an LSTM" if "lstm" in cell_name else f"cell {cell_name!r}"
                raise ValueError(f"state of {what} must be a pair (h0, c0), of shapes "
                                 f"{shapes[0]} and {shapes[1]}")
            raise ValueError(f"state of cell {cell_name!r} must be a tuple of "
                             f"{len(shapes)} arrays, of shapes {', '.join(map(str, shapes))}")
        parts = tuple(jnp.asarray(s) for s in state)
    else:
        parts = (jnp.asarray(state),)
    for k, (s, shape) in enumerate(zip(parts, shapes)):
        if s.shape != shape:
            what = "state" if len(shapes) == 1 else f"state[{k}]"
            width = ("hidden_size" if shape[2] == hidden_size else
                     "proj_size" if proj_size and shape[2] == proj_size else "size")
            raise ValueError(f"{what} must have shape (num_layers*num_directions, B, "
                             f"{width}) = {shape}, got shape {s.shape}")
        if s.dtype != dtype:
            raise TypeError(f"state must have dtype {dtype}, got dtype {s.dtype}")
    return parts if len(shapes) > 1 else parts[0]


def check_targets(ys_shape: tuple[int, int, int], targets, loss: str) -> jax.Array:
    """``targets`` as an array that ``loss`` can score against outputs of ``ys_shape``.

    Args:
        ys_shape: the outputs' shape, (T, B, O).
        targets: (T, B, O) floats for ``"half_sse"``/``"mse"``; (T, B) integer
            classes for ``"xent"``.
        loss: the loss's name.

    Raises:
        ValueError: an unknown ``loss``, or a wrong shape.
        TypeError: a wrong dtype.
    """
    losses_lib.get_loss(loss)
    targets = jnp.asarray(targets)
    if loss == "xent":
        if targets.shape != ys_shape[:2]:
            raise ValueError(f"targets for loss='xent' must have shape (T, B) = {ys_shape[:2]}"
                             f", got shape {targets.shape}")
        if not jnp.issubdtype(targets.dtype, jnp.integer):
            raise TypeError(f"targets for loss='xent' must be integer classes, "
                            f"got dtype {targets.dtype}")
    else:
        if targets.shape != ys_shape:
            raise ValueError(f"targets must have shape (T, B, output_size) = {ys_shape}, "
                             f"got shape {targets.shape}")
        if not jnp.issubdtype(targets.dtype, jnp.floating):
            raise TypeError(f"targets for loss={loss!r} must be floating, "
                            f"got dtype {targets.dtype}")
    return targets
