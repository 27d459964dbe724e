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


def check_nonlinearity(nonlinearity) -> None:
    """The Elman-family cells' ``nonlinearity``: ``"tanh"`` or ``"relu"``.

    Raises:
        ValueError: another value.
    """
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")


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
# RNN.check_inputs and RNN.check_targets compose these; the model supplies its sizes
# and its layout. Arrays are read time-major (T, B, ...) unless the model has
# batch_first=True; we never guess. Where the sizes show that an argument was laid
# out the other way (a swapped pair of axes, T != B), the message says so and names
# batch_first (``layout_hint``).

def sequence_axes(batch_first: bool) -> str:
    """The leading axes of a sequence array in words: ``"T, B"`` or ``"B, T"``."""
    return "B, T" if batch_first else "T, B"


def layout_hint(got: tuple, expected: tuple, batch_first: bool) -> str:
    """A sentence for a shape error when ``got`` is ``expected`` with T and B swapped.

    Args:
        got: the shape given, its leading entries in the layout's order.
        expected: the expected shape (same rank), T != B among its leading entries.
        batch_first: the model's layout.

    Returns:
        ``""`` unless ``got`` equals ``expected`` with its first two entries swapped;
        then ``"; it looks ..."``, a sentence naming ``batch_first``.
    """
    if len(got) < 2 or len(got) != len(expected) or got[0] == got[1]:
        return ""
    if (got[1], got[0]) + tuple(got[2:]) != tuple(expected):
        return ""
    return "; " + _other_layout(batch_first)


def _other_layout(batch_first: bool) -> str:
    if batch_first:
        return ("it looks time-major (T, B, ...), but this RNN has batch_first=True and "
                "reads (B, T, ...): transpose it, or build the RNN with batch_first=False")
    return ("it looks batch-first (B, T, ...), but this RNN reads time-major (T, B, ...) "
            "(we do not guess): transpose it, or build the RNN with batch_first=True")


def check_readout(output_size: int | None, what: str) -> None:
    """A loss needs the model's readout: ``output_size`` must not be None.

    Args:
        output_size: the model's ``output_size`` (None: a stack without a head).
        what: the call that needs it, first in the message (``"loss_and_grad"``).

    Raises:
        ValueError: naming ``output_size``.
    """
    if output_size is None:
        raise ValueError(f"{what} needs a readout, but this RNN has output_size=None (layers "
                         f"without a head): build it with output_size=O, or put your own head "
                         f"and loss on apply's outputs")

def check_type(name: str, value, expected: type, hint: str = "") -> None:
    """``value`` must be an instance of ``expected``.

    Raises:
        TypeError: ``"{name} must be {expected}{hint}, got {type}"``.
    """
    if not isinstance(value, expected):
        raise TypeError(f"{name} must be {expected.__name__}{hint}, got {type(value).__name__}")


def check_xs(xs, input_size: int, dtype, batch_first: bool = False, *, name: str = "xs",
             expected: str | None = None, per_example: bool = False) -> jax.Array:
    """``xs`` as an array: (T, B, input_size), T and B at least 1, of ``dtype``.

    Args:
        xs: inputs, (T, B, input_size), time-major (anything ``jnp.asarray`` takes);
            (B, T, input_size) with ``batch_first``; (T, input_size) with ``per_example``.
        input_size: D, the model's features per step.
        dtype: the parameters' floating dtype, or a tuple (the parameters', then the
            compute dtype); None: any floating dtype (the caller casts).
        batch_first: the model's layout.
        name: the argument's name, first in every message.
        expected: the expected shape in words, naming the caller's options; default
            ``(T, B, input_size=D)`` and the layout.
        per_example: ``xs`` is one sequence, without a batch axis (a module that runs
            one example per call).

    Returns:
        ``xs`` as an array, in the layout it was given.

    Raises:
        ValueError: a rank other than 3 (2 with ``per_example``), T=0, B=0, or a last
            axis other than D.
        TypeError: a non-floating dtype, or a dtype not in ``dtype``.
    """
    xs = jnp.asarray(xs)
    axes = "T" if per_example else sequence_axes(batch_first)
    words = f"({axes}, input_size={input_size})"
    layout = ("one sequence" if per_example else
              "batch-first, batch_first=True" if batch_first else "time-major")
    if xs.ndim != len(axes.split(", ")) + 1:
        raise ValueError(f"{name} must have shape {expected or f'{words} ({layout})'}, "
                         f"got shape {xs.shape}")
    T = xs.shape[1 if batch_first and not per_example else 0]
    B = 1 if per_example else xs.shape[0 if batch_first else 1]
    if T == 0:
        raise ValueError(f"{name} is an empty sequence: shape {xs.shape} has T=0 steps")
    if B == 0:
        raise ValueError(f"{name} is an empty batch: shape {xs.shape} has B=0")
    if xs.shape[-1] != input_size:
        raise ValueError(f"{name} must have shape {expected or words}, got shape {xs.shape}")
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {xs.dtype}")
    _check_dtype_in(name, xs.dtype, dtype)
    return xs


