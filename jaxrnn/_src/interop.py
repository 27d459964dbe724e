"""PyTorch interop: an ``RNN``'s parameters under ``torch.nn.RNN/LSTM/GRU``'s names.

Functions of the model, behind ``RNN.torch_names``, ``RNN.from_torch`` and
``RNN.to_torch`` (whose docstrings, the public ones, give the shapes). The module
sits after the model: it imports the model's parameter types, and the model's
methods import it when called. It never imports torch: it reads tensors through
their ``detach().cpu().numpy()`` and hands back numpy arrays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import jax.numpy as jnp
import numpy as np

from jaxrnn._src.cells import Cell, CellParams, LSTMPParams
from jaxrnn._src.model import ReadoutParams, RNNParams
from jaxrnn._src.stack import layer_directions

if TYPE_CHECKING:
    from jaxrnn._src.model import RNN

# the cells with a PyTorch counterpart (torch.nn.RNN, LSTM, GRU): to_torch, from_torch
_TORCH_CELLS = ("elman", "lstm", "gru")


def _check_torch_cell(model: RNN, what: str) -> None:
    """Raises a ValueError unless the cell is one of PyTorch's (elman, lstm, gru)."""
    if isinstance(model.cell, Cell):
        raise ValueError(f"{what} applies to the built-in cells {', '.join(_TORCH_CELLS)} "
                         f"(torch.nn.RNN, LSTM, GRU); cell={model.cell!r} is a user cell")
    if model.cell not in _TORCH_CELLS:
        raise ValueError(f"{what} applies to the built-in cells {', '.join(_TORCH_CELLS)} "
                         f"(torch.nn.RNN, LSTM, GRU); cell={model.cell!r} has no PyTorch "
                         f"counterpart")


def torch_names(model: RNN) -> list[str]:
    """``RNN.torch_names``: the ``state_dict`` keys of ``model``'s PyTorch module, in order.

    Args:
        model: an ``RNN`` with a built-in PyTorch cell.
    """
    _check_torch_cell(model, "torch_names")
    names = []
    for _, _, sfx in layer_directions(model.num_layers, model.num_directions):
        names += [f"weight_ih{sfx}", f"weight_hh{sfx}"]
        if model.bias:
            names += [f"bias_ih{sfx}", f"bias_hh{sfx}"]
        if model.proj_size:
            names += [f"weight_hr{sfx}"]
    return names


