"""A jaxrnn recurrent stack as an Equinox module: ``jaxrnn.equinox.RNN``.

Imported on its own (``import jaxrnn.equinox``); ``import jaxrnn`` does not import
equinox. The module follows Equinox's conventions (a ``key``, a pytree whose
configuration is static, one example per call: ``jax.vmap`` or ``eqx.filter_vmap``
for a batch) and runs ``jaxrnn.RNN.features``, so that reverse mode
(``eqx.filter_grad``, ``jax.grad``) differentiates it with the handwritten BPTT::

    import jax, jaxrnn.equinox

    rnn = jaxrnn.equinox.RNN("lstm", 16, 32, key=jax.random.key(0))
    ys, (h, c) = rnn(x)                        # x (T, 16) -> ys (T, 32)
    ys, _ = jax.vmap(rnn)(xs)                  # xs (B, T, 16) -> ys (B, T, 32)
"""

from __future__ import annotations

from typing import Any, Mapping

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxrnn._src import frameworks as fw
from jaxrnn._src import validation
from jaxrnn import RNN as Stack
from jaxrnn import Cell, CellName, ScanMethod


class RNN(eqx.Module):
    """Layers x directions of a jaxrnn cell over one sequence.

    Args:
        cell: a built-in cell's name (``"lstm"``, ``"gru"``, ``"elman"``, ...) or an
            instance of a ``jaxrnn.Cell`` subclass.
        input_size: D, features per input step.
        hidden_size: H, hidden units per layer and direction.
        num_layers: stacked recurrent layers.
        bidirectional: run each layer in both directions and concatenate.
        bias: the layers have ``b_ih`` and ``b_hh``.
        nonlinearity: ``"tanh"`` or ``"relu"`` (Elman, IndRNN and Leaky only).
        proj_size: LSTM only: project ``h`` to P features (PyTorch's ``proj_size``).
        forget_bias: LSTM-family cells: added to the forget gate's ``b_ih`` at
            initialisation.
        method: the gradient reverse mode computes: ``"bptt"`` (the handwritten
            reverse scan) or ``"autodiff"`` (``jax.grad`` through the scan); a
            static field: the outputs, and the weights a ``key`` gives, are the same.
        bptt_segment: with ``method="bptt"``, memory-lean BPTT keeping the state
            every ``bptt_segment`` steps (see ``jaxrnn.RNN``).
        dtype: the parameters' dtype; default float32, or float64 when
            ``jax_enable_x64`` is on (as ``eqx.nn.Linear``).
        compute_dtype: mixed precision: ``jnp.bfloat16`` or ``jnp.float16`` runs
            every step's products and gate math in it while the weights stay
            ``dtype``; the outputs and the state are in ``dtype`` (``jaxrnn.RNN``'s
            ``compute_dtype``, docs/mixed_precision.md). None (the default): ``dtype``.
        key: a JAX PRNG key for PyTorch's initialisation.

    Attributes:
        layers: ``[layer][direction]`` the cell's parameters (``jaxrnn.CellParams``:
            ``w_ih (G*H, D_l)``, ``w_hh (G*H, H)``, ``b_ih``, ``b_hh (G*H,)``;
            ``LSTMPParams`` adds ``w_hr (P, H)``), as ``jaxrnn.RNNParams.layers``.
        stack: the static ``jaxrnn.RNN`` configuration (``output_size=None``: no readout).
        method: static.
    """

    layers: tuple
    stack: Stack = eqx.field(static=True)
    method: str = eqx.field(static=True)

    def __init__(self, cell: CellName | Cell, input_size: int, hidden_size: int, *,
                 num_layers: int = 1, bidirectional: bool = False, bias: bool = True,
                 nonlinearity: str = "tanh", proj_size: int | None = None,
                 forget_bias: float = 0.0, method: ScanMethod = "bptt",
                 bptt_segment: int | None = None, dtype: Any = None, compute_dtype: Any = None,
                 key: jax.Array):
        if dtype is None:
            dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        compute_dtype = validation.check_compute_dtype(compute_dtype, dtype)
        self.stack = fw.stack(cell, input_size, hidden_size, num_layers=num_layers,
                              bidirectional=bidirectional, bias=bias, nonlinearity=nonlinearity,
                              proj_size=proj_size, forget_bias=forget_bias, dropout=0.0,
                              bptt_segment=bptt_segment, method=method,
                              compute_dtype=compute_dtype)
        self.method = method
        self.layers = fw.init_layers(self.stack, key, dtype)

    def torch_names(self) -> list[str]:
        """PyTorch's ``state_dict`` keys for ``layers``' arrays, in order."""
        return list(fw.named_params(self.stack, self.layers))

    def from_torch(self, rnn_state_dict: Mapping[str, Any]) -> RNN:
        """A copy of this module with the weights of a ``torch.nn.RNN/LSTM/GRU``.

        Args:
            rnn_state_dict: tensors or arrays under PyTorch's names (``weight_ih_l0``,
                ...), cast to the module's dtype.

        Raises:
            ValueError: missing or unexpected keys, a wrong shape, or a cell that is
                not one of PyTorch's (``jaxrnn.RNN.from_torch``'s checks).
        """
        dtype = jax.tree.leaves(self.layers)[0].dtype
        layers = fw.from_torch(self.stack, rnn_state_dict, dtype)
        return eqx.tree_at(lambda m: m.layers, self, layers)

    def __call__(self, x: jax.Array, *, state: Any = None,
                 length: jax.Array | int | None = None) -> tuple[jax.Array, Any]:
        """Runs the stack over one sequence.

        Args:
            x: (T, input_size), one sequence (``jax.vmap`` for a batch); a floating
                array, cast to the parameters' dtype.
            state: the initial state in PyTorch's shape without the batch axis,
                (num_layers*dirs, H) (for the LSTM a pair ``(h, c)``, ``h``
                (num_layers*dirs, P) with ``proj_size=P``); zeros if None.
            length: optional integer scalar in [1, T]: steps at or past it give zero
                outputs and leave the state unchanged.

        Returns:
            ``(outputs (T, dirs*H), final_state)`` (P instead of H with
            ``proj_size``), the state in ``state``'s shape.

        Raises:
            ValueError: ``x``, ``state`` or ``length`` of a wrong shape.
            TypeError: non-floating ``x``, non-integer ``length``.
        """
        m = self.stack
        dtype = jax.tree.leaves(self.layers)[0].dtype
        shape = (f"(T, input_size={m.input_size}), one sequence (jax.vmap or "
                 f"eqx.filter_vmap for a batch)")
        x = validation.check_xs(x, m.input_size, None, name="x", expected=shape,
                                per_example=True).astype(dtype)
        lengths = None
        if length is not None:
            lengths = validation.check_lengths(length, x.shape[0], None, None,
                                               name="length")[None]
        if state is not None:
            state = validation.check_state(state, fw.state_shapes(m, None), None,
                                           cell_name=m.cell_name, hidden_size=m.hidden_size,
                                           proj_size=m.proj_size, name="state")
            state = jax.tree.map(lambda s: s.astype(dtype)[:, None], state)
        hs, final = fw.features(m, self.layers, x[:, None], state, lengths, self.method)
        return hs[:, 0], jax.tree.map(lambda s: s[:, 0], final)