def _check_dtype_in(name: str, got, allowed) -> None:
    """Raises a TypeError naming ``name`` unless ``got`` is ``allowed`` (a dtype or a tuple;
    None allows any): the parameters' dtype, then a compute dtype."""
    if allowed is None:
        return
    allowed = allowed if isinstance(allowed, tuple) else (allowed,)
    if jnp.dtype(got) in [jnp.dtype(a) for a in allowed]:
        return
    if len(allowed) == 1:
        raise TypeError(f"{name} has dtype {jnp.dtype(got).name} but the parameters have dtype "
                        f"{jnp.dtype(allowed[0]).name}; cast one to the other")
    raise TypeError(f"{name} has dtype {jnp.dtype(got).name} but the parameters have dtype "
                    f"{jnp.dtype(allowed[0]).name} and compute_dtype is "
                    f"{jnp.dtype(allowed[1]).name}: cast {name} to one of them")


def check_compute_dtype(compute_dtype, param_dtype=None, *, name: str = "compute_dtype"):
    """A mixed-precision compute dtype: None, or a floating dtype no wider than the parameters'.

    Args:
        compute_dtype: None, or anything ``jnp.dtype`` takes (``jnp.bfloat16``,
            ``"float16"``).
        param_dtype: the parameters' dtype, when known.
        name: the argument's name, first in every message.

    Returns:
        None when ``compute_dtype`` is None or is ``param_dtype`` itself (nothing to
        cast: the layer runs exactly as without one); else its name (``"bfloat16"``),
        hashable, for a static argument.

    Raises:
        TypeError: not a dtype, not floating, or wider than ``param_dtype``.
    """
    if compute_dtype is None:
        return None
    try:
        dtype = jnp.dtype(compute_dtype)
    except TypeError:
        raise TypeError(f"{name} must be None or a floating dtype such as jnp.bfloat16, "
                        f"got {compute_dtype!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating dtype, got {dtype.name}")
    if param_dtype is None:
        return dtype.name
    param_dtype = jnp.dtype(param_dtype)
    if jnp.promote_types(dtype, param_dtype) != param_dtype:
        raise TypeError(f"{name}={dtype.name} is wider than the parameters' dtype "
                        f"{param_dtype.name}: the compute dtype is the narrower one (float32 "
                        f"parameters, bfloat16 compute)")
    return None if dtype == param_dtype else dtype.name


def check_layer_dtypes(params, xs, carry0, compute_dtype=None, *, xs_name: str = "xs",
                       carry_name: str = "carry0"):
    """The dtypes one recurrent layer runs in: ``params``' dtype, ``xs`` no wider.

    The layer computes in the parameters' dtype, or in ``compute_dtype`` (mixed
    precision): narrower inputs (bfloat16 or float16 inputs, float32 parameters) are
    promoted (or cast to ``compute_dtype``) by the input projection, and their
    gradient comes back in their own dtype. The scan's carry keeps the parameters'
    dtype from step to step, so the initial carry must have it.

    Args:
        params: the cell's parameters; their floating leaves' common dtype.
        xs: inputs, (T, B, D).
        carry0: the initial carry, a tuple of (B, H) arrays.
        compute_dtype: None, or the mixed-precision compute dtype
            (``check_compute_dtype``).
        xs_name, carry_name: the arguments' names, first in the messages.

    Returns:
        ``check_compute_dtype``'s: None, or the compute dtype's name.

    Raises:
        TypeError: no floating parameter, non-floating ``xs``, ``xs`` wider than the
            parameters (it would promote them), a floating carry of a dtype other
            than the parameters', or a bad ``compute_dtype``; each message names the
            argument and both dtypes.
    """
    floating = [p.dtype for p in jax.tree.leaves(params) if jnp.issubdtype(p.dtype, jnp.floating)]
    if not floating:
        raise TypeError("params must hold floating arrays, got none")
    dtype = jnp.dtype(jnp.result_type(*floating))
    x_dtype = jnp.dtype(xs.dtype)
    if not jnp.issubdtype(x_dtype, jnp.floating):
        raise TypeError(f"{xs_name} must be a floating array, got dtype {x_dtype.name}")
    if jnp.promote_types(x_dtype, dtype) != dtype:
        raise TypeError(f"{xs_name} has dtype {x_dtype.name} but the parameters have dtype "
                        f"{dtype.name}, and {xs_name} must not be wider (the layer computes "
                        f"in the parameters' dtype); cast one to the other")
    leaves = jax.tree.leaves(carry0)
    for k, c in enumerate(leaves):
        if jnp.issubdtype(c.dtype, jnp.floating) and jnp.dtype(c.dtype) != dtype:
            what = carry_name if len(leaves) == 1 else f"{carry_name}[{k}]"
            raise TypeError(f"{what} has dtype {jnp.dtype(c.dtype).name} but the layer "
                            f"keeps its carry in the parameters' dtype {dtype.name}; cast "
                            f"{what} to {dtype.name}")
    return check_compute_dtype(compute_dtype, dtype)


