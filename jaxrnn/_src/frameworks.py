"""What ``jaxrnn.nnx`` and ``jaxrnn.equinox`` share; imports neither framework.

* ``stack``: the ``jaxrnn.RNN`` a framework module wraps, a stack of recurrent
  layers whose forward is ``RNN.features`` (its readout is never built or read);
* ``named_params`` / ``unflatten``: the stack's parameters under PyTorch's names
  (``weight_ih_l0``, ``bias_hh_l1_reverse``, ``weight_hr_l0``), and back;
* the checks of a module's call arguments, each message naming the argument.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxrnn import RNN, RNNParams
from jaxrnn._src.stack import layer_directions
from jaxrnn.extend import METHODS

# A cell's parameter fields under PyTorch's names; a user cell's other fields keep theirs.
TORCH_FIELDS = {"w_ih": "weight_ih", "w_hh": "weight_hh", "b_ih": "bias_ih",
                "b_hh": "bias_hh", "w_hr": "weight_hr"}


def stack(cell, input_size: int, hidden_size: int, *, num_layers: int, bidirectional: bool,
          bias: bool, nonlinearity: str, proj_size: int | None, forget_bias: float,
          dropout: float, bptt_segment: int | None, method: str) -> RNN:
    """The ``jaxrnn.RNN`` whose ``features`` a framework module runs.

    Raises:
        ValueError: naming the bad option (``RNN``'s checks, and ``method``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    # output_size=1: RNN requires a readout; the modules never build or read it
    # (features reads params.layers only). With RNN(output_size=None): pass None.
    return RNN(cell=cell, input_size=input_size, hidden_size=hidden_size, output_size=1,
               num_layers=num_layers, bidirectional=bidirectional, bias=bias,
               nonlinearity=nonlinearity, proj_size=proj_size or 0, forget_bias=forget_bias,
               dropout=dropout, bptt_segment=bptt_segment)


def init_layers(model: RNN, key: jax.Array, dtype) -> tuple:
    """``model``'s recurrent parameters, ``[layer][direction]``, from ``key``."""
    return model.init(key, dtype).layers


def named_params(model: RNN, layers) -> dict[str, jax.Array]:
    """``{name: array}`` in the order of ``jax.tree.leaves(layers)``; None fields left out.

    The names are PyTorch's (``RNN.torch_names()`` for its cells): a field's
    ``TORCH_FIELDS`` name, or its own, plus ``layer_suffix(l, d)``.
    """
    out = {}
    for l, d, sfx in layer_directions(model.num_layers, model.num_directions):
        for field, value in layers[l][d]._asdict().items():
            if value is not None:
                out[TORCH_FIELDS.get(field, field) + sfx] = value
    return out


def from_torch(model: RNN, rnn_state_dict: Mapping[str, Any], dtype) -> tuple:
    """``[layer][direction]`` parameters from a ``torch.nn.RNN/LSTM/GRU`` ``state_dict``.

    ``RNN.from_torch`` checks the keys and shapes; the readout it needs is a dummy,
    dropped (with ``RNN(output_size=None)``, pass none).
    """
    features = model.layer_output_size * model.num_directions
    readout = {"weight": jnp.zeros((model.output_size, features)),
               "bias": jnp.zeros((model.output_size,))}
    return model.from_torch(rnn_state_dict, readout, dtype).layers


def features(model: RNN, layers, xs, state, lengths, method: str, dropout_key=None):
    """``RNN.features`` on the recurrent ``layers``: ``(hs (T, B, dirs*H), final_state)``."""
    return model.features(RNNParams(layers, None), xs, state, lengths, method, dropout_key)


# --- checks of the modules' call arguments -------------------------------------------

def check_inputs(name: str, x, shape: str, ndim: int, input_size: int, dtype) -> jax.Array:
    """``x`` of rank ``ndim`` and last axis ``input_size``, floating, cast to ``dtype``.

    Args:
        name: the argument's name, for the message.
        x: the inputs.
        shape: the expected shape in words, e.g. ``"(B, T, in_features=3)"``.
        ndim: the expected rank.
        input_size: the expected last axis.
        dtype: the parameters' dtype, which ``x`` is cast to.

    Raises:
        ValueError: a wrong rank, an empty axis or a wrong last axis.
        TypeError: a non-floating ``x``.
    """
    x = jnp.asarray(x)
    if x.ndim != ndim or 0 in x.shape or x.shape[-1] != input_size:
        raise ValueError(f"{name} must have shape {shape}, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
    return x.astype(dtype)


def check_lengths(name: str, lengths, shape: tuple[int, ...]) -> jax.Array:
    """``lengths`` as an integer array of ``shape``; values are not checked (they may be traced).

    Raises:
        ValueError: a wrong shape. TypeError: a non-integer dtype.
    """
    lengths = jnp.asarray(lengths)
    if lengths.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got shape {lengths.shape}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {lengths.dtype}")
    return lengths


def check_state(name: str, state, shapes: list[tuple[int, ...]], dtype):
    """A state of ``len(shapes)`` parts (one array, or a tuple: the LSTM's ``(h, c)``).

    Returns:
        The state as an array, or a tuple of arrays, cast to ``dtype``.

    Raises:
        ValueError: a wrong number of parts or a wrong shape, naming ``name``.
    """
    if len(shapes) > 1:
        if not (isinstance(state, (tuple, list)) and len(state) == len(shapes)):
            raise ValueError(f"{name} must be a tuple of {len(shapes)} arrays of shapes "
                             f"{', '.join(map(str, shapes))}, got {type(state).__name__}")
        parts = [jnp.asarray(s) for s in state]
    else:
        parts = [jnp.asarray(state)]
    for k, (s, want) in enumerate(zip(parts, shapes)):
        if s.shape != want:
            what = name if len(shapes) == 1 else f"{name}[{k}]"
            raise ValueError(f"{what} must have shape {want}, got shape {s.shape}")
    parts = tuple(s.astype(dtype) for s in parts)
    return parts if len(shapes) > 1 else parts[0]