def _check_keys(sd: Mapping[str, Any], expected: list[str], where: str) -> None:
    """Raises a ValueError naming ``where``'s missing and unexpected keys, if any."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{where} does not match this model: missing keys {missing}, "
                         f"unexpected keys {unexpected}")


def _array(sd: Mapping[str, Any], key: str, shape: tuple[int, ...], where: str, dtype):
    """``sd[key]`` (a numpy array or a torch tensor) as a JAX array of ``shape``.

    Raises:
        ValueError: naming ``where[key]``, the expected and the actual shape.
    """
    a = sd[key]
    if hasattr(a, "detach"):  # a torch tensor
        a = a.detach().cpu().numpy()
    a = jnp.asarray(a, dtype=dtype)
    if a.shape != shape:
        raise ValueError(f"{where}[{key!r}] must have shape {shape}, got shape {a.shape}")
    return a


def _cell_params(model: RNN, sd: Mapping[str, Any], l: int, sfx: str, dtype) -> CellParams:
    """One layer and direction's ``CellParams`` (``LSTMPParams`` with ``proj_size``).

    Args:
        model: the ``RNN``.
        sd: the ``rnn_state_dict``.
        l: the layer, which sets the input width ``D_l``.
        sfx: the layer and direction's ``layer_suffix``.
        dtype: as in ``from_torch``.

    Returns:
        ``w_ih (G*H, D_l)``, ``w_hh (G*H, H)`` (or (G*H, P)), biases ``(G*H,)`` or
        None, and with ``proj_size=P``, ``w_hr (P, H)``.
    """
    gh = model.cell_fn.num_gates * model.hidden_size
    out = model.layer_output_size  # H, or P with proj_size=P
    d_in = model.input_size if l == 0 else out * model.num_directions
    w = "rnn_state_dict"
    p = CellParams(
        w_ih=_array(sd, f"weight_ih{sfx}", (gh, d_in), w, dtype),
        w_hh=_array(sd, f"weight_hh{sfx}", (gh, out), w, dtype),
        b_ih=_array(sd, f"bias_ih{sfx}", (gh,), w, dtype) if model.bias else None,
        b_hh=_array(sd, f"bias_hh{sfx}", (gh,), w, dtype) if model.bias else None)
    if model.proj_size:
        p = LSTMPParams(*p, w_hr=_array(sd, f"weight_hr{sfx}",
                                        (model.proj_size, model.hidden_size), w, dtype))
    return p


def from_torch(model: RNN, rnn_state_dict: Mapping[str, Any],
               readout_state_dict: Mapping[str, Any] | None, dtype=None) -> RNNParams:
    """``RNN.from_torch``: ``model``'s parameters from PyTorch ``state_dict``s.

    Args:
        model: an ``RNN`` with a built-in PyTorch cell.
        rnn_state_dict, readout_state_dict, dtype: as in ``RNN.from_torch``.
    """
    _check_torch_cell(model, "from_torch")
    _check_keys(rnn_state_dict, torch_names(model), "rnn_state_dict")
    _check_readout_given(model, readout_state_dict)
    layers = [[] for _ in range(model.num_layers)]
    for l, _, sfx in layer_directions(model.num_layers, model.num_directions):
        layers[l].append(_cell_params(model, rnn_state_dict, l, sfx, dtype))
    layers = tuple(tuple(dirs) for dirs in layers)
    if model.output_size is None:
        return RNNParams(layers, None)
    features = model.layer_output_size * model.num_directions
    rd, w = readout_state_dict, "readout_state_dict"
    readout = ReadoutParams(
        weight=_array(rd, "weight", (model.output_size, features), w, dtype),
        bias=_array(rd, "bias", (model.output_size,), w, dtype) if model.readout_bias else None)
    return RNNParams(layers, readout)


def _check_readout_given(model: RNN, readout_state_dict) -> None:
    """A readout ``state_dict`` exactly when the model has a head (``output_size``)."""
    if model.output_size is None:
        if readout_state_dict is not None:
            raise ValueError("readout_state_dict must be None: this RNN has output_size=None "
                             "(no readout)")
        return
    if readout_state_dict is None:
        raise ValueError(f"readout_state_dict is required: this RNN has a readout "
                         f"(output_size={model.output_size})")
    readout_keys = ["weight"] + (["bias"] if model.readout_bias else [])
    _check_keys(readout_state_dict, readout_keys, "readout_state_dict")


def _check_layers(model: RNN, params: RNNParams) -> None:
    """Raises a ValueError unless ``params.layers`` is ``[num_layers][num_directions]``."""
    got = [len(dirs) for dirs in params.layers]
    if got != [model.num_directions] * model.num_layers:
        raise ValueError(f"params.layers must have num_layers={model.num_layers} layers of "
                         f"num_directions={model.num_directions} to match this model, got "
                         f"{len(got)} layers of {got} directions")


def to_torch(model: RNN, params: RNNParams) -> tuple[dict[str, np.ndarray],
                                                    dict[str, np.ndarray] | None]:
    """``RNN.to_torch``: ``(rnn_state_dict, readout_state_dict)`` of numpy arrays.

    ``readout_state_dict`` is None for parameters without a readout.

    Args:
        model: an ``RNN`` with a built-in PyTorch cell.
        params: ``model``'s parameters.
    """
    _check_torch_cell(model, "to_torch")
    _check_layers(model, params)
    rnn_sd = {}
    for l, d, sfx in layer_directions(model.num_layers, model.num_directions):
        p = params.layers[l][d]
        rnn_sd[f"weight_ih{sfx}"] = np.array(p.w_ih)
        rnn_sd[f"weight_hh{sfx}"] = np.array(p.w_hh)
        if ("w_hr" in getattr(p, "_fields", ())) != bool(model.proj_size):
            raise ValueError(f"params.layers[{l}][{d}] ({type(p).__name__}) does not "
                             f"match this model: proj_size={model.proj_size} needs "
                             f"{'a' if model.proj_size else 'no'} w_hr field")
        if p.b_ih is not None:
            rnn_sd[f"bias_ih{sfx}"] = np.array(p.b_ih)
            rnn_sd[f"bias_hh{sfx}"] = np.array(p.b_hh)
        if model.proj_size:
            rnn_sd[f"weight_hr{sfx}"] = np.array(p.w_hr)
    if params.readout is None:
        return rnn_sd, None
    readout_sd = {"weight": np.array(params.readout.weight)}
    if params.readout.bias is not None:
        readout_sd["bias"] = np.array(params.readout.bias)
    return rnn_sd, readout_sd