def check_step_input(x_t, input_size: int, dtype) -> jax.Array:
    """One step's inputs as an array: (B, input_size), B at least 1, of ``dtype``.

    Raises:
        ValueError: a rank other than 2, B=0, or a last axis other than D.
        TypeError: a non-floating dtype, or a dtype not in ``dtype`` (a dtype, or a
            tuple: the parameters', then the compute dtype).
    """
    x_t = jnp.asarray(x_t)
    if x_t.ndim != 2 or x_t.shape[0] == 0 or x_t.shape[1] != input_size:
        raise ValueError(f"x_t must have shape (B, input_size={input_size}), one step with "
                         f"B >= 1, got shape {x_t.shape}")
    if not jnp.issubdtype(x_t.dtype, jnp.floating):
        raise TypeError(f"x_t must be a floating array, got dtype {x_t.dtype}")
    _check_dtype_in("x_t", x_t.dtype, dtype)
    return x_t


def _check_classes(targets, num_classes: int, batch_first: bool, lengths) -> None:
    """Concrete class targets lie in ``[0, num_classes)`` within the lengths (under
    ``jax.jit`` the loss is NaN instead: ``losses.xent``)."""
    if not (_is_concrete(targets) and (lengths is None or _is_concrete(lengths))):
        return
    t = np.asarray(targets)
    if lengths is not None:
        steps = np.arange(t.shape[1 if batch_first else 0])
        valid = steps[None, :] < np.asarray(lengths)[:, None]  # (B, T)
        t = t[valid if batch_first else valid.T]
    if t.size and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"targets for loss='xent' must be classes in [0, output_size="
                         f"{num_classes}) within the lengths, got values in "
                         f"[{t.min()}, {t.max()}]")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_lengths(lengths, num_steps: int, batch: int | None, batch_first: bool | None = False,
                  *, name: str = "lengths") -> jax.Array:
    """``lengths`` as an integer (B,) array; its values, when known at trace time, in [1, T].

    Args:
        lengths: per-sequence lengths (anything ``jnp.asarray`` takes).
        num_steps: T.
        batch: B; None for one sequence's length, a scalar (shape ``()``).
        batch_first: the model's layout, for the message when ``lengths`` has T
            entries (xs laid out the other way); None: a caller without that option
            (no such hint).
        name: the argument's name, first in every message.

    Returns:
        ``lengths`` as an array; traced values (under ``jax.jit``), which cannot be
        checked, clipped into [1, T]: a length above T counts as T, one below 1 as 1.

    Raises:
        ValueError: a shape other than (B,) (``()`` for one sequence), or (concrete
            values) outside [1, T].
        TypeError: a non-integer dtype.
    """
    lengths = jnp.asarray(lengths)
    if batch is None and lengths.shape != ():
        raise ValueError(f"{name} must be a scalar (one sequence's length), got shape "
                         f"{lengths.shape}")
    if batch is not None and lengths.shape != (batch,):
        hint = ""
        if batch_first is not None and lengths.shape == (num_steps,) and num_steps != batch:
            hint = (f"; it has one entry per step of xs (T={num_steps}), so xs may be laid "
                    f"out the other way: {_other_layout(batch_first)}")
        raise ValueError(f"{name} must have shape (B,) = ({batch},), got shape "
                         f"{lengths.shape}{hint}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {lengths.dtype}")
    if _is_concrete(lengths):
        lo, hi = int(np.min(np.asarray(lengths))), int(np.max(np.asarray(lengths)))
        if lo < 1 or hi > num_steps:
            raise ValueError(f"{name} must lie in [1, T={num_steps}], got values in [{lo}, {hi}]")
        return lengths
    # under jax.jit the values are unknown until run time: clipped into [1, T], the
    # documented rule (every direction then reads the same steps), not checked
    return jnp.clip(lengths, 1, num_steps)


