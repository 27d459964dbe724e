"""A jaxrnn recurrent stack as a Flax NNX module: ``jaxrnn.nnx.RNN``.

Imported on its own (``import jaxrnn.nnx``); ``import jaxrnn`` does not import flax.
The module follows Flax's conventions (``rngs``, ``nnx.Param``s, batch-first, called
as ``flax.nnx.RNN`` is) and runs ``jaxrnn.RNN.features``, so that reverse mode
(``nnx.grad``, ``jax.grad``) differentiates it with the handwritten BPTT::

    import jaxrnn.nnx
    from flax import nnx

    rnn = jaxrnn.nnx.RNN("lstm", 16, 32, num_layers=2, rngs=nnx.Rngs(0))
    ys = rnn(xs)                       # xs (B, T, 16) -> ys (B, T, 32)
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrnn._src import frameworks as fw
from jaxrnn._src import validation
from jaxrnn import Cell, CellName, ScanMethod


class RNN(nnx.Module):
    """Layers x directions of a jaxrnn cell, with the weights as ``nnx.Param``s.

    The weights are attributes under PyTorch's names: ``weight_ih_l0 (G*H, D)``,
    ``weight_hh_l0 (G*H, H)``, ``bias_ih_l0 (G*H,)``, ``bias_hh_l0 (G*H,)``,
    ``..._reverse`` for the second direction, ``weight_hr_l0 (P, H)`` with
    ``proj_size=P`` (a user cell's other fields keep their own names, plus the
    suffix); ``torch_names`` lists them in order.

    Args:
        cell: a built-in cell's name (``"lstm"``, ``"gru"``, ``"elman"``, ...) or an
            instance of a ``jaxrnn.Cell`` subclass.
        in_features: D, features per input step.
        hidden_features: H, hidden units per layer and direction.
        num_layers: stacked recurrent layers.
        bidirectional: run each layer in both directions and concatenate.
        bias: the layers have ``bias_ih`` and ``bias_hh``.
        nonlinearity: ``"tanh"`` or ``"relu"`` (Elman, IndRNN and Leaky only).
        proj_size: LSTM only: project ``h`` to P features (PyTorch's ``proj_size``).
        forget_bias: LSTM-family cells: added to the forget gate's ``bias_ih`` at
            initialisation.
        dropout: probability of zeroing each output of every layer but the last
            (inverted dropout, as PyTorch), applied as ``nnx.Dropout`` applies it:
            unless ``deterministic`` (set by ``model.eval()``, cleared by
            ``model.train()``, or passed to the call), with keys from the
            ``"dropout"`` stream of the ``rngs`` given here (or to the call).
        method: the gradient reverse mode computes: ``"bptt"`` (the handwritten
            reverse scan) or ``"autodiff"`` (``jax.grad`` through the scan). The
            outputs are the same.
        bptt_segment: with ``method="bptt"``, memory-lean BPTT keeping the state
            every ``bptt_segment`` steps (see ``jaxrnn.RNN``).
        time_major: inputs and outputs are ``(T, B, ...)``; default batch-first
            ``(B, T, ...)``, as ``flax.nnx.RNN``.
        deterministic: the initial dropout mode, as ``nnx.Dropout``'s.
        dtype: the compute dtype, as Flax's: None (the default) computes in
            ``param_dtype``; ``jnp.bfloat16`` or ``jnp.float16`` runs every step's
            products and gate math in it while the weights stay ``param_dtype``
            (mixed precision: ``jaxrnn.RNN``'s ``compute_dtype``, docs/mixed_precision.md);
            the outputs and the carry are in ``param_dtype``.
        param_dtype: the parameters' dtype.
        rngs: ``nnx.Rngs``; the ``"params"`` stream initialises the weights
            (PyTorch's initialisation), the ``"dropout"`` stream drops.

    Raises:
        TypeError: a ``dtype`` that is not floating or is wider than ``param_dtype``.
        ValueError: a bad option, naming it.
    """

    def __init__(self, cell: CellName | Cell, in_features: int, hidden_features: int, *,
                 num_layers: int = 1, bidirectional: bool = False, bias: bool = True,
                 nonlinearity: str = "tanh", proj_size: int | None = None,
                 forget_bias: float = 0.0, dropout: float = 0.0, method: ScanMethod = "bptt",
                 bptt_segment: int | None = None, time_major: bool = False,
                 deterministic: bool = False, dtype: Any = None,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        compute_dtype = validation.check_compute_dtype(dtype, param_dtype, name="dtype")
        self.model = fw.stack(cell, in_features, hidden_features, num_layers=num_layers,
                              bidirectional=bidirectional, bias=bias, nonlinearity=nonlinearity,
                              proj_size=proj_size, forget_bias=forget_bias, dropout=dropout,
                              bptt_segment=bptt_segment, method=method,
                              batch_first=not time_major, compute_dtype=compute_dtype)
        self.method = method
        self.time_major = time_major
        self.deterministic = deterministic
        self.param_dtype = jnp.dtype(param_dtype)
        layers = fw.init_layers(self.model, rngs.params(), self.param_dtype)
        self.treedef = jax.tree.structure(layers)
        named = fw.named_params(self.model, layers)
        self.names = tuple(named)
        for name, value in named.items():
            setattr(self, name, nnx.Param(value))
        self.rngs = rngs["dropout"].fork() if dropout > 0 else nnx.data(None)

    def torch_names(self) -> list[str]:
        """The weights' attribute names, in PyTorch's ``state_dict`` order."""
        return list(self.names)

    def layers(self) -> tuple:
        """The weights as jaxrnn's ``[layer][direction]`` cell parameters (``CellParams``)."""
        return jax.tree.unflatten(self.treedef, [getattr(self, n)[...] for n in self.names])

    def load_torch(self, rnn_state_dict: Mapping[str, Any]) -> None:
        """Sets the weights, in place, from a ``torch.nn.RNN/LSTM/GRU`` ``state_dict``.

        Args:
            rnn_state_dict: tensors or arrays under PyTorch's names (``weight_ih_l0``,
                ...), cast to ``param_dtype``.

        Raises:
            ValueError: missing or unexpected keys, a wrong shape, or a cell that is
                not one of PyTorch's (``RNN.from_torch``'s checks).
        """
        layers = fw.from_torch(self.model, rnn_state_dict, self.param_dtype)
        for name, value in fw.named_params(self.model, layers).items():
            getattr(self, name)[...] = value

    def set_view(self, deterministic: bool | None = None):
        """As ``nnx.Dropout.set_view``: used by ``nnx.view`` to set ``deterministic``."""
        if deterministic is not None:
            self.deterministic = deterministic

    def _dropout_key(self, deterministic, rngs) -> jax.Array | None:
        if deterministic is None:
            deterministic = self.deterministic
        if self.model.dropout == 0 or deterministic:
            return None
        rngs = self.rngs if rngs is None else rngs
        if isinstance(rngs, nnx.Rngs):
            return rngs["dropout"]()
        if isinstance(rngs, nnx.RngStream):
            return rngs()
        return rngs  # a key

    def __call__(self, inputs: jax.Array, *, initial_carry: Any = None,
                 seq_lengths: jax.Array | None = None, return_carry: bool = False,
                 deterministic: bool | None = None, rngs: Any = None):
        """Runs the stack over a batch of sequences.

        Args:
            inputs: (B, T, in_features), or (T, B, in_features) with
                ``time_major``; a floating array, cast to ``param_dtype``.
            initial_carry: the initial state in PyTorch's shape,
                (num_layers*dirs, B, H) (for the LSTM a pair ``(h, c)``, ``h``
                (num_layers*dirs, B, P) with ``proj_size=P``); zeros if None.
            seq_lengths: optional integer (B,) in [1, T]: steps at or past a
                sequence's length give zero outputs and leave its carry unchanged.
            return_carry: also return the final carry.
            deterministic: overrides the module's dropout mode for this call.
            rngs: overrides the module's dropout keys (``nnx.Rngs``, a stream or a key).

        Returns:
            The outputs (B, T, dirs*H) (``time_major``: (T, B, dirs*H); P instead of
            H with ``proj_size``), or ``(carry, outputs)`` with ``return_carry``.

        Raises:
            ValueError: ``inputs``, ``initial_carry`` or ``seq_lengths`` of a wrong shape.
            TypeError: non-floating ``inputs``, non-integer ``seq_lengths``.
        """
        m = self.model
        shape = (f"({'T, B' if self.time_major else 'B, T'}, in_features={m.input_size})"
                 + ("" if self.time_major else " (batch-first; time_major=False)"))
        x = validation.check_xs(inputs, m.input_size, None, m.batch_first, name="inputs",
                                expected=shape).astype(self.param_dtype)
        B, T = x.shape[:2] if m.batch_first else x.shape[1::-1]
        if seq_lengths is not None:
            seq_lengths = validation.check_lengths(seq_lengths, T, B, None, name="seq_lengths")
        if initial_carry is not None:
            initial_carry = jax.tree.map(
                lambda s: s.astype(self.param_dtype),
                validation.check_state(initial_carry, fw.state_shapes(m, B), None,
                                       cell_name=m.cell_name, hidden_size=m.hidden_size,
                                       proj_size=m.proj_size, name="initial_carry"))
        outputs, carry = fw.features(m, self.layers(), x, initial_carry, seq_lengths,
                                     self.method, self._dropout_key(deterministic, rngs))
        return (carry, outputs) if return_carry else outputs
