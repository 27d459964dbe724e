"""What ``jaxrnn.nnx`` and ``jaxrnn.equinox`` share; imports neither framework.

* ``stack``: the ``jaxrnn.RNN`` a framework module wraps, a stack of recurrent
  layers without a readout (``output_size=None``) whose forward is ``RNN.features``;
* ``named_params``: the stack's parameters under PyTorch's names
  (``weight_ih_l0``, ``bias_hh_l1_reverse``, ``weight_hr_l0``).

The modules check their call arguments with ``jaxrnn._src.validation``'s rules,
naming their own arguments.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax

from jaxrnn._src.model import RNN, RNNParams
from jaxrnn._src.scan import METHODS
from jaxrnn._src.stack import layer_directions

# A cell's parameter fields under PyTorch's names; a user cell's other fields keep theirs.
TORCH_FIELDS = {"w_ih": "weight_ih", "w_hh": "weight_hh", "b_ih": "bias_ih",
                "b_hh": "bias_hh", "w_hr": "weight_hr"}


def stack(cell, input_size: int, hidden_size: int, *, num_layers: int, bidirectional: bool,
          bias: bool, nonlinearity: str, proj_size: int | None, forget_bias: float,
          dropout: float, bptt_segment: int | None, method: str,
          batch_first: bool = False, compute_dtype=None) -> RNN:
    """The ``jaxrnn.RNN`` (``output_size=None``) whose ``features`` a framework module runs.

    Raises:
        ValueError: naming the bad option (``RNN``'s checks, and ``method``).
        TypeError: a ``compute_dtype`` that is not a floating dtype.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return RNN(cell=cell, input_size=input_size, hidden_size=hidden_size, output_size=None,
               num_layers=num_layers, bidirectional=bidirectional, bias=bias,
               nonlinearity=nonlinearity, proj_size=proj_size or 0, forget_bias=forget_bias,
               dropout=dropout, bptt_segment=bptt_segment, batch_first=batch_first,
               compute_dtype=compute_dtype)


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

    ``RNN.from_torch`` checks the keys and shapes; the stack has no readout to load.
    """
    return model.from_torch(rnn_state_dict, None, dtype).layers


def state_shapes(model: RNN, batch: int | None) -> list[tuple[int, ...]]:
    """The state's parts in PyTorch's shape: ``(L*dirs, batch, width)``, ``(L*dirs, width)`` if None."""
    n = model.num_layers * model.num_directions
    return [(n, w) if batch is None else (n, batch, w)
            for w in model.cell_fn.state_sizes(model.hidden_size)]


def features(model: RNN, layers, xs, state, lengths, method: str, dropout_key=None):
    """``RNN.features`` on the recurrent ``layers``: ``(hs (T, B, dirs*H), final_state)``.

    ``xs`` and ``hs`` are ``(B, T, ...)`` for a ``batch_first`` stack.
    """
    return model.features(RNNParams(layers, None), xs, state, lengths, method, dropout_key)