def check_state(state, shapes: list[tuple[int, ...]], dtype, *, cell_name: str,
                hidden_size: int, proj_size: int = 0, num_steps: int | None = None,
                batch_first: bool = False, name: str = "state"):
    """An initial state in PyTorch's shape: one array, or a tuple of ``len(shapes)``.

    Args:
        state: an array (L*dirs, B, H), or for a cell with k > 1 carries (the LSTM's
            pair ``(h0, c0)``) a tuple or list of k arrays.
        shapes: the k expected shapes ``(L*dirs, B, width)``, or ``(L*dirs, width)``
            for one example's state (a module that runs one example per call).
        dtype: the parameters' dtype; None: any dtype (the caller casts).
        cell_name: the cell's name, for the message.
        hidden_size, proj_size: the model's, to name a width in the message.
        num_steps, batch_first: xs's T and the model's layout, for the message when
            the state's batch axis has T entries (xs laid out the other way).
        name: the argument's name, first in every message.

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
                raise ValueError(f"{name} of {what} must be a pair (h0, c0), of shapes "
                                 f"{shapes[0]} and {shapes[1]}")
            raise ValueError(f"{name} of cell {cell_name!r} must be a tuple of "
                             f"{len(shapes)} arrays, of shapes {', '.join(map(str, shapes))}")
        parts = tuple(jnp.asarray(s) for s in state)
    else:
        parts = (jnp.asarray(state),)
    for k, (s, shape) in enumerate(zip(parts, shapes)):
        if s.shape != shape:
            what = name if len(shapes) == 1 else f"{name}[{k}]"
            width = ("hidden_size" if shape[-1] == hidden_size else
                     "proj_size" if proj_size and shape[-1] == proj_size else "size")
            axes = "num_layers*num_directions, " + ("B, " if len(shape) == 3 else "")
            hint = ""
            if (num_steps is not None and num_steps != shape[1] and s.ndim == 3
                    and s.shape[1] == num_steps and (s.shape[0], s.shape[2]) == (shape[0], shape[2])):
                hint = (f"; its batch axis has xs's T={num_steps} entries, so xs may be laid "
                        f"out the other way: {_other_layout(batch_first)}")
            raise ValueError(f"{what} must have shape ({axes}{width}) = {shape}, "
                             f"got shape {s.shape}{hint}")
        if dtype is not None and s.dtype != dtype:
            raise TypeError(f"{name} must have dtype {dtype}, got dtype {s.dtype}")
    return parts if len(shapes) > 1 else parts[0]


def check_targets(ys_shape: tuple[int, int, int], targets, loss: str,
                  batch_first: bool = False, lengths=None) -> jax.Array:
    """``targets`` as an array that ``loss`` can score against outputs of ``ys_shape``.

    Args:
        ys_shape: the outputs' shape, (T, B, O); (B, T, O) with ``batch_first``.
        targets: (T, B, O) floats for ``"half_sse"``/``"mse"``; (T, B) integer
            classes for ``"xent"``; (B, T, O) and (B, T) with ``batch_first``.
        loss: the loss's name.
        batch_first: the layout of ``ys_shape`` and ``targets``.
        lengths: the validated (B,) lengths, or None: ``"xent"`` classes past a
            sequence's length are padding and are not checked.

    Returns:
        ``targets`` as an array, in the layout it was given.

    Raises:
        ValueError: an unknown ``loss``, a wrong shape, or (``"xent"``, concrete
            values, outside ``jax.jit``) a class outside ``[0, output_size)`` within
            the lengths.
        TypeError: a wrong dtype.
    """
    losses_lib.get_loss(loss)
    targets = jnp.asarray(targets)
    axes = sequence_axes(batch_first)
    if loss == "xent":
        if targets.shape != ys_shape[:2]:
            hint = layout_hint(targets.shape, ys_shape[:2], batch_first)
            raise ValueError(f"targets for loss='xent' must have shape ({axes}) = "
                             f"{ys_shape[:2]}, got shape {targets.shape}{hint}")
        if not jnp.issubdtype(targets.dtype, jnp.integer):
            raise TypeError(f"targets for loss='xent' must be integer classes, "
                            f"got dtype {targets.dtype}")
        _check_classes(targets, ys_shape[-1], batch_first, lengths)
    else:
        if targets.shape != ys_shape:
            hint = layout_hint(targets.shape, ys_shape, batch_first)
            raise ValueError(f"targets must have shape ({axes}, output_size) = {ys_shape}, "
                             f"got shape {targets.shape}{hint}")
        if not jnp.issubdtype(targets.dtype, jnp.floating):
            raise TypeError(f"targets for loss={loss!r} must be floating, "
                            f"got dtype {targets.dtype}")
    return targets
