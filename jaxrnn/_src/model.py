r"""The RNN model: layers x directions of one cell, a linear readout, losses and gradients.

.. math::
    h^{(0)}_t = x_t, \qquad h^{(l)}_t = \mathrm{cell}(h^{(l)}_{t-1}, h^{(l-1)}_t), \qquad
    y_t = W_{hy} h^{(L)}_t + b_y

With ``output_size=None`` there is no readout: ``apply`` returns :math:`h^{(L)}_t`.
The scans run time-major; a ``batch_first=True`` model transposes its sequences at
the boundary (``check_inputs`` / ``check_targets`` in, ``from_time_major`` out).

``RNN`` is a frozen dataclass (static configuration, hashable, usable as a static
``jax.jit`` argument); its parameters are an ``RNNParams`` pytree. Every recurrent
layer goes through ``scan.layer``, so ``method="bptt"`` differentiates each layer
with the handwritten reverse scan and ``method="autodiff"`` with ``jax.grad``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jaxrnn._src import estimators
from jaxrnn._src.estimators.base import Estimator
from jaxrnn._src import losses as losses_lib
from jaxrnn._src import validation
from jaxrnn._src.cells import CELLS, Carry, Cell, CellParams, check_cell_class, make_cell
from jaxrnn._src.names import CellName, LossName, Method, ScanMethod
from jaxrnn._src.scan import METHODS, layer, step_layer
from jaxrnn._src.stack import run_stack

# A state in PyTorch's shape: (L*dirs, B, H), or for the LSTM a pair (h0, c0) (a cell
# with carry_size k > 1: a tuple of k arrays).
State = jax.Array | tuple[jax.Array, ...]


class ReadoutParams(NamedTuple):
    """The linear readout ``y_t = W h_t + b``, PyTorch ``nn.Linear`` layout."""

    weight: jax.Array  # (O, dirs*H)
    bias: jax.Array | None  # (O,), or None without readout bias


class RNNParams(NamedTuple):
    """All parameters of an ``RNN``."""

    layers: tuple[tuple[CellParams, ...], ...]  # [layer][direction]
    readout: ReadoutParams | None  # None for a model with output_size=None


def params_dtype(params: RNNParams):
    """The parameters' floating dtype: the readout's, or (no readout) the first layer's."""
    if params.readout is not None:
        return params.readout.weight.dtype
    return jax.tree.leaves(params.layers)[0].dtype


def sequence_mask(lengths: jax.Array | None, num_steps: int) -> jax.Array | None:
    """Boolean (T, B): True at steps ``t < lengths[b]``; None when ``lengths`` is None."""
    if lengths is None:
        return None
    return jnp.arange(num_steps)[:, None] < lengths[None, :]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RNN:
    """A recurrent network: ``num_layers`` x directions of one cell, then a linear readout.

    Sequences are time-major, ``(T, B, ...)`` as PyTorch's default, unless
    ``batch_first=True``: then every call that takes or returns sequences
    (``apply``, ``features``, ``loss``, ``loss_and_grad``, the train steps, the
    diagnostics) takes and returns ``(B, T, ...)``; ``lengths`` stays ``(B,)`` and
    states stay ``(L*dirs, B, H)`` (as PyTorch's ``batch_first``). We do not guess
    the layout from the shapes: an array laid out the other way is read as this
    layout, unless the sizes betray it (``lengths``, a state or ``targets`` whose
    sizes fit only the other layout), which raises a ``ValueError`` naming the
    argument and ``batch_first``.

    Args:
        cell: a built-in cell's name (``"elman"``, ``"lstm"``, ``"gru"``, ...: see
            ``jaxrnn._src.cells.CELLS``) or an instance of a ``jaxrnn.Cell`` subclass, a
            user's own cell (its options are then its own fields).
        input_size: D, features per input step.
        hidden_size: H, hidden units per layer and direction.
        output_size: O, outputs per step of the readout; a required keyword. None
            builds a stack of recurrent layers without a head: ``apply`` returns the
            top layer's outputs, ``params.readout`` is None, and the losses, train
            steps and diagnostics refuse it (put your own head and loss on top;
            ``jax.grad`` through ``apply`` still runs the handwritten BPTT).
        num_layers: stacked recurrent layers.
        bidirectional: run each layer in both directions and concatenate.
        bias: recurrent layers have ``b_ih`` and ``b_hh``.
        readout_bias: the readout has a bias.
        nonlinearity: ``"tanh"`` or ``"relu"`` (Elman and IndRNN only).
        proj_size: LSTM only: project ``h`` to this size, as PyTorch's
            ``nn.LSTM(proj_size=P)``; 0 (the default) projects nothing.
        forget_bias: LSTM-family cells only: a constant added to the forget gate's
            ``b_ih`` at initialisation (1.0 as Jozefowicz et al. 2015); default 0.
        dropout: probability of zeroing each output of every layer but the last
            (as PyTorch), applied only when a ``dropout_key`` is passed.
        bptt_segment: memory-lean BPTT for long sequences: with
            ``method="bptt"``, keep the state only every ``bptt_segment`` steps and
            recompute each segment in the backward pass (about sqrt(T) is best);
            None (the default) keeps every step.
        batch_first: sequences are ``(B, T, ...)``; default False: time-major
            ``(T, B, ...)``. The scans run time-major either way: the arrays are
            transposed on the way in and out.
        compute_dtype: mixed precision (Flax's ``dtype`` beside ``param_dtype``):
            ``jnp.bfloat16`` or ``jnp.float16`` runs every recurrent step's products
            and gate math in that dtype while the parameters keep theirs (float32
            master weights), the state and the backward pass's cotangents stay in
            the parameters' dtype, and the weight gradients accumulate in it; ``xs``
            may be given in either dtype. The readout and the loss run in the
            parameters' dtype. None (the default): the parameters' dtype throughout
            (docs/mixed_precision.md).

    Shapes follow PyTorch, time-major: inputs ``(T, B, D)``, outputs ``(T, B, O)``
    (``(T, B, dirs*H)`` without a head; ``(B, T, ...)`` with ``batch_first``),
    states ``(num_layers * num_directions, B, H)`` (for the LSTM a pair ``(h, c)``;
    with ``proj_size=P``, ``h`` is (L*dirs, B, P)).
    """

    cell: CellName | Cell = "elman"
    input_size: int
    hidden_size: int
    output_size: int | None
    num_layers: int = 1
    bidirectional: bool = False
    bias: bool = True
    readout_bias: bool = True
    nonlinearity: str = "tanh"
    dropout: float = 0.0
    bptt_segment: int | None = None
    proj_size: int = 0
    forget_bias: float = 0.0
    batch_first: bool = False
    compute_dtype: DTypeLike | None = None

    def __post_init__(self):
        for name in ("input_size", "hidden_size", "output_size", "num_layers"):
            if not (name == "output_size" and self.output_size is None):
                validation.check_int(name, getattr(self, name), 1)
        if not isinstance(self.batch_first, bool):
            raise ValueError(f"batch_first must be True or False, got {self.batch_first!r}")
        # as a name ("bfloat16"): hashable, equal however it was given, JSON-friendly
        object.__setattr__(self, "compute_dtype",
                           validation.check_compute_dtype(self.compute_dtype))
        if isinstance(self.cell, Cell):
            check_cell_class(self.cell)
            given = [f"{k}={getattr(self, k)!r}" for k, v in
                     (("nonlinearity", "tanh"), ("proj_size", 0), ("forget_bias", 0.0))
                     if getattr(self, k) != v]
            if given:
                raise ValueError(f"{', '.join(given)}: options of the built-in cells; a Cell "
                                 f"instance ({type(self.cell).__name__}) carries its own")
        elif isinstance(self.cell, type) and issubclass(self.cell, Cell):
            raise ValueError(f"cell must be a Cell instance, got the class "
                             f"{self.cell.__name__}: pass cell={self.cell.__name__}()")
        elif not isinstance(self.cell, str) or self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)} or a jaxrnn.Cell instance, "
                             f"got {self.cell!r}")
        else:
            make_cell(self.cell, self.nonlinearity, proj_size=self.proj_size,
                      forget_bias=self.forget_bias, hidden_size=self.hidden_size,
                      bias=self.bias)  # validates the cell's options
        if self.bptt_segment is not None:
            validation.check_int("bptt_segment", self.bptt_segment, 1)
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")

    # --- static facts --------------------------------------------------------
    @property
    def cell_fn(self) -> Cell:
        """The ``Cell`` object that holds the step and backward-step math."""
        if isinstance(self.cell, Cell):
            return self.cell
        return make_cell(self.cell, self.nonlinearity, proj_size=self.proj_size,
                         forget_bias=self.forget_bias)

    @property
    def cell_name(self) -> str:
        """The cell's name: the built-in name, or a user cell's ``name`` attribute."""
        return self.cell if isinstance(self.cell, str) else self.cell.name

    @property
    def layer_output_size(self) -> int:
        """Features one direction of a layer outputs: H, or P with ``proj_size=P``."""
        return self.cell_fn.state_sizes(self.hidden_size)[0]

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    # --- parameters ----------------------------------------------------------
    def init(self, key: jax.Array, dtype: DTypeLike = jnp.float32) -> RNNParams:
        """Random parameters with PyTorch's initialisation.

        Args:
            key: a JAX PRNG key (``jax.random.key(0)``).
            dtype: a floating dtype.

        Returns:
            ``RNNParams``: per layer and direction ``CellParams`` (``w_ih (G*H, D_l)``,
            ``w_hh (G*H, H)``, biases ``(G*H,)``), and the readout
            (``weight (O, dirs*H)``, ``bias (O,)``; None with ``output_size=None``,
            the layers the same as with a head). With ``proj_size=P``: ``LSTMPParams``,
            with ``w_hh (4H, P)`` and ``w_hr (P, H)``, layers above the first read
            ``dirs*P`` features and the readout ``weight`` is (O, dirs*P).
        """
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"dtype must be a floating dtype, got {dtype!r}")
        cell = self.cell_fn
        keys = jax.random.split(key, self.num_layers * self.num_directions + 1)
        layers = []
        for l in range(self.num_layers):
            d_in = self.input_size if l == 0 else self.layer_output_size * self.num_directions
            layers.append(tuple(
                cell.init(keys[l * self.num_directions + d], d_in, self.hidden_size, self.bias,
                          dtype)
                for d in range(self.num_directions)))
        if self.output_size is None:
            return RNNParams(tuple(layers), None)
        features = self.layer_output_size * self.num_directions
        bound = 1.0 / math.sqrt(features)
        kw, kb = jax.random.split(keys[-1])
        readout = ReadoutParams(
            weight=jax.random.uniform(kw, (self.output_size, features), dtype, -bound, bound),
            bias=(jax.random.uniform(kb, (self.output_size,), dtype, -bound, bound)
                  if self.readout_bias else None))
        return RNNParams(tuple(layers), readout)

    def zero_state(self, batch: int, dtype: DTypeLike = jnp.float32) -> State:
        """Zeros in PyTorch's state shape ``(L*dirs, B, H)`` (a pair for the LSTM).

        A cell with ``carry_size`` k > 1 has a tuple of k such arrays, the k-th of
        width ``cell.state_sizes(H)[k]``.
        """
        parts = tuple(jnp.zeros(shape, dtype) for shape in self._state_shapes(batch))
        return parts if len(parts) > 1 else parts[0]

    # --- validation (the rules: jaxrnn._src.validation) ---------------------
    def _state_shapes(self, batch: int) -> list[tuple[int, int, int]]:
        """The state's parts, ``(L*dirs, B, width)`` for each of the cell's carries."""
        n = self.num_layers * self.num_directions
        return [(n, batch, w) for w in self.cell_fn.state_sizes(self.hidden_size)]

    def check_inputs(self, params: RNNParams, xs, state=None, lengths=None):
        """Validates ``xs``, ``state`` and ``lengths``; returns them as arrays, ``xs`` time-major.

        ``xs`` is read in the model's layout (``batch_first``) and returned as
        ``(T, B, D)``: the one way in for every call that takes sequences.

        Raises:
            TypeError: non-floating ``xs`` (or a dtype other than the parameters'),
                non-integer ``lengths``.
            ValueError: a wrong rank or size, an empty sequence or batch, lengths
                outside ``[1, T]``.
        """
        validation.check_type("params", params, RNNParams, " (from RNN.init)")
        dtype = params_dtype(params)
        xs = self.to_time_major(validation.check_xs(xs, self.input_size,
                                                    self._input_dtypes(dtype),
                                                    self.batch_first))
        T, B, _ = xs.shape
        if state is not None:
            state = validation.check_state(state, self._state_shapes(B), dtype,
                                           cell_name=self.cell_name,
                                           hidden_size=self.hidden_size,
                                           proj_size=self.proj_size, num_steps=T,
                                           batch_first=self.batch_first)
        if lengths is not None:
            lengths = validation.check_lengths(lengths, T, B, self.batch_first)
        return xs, state, lengths

    def _input_dtypes(self, dtype) -> tuple:
        """The dtypes ``xs`` may have: the parameters', or the compute dtype."""
        if self.compute_dtype is None:
            return (jnp.dtype(dtype),)
        return (jnp.dtype(dtype), jnp.dtype(self.compute_dtype))

    def check_targets(self, ys_shape, targets, loss: str, lengths=None):
        """Validates ``targets`` for ``loss``; returns them as an array, time-major.

        Args:
            ys_shape: the outputs' time-major shape ``(T, B, O)``.
            targets: in the model's layout: ``(T, B, O)`` / ``(T, B)`` classes, or
                ``(B, T, O)`` / ``(B, T)`` with ``batch_first``.
            loss: the loss's name.
            lengths: the validated (B,) lengths, or None (``"xent"`` classes past a
                length are padding, not checked).

        Raises:
            ValueError: a model without a readout (``output_size=None``), an unknown
                ``loss``, a wrong shape, a class outside ``[0, output_size)``
                within the lengths (concrete values only). TypeError: a wrong dtype.
        """
        validation.check_readout(self.output_size, "a loss")
        shape = (ys_shape[1], ys_shape[0], *ys_shape[2:]) if self.batch_first else ys_shape
        return self.to_time_major(validation.check_targets(shape, targets, loss,
                                                           self.batch_first, lengths))

    # --- layout: the one place where batch-first arrays are transposed ----------
    def to_time_major(self, a: jax.Array) -> jax.Array:
        """A sequence array in the model's layout -> ``(T, B, ...)``."""
        return jnp.swapaxes(a, 0, 1) if self.batch_first else a

    def from_time_major(self, a: jax.Array) -> jax.Array:
        """``(T, B, ...)`` -> the model's layout (``(B, T, ...)`` with ``batch_first``)."""
        return jnp.swapaxes(a, 0, 1) if self.batch_first else a

    def time_major(self) -> RNN:
        """This model with ``batch_first=False``: for code that already holds time-major arrays."""
        return dataclasses.replace(self, batch_first=False) if self.batch_first else self

    # --- forward -------------------------------------------------------------
    def initial_carries(self, state, batch, dtype) -> list[Carry]:
        """PyTorch-shaped state -> one carry tuple per (layer, direction)."""
        if state is None:
            state = self.zero_state(batch, dtype)
        parts = state if self.cell_fn.carry_size > 1 else (state,)
        n = self.num_layers * self.num_directions
        return [tuple(p[i] for p in parts) for i in range(n)]

    def state_from_carries(self, carries: list[Carry]) -> State:
        """One carry per (layer, direction) -> PyTorch-shaped state."""
        parts = tuple(jnp.stack([c[k] for c in carries]) for k in range(len(carries[0])))
        return parts if self.cell_fn.carry_size > 1 else parts[0]

    def features(self, params: RNNParams, xs: jax.Array, state: State | None = None,
                 lengths: jax.Array | None = None, method: ScanMethod = "bptt",
                 dropout_key: jax.Array | None = None) -> tuple[jax.Array, State]:
        """The top recurrent layer's outputs, before the readout.

        Args: as in ``apply`` (``params.readout`` is not read: it may be None).

        Returns:
            ``(hs (T, B, dirs*H), final_state)`` (``(B, T, dirs*H)`` with
            ``batch_first``; ``dirs*P`` with ``proj_size=P``); ``hs`` is zero past
            each length.
        """
        xs, state, lengths = self.check_inputs(params, xs, state, lengths)
        hs, final = self._features(params, xs, state, lengths, method, dropout_key)
        return self.from_time_major(hs), final

    def _features(self, params: RNNParams, xs: jax.Array, state, lengths, method: ScanMethod,
                  dropout_key) -> tuple[jax.Array, State]:
        """``features`` on validated, time-major ``xs (T, B, D)``: ``(hs (T, B, dirs*H), state)``."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        T, B, _ = xs.shape
        cell, mask = self.cell_fn, sequence_mask(lengths, T)
        segment = self.bptt_segment if method == "bptt" else None

        def direction(l, d, p, x, carry0):
            return *layer(cell, p, x, carry0, mask, method, segment, self.compute_dtype), None

        run = run_stack(direction, params.layers, xs,
                        self.initial_carries(state, B, params_dtype(params)),
                        lengths, self.dropout, dropout_key)
        return run.h, self.state_from_carries(run.finals)

    def readout(self, params: RNNParams, hs: jax.Array, mask: jax.Array | None = None):
        """``y_t = W h_t + b``, (T, B, dirs*H) -> (T, B, O); zero where ``mask`` is False.

        Any leading axes work without ``mask`` (one step: (B, dirs*H) -> (B, O)).
        """
        ys = hs @ params.readout.weight.T
        if params.readout.bias is not None:
            ys = ys + params.readout.bias
        if mask is not None:
            ys = jnp.where(mask[:, :, None], ys, 0)
        return ys

    def apply(self, params: RNNParams, xs: jax.Array, state: State | None = None,
              lengths: jax.Array | None = None, method: ScanMethod = "bptt",
              dropout_key: jax.Array | None = None) -> tuple[jax.Array, State]:
        """Runs the network over a batch of sequences.

        Args:
            params: from ``init`` or ``from_torch``.
            xs: inputs, (T, B, input_size), time-major; (B, T, input_size) with
                ``batch_first=True``.
            state: initial state, (num_layers*dirs, B, H) (LSTM: a pair); zeros if None.
            lengths: optional integer (B,) in [1, T]; steps at or past a sequence's
                length give zero outputs and leave its state unchanged, whatever
                ``xs`` holds there. Checked when concrete; under ``jax.jit`` values
                outside [1, T] are clipped into it (not checked).
            method: the gradient the outputs carry: ``"bptt"`` (handwritten reverse
                scan) or ``"autodiff"`` (``jax.grad`` through the scan). The forward
                values are the same.
            dropout_key: a PRNG key to apply dropout between layers (training);
                None (the default) applies none.

        Returns:
            ``(ys (T, B, output_size), final_state)``, the state in ``state``'s shape
            (PyTorch's, whatever the layout). ``ys`` is ``(B, T, output_size)`` with
            ``batch_first``, and the top layer's outputs ``(..., dirs*H)`` (``dirs*P``
            with ``proj_size``) with ``output_size=None``.
        """
        xs, state, lengths = self.check_inputs(params, xs, state, lengths)
        hs, final = self._features(params, xs, state, lengths, method, dropout_key)
        if params.readout is None:
            return self.from_time_major(hs), final
        ys = self.readout(params, hs, sequence_mask(lengths, xs.shape[0]))
        return self.from_time_major(ys), final

    def step(self, params: RNNParams, state: State | None, x_t: jax.Array
             ) -> tuple[State, jax.Array]:
        r"""One step of every layer on a raw input: ``(state, x_t) -> (state, y_t)``.

        .. math::
            h^{(0)} = x_t, \qquad h^{(l)}_t = \mathrm{cell}(h^{(l)}_{t-1},
            W^{(l)}_{ih} h^{(l-1)}_t + b^{(l)}), \qquad y_t = W_{hy} h^{(L)}_t + b_y

        The order is ``lax.scan``'s ``(carry, out)``: ``jax.lax.scan(lambda s, x:
        model.step(params, s, x), state, xs)`` equals ``apply`` (to rounding) for
        time-major ``xs``. For generation and online use; dropout is never applied,
        and ``jax.grad`` of a step is JAX's own (one step has no reverse scan).

        Args:
            params: from ``init``.
            state: the state, (num_layers, B, H) (LSTM: a pair); zeros if None.
            x_t: one step's inputs, (B, input_size) (no time axis, so no layout).

        Returns:
            ``(state, y_t)``: the next state in PyTorch's shape, and ``y_t (B, O)``,
            or with ``output_size=None`` the top layer's ``h_t (B, H)`` (P with
            ``proj_size``).

        Raises:
            ValueError: a bidirectional model (its backward direction needs the
                whole sequence), or bad shapes. TypeError: a wrong dtype.
        """
        if self.bidirectional:
            raise ValueError("step runs forward in time one step at a time: a bidirectional "
                             "RNN (bidirectional=True) needs the whole sequence; use apply")
        validation.check_type("params", params, RNNParams, " (from RNN.init)")
        dtype = params_dtype(params)
        x_t = validation.check_step_input(x_t, self.input_size, self._input_dtypes(dtype))
        B = x_t.shape[0]
        if state is not None:
            state = validation.check_state(state, self._state_shapes(B), dtype,
                                           cell_name=self.cell_name,
                                           hidden_size=self.hidden_size,
                                           proj_size=self.proj_size)
        cell, h, carries = self.cell_fn, x_t, []
        for (p,), carry in zip(params.layers, self.initial_carries(state, B, dtype)):
            carry = step_layer(cell, p, carry, h, self.compute_dtype)  # this layer's step
            carries.append(carry)
            h = carry[0]  # the next layer's input
        y = h if params.readout is None else self.readout(params, h)
        return self.state_from_carries(carries), y

    # --- losses and gradients -----------------------------------------------
    def loss(self, params: RNNParams, xs: jax.Array, targets: jax.Array,
             loss: LossName = "half_sse", method: ScanMethod = "bptt",
             state: State | None = None, lengths: jax.Array | None = None,
             dropout_key: jax.Array | None = None) -> jax.Array:
        """The scalar loss of ``apply``'s outputs against ``targets``.

        Args:
            targets: (T, B, O) floats for ``"half_sse"``/``"mse"``; (T, B) integer
                classes for ``"xent"``; (B, T, O) and (B, T) with ``batch_first``.
            loss: ``"half_sse"``, ``"mse"`` or ``"xent"`` (see ``jaxrnn._src.losses``).

        The other arguments are as in ``apply``.

        Raises:
            ValueError: a model without a readout (``output_size=None``); bad
                inputs, as ``apply``.
        """
        validation.check_readout(self.output_size, "loss")
        xs, state, lengths = self.check_inputs(params, xs, state, lengths)
        targets = self.check_targets((*xs.shape[:2], self.output_size), targets, loss, lengths)
        return loss_fn(self, loss, method, params, xs, targets, state, lengths, dropout_key)

    def loss_and_grad(self, params: RNNParams, xs: jax.Array, targets: jax.Array,
                      loss: LossName = "half_sse", method: Method | Estimator = "bptt",
                      state: State | None = None, lengths: jax.Array | None = None,
                      dropout_key: jax.Array | None = None, *, key: jax.Array | None = None
                      ) -> tuple[jax.Array, RNNParams]:
        """The loss and its gradient with respect to ``params``, jit-compiled.

        Args: as in ``loss``. ``method="bptt"`` uses the handwritten reverse-scan
        BPTT for every recurrent layer; ``method="autodiff"`` uses ``jax.grad``
        through the forward scan. The other methods are forward-in-time estimators
        (``jaxrnn.estimators``, docs/estimators.md), run over the whole sequence with
        one read-out at its end: ``"rtrl"`` (exact real-time recurrent learning,
        every cell and depth, for small models), ``"snap1"``, ``"snap2"``,
        ``"uoro"``, ``"kf_rtrl"``, ``"rflo"``, ``"eprop"`` (approximations); an
        ``Estimator`` instance gives one with its options. They run one direction
        and no dropout.
            key: the estimator's own PRNG key, apart from ``dropout_key``: needed by
                the stochastic estimators (``"uoro"``, ``"kf_rtrl"``, random
                feedback), ignored by the others.

        Returns:
            ``(loss, grads)``, ``grads`` an ``RNNParams`` like ``params``.

        Raises:
            ValueError: a model without a readout (``output_size=None``), an unknown
                ``method``, a model an estimator does not support (one line naming
                the method); bad inputs, as ``apply``.
        """
        validation.check_readout(self.output_size, "loss_and_grad")
        estimator = None if method in METHODS else self.estimator(method)
        xs, state, lengths = self.check_inputs(params, xs, state, lengths)
        targets = self.check_targets((xs.shape[0], xs.shape[1], self.output_size), targets, loss,
                                     lengths)
        if estimator is None:
            return _loss_and_grad(self, loss, method, params, xs, targets, state, lengths,
                                  dropout_key)
        if dropout_key is not None:
            raise ValueError(f"method={estimator.method!r} applies no dropout: it takes no "
                             f"dropout_key")
        self.check_estimator(estimator, params, xs.shape[1])
        losses_lib.get_loss(loss)
        return estimated_loss_and_grad(self, estimator, loss, params, xs, targets, state,
                                       lengths, key)

    def estimator(self, method: Method | Estimator) -> Estimator:
        """The ``Estimator`` for ``method`` (a name or an instance), checked for this model.

        Raises:
            ValueError: an unknown method (listing them all), or one this model's cell,
                layers, directions or compute dtype rule out.
        """
        if isinstance(method, str) and method not in estimators.ESTIMATORS:
            raise ValueError(f"method must be one of {METHODS + tuple(estimators.ESTIMATORS)} "
                             f"or a jaxrnn.estimators.Estimator, got {method!r}")
        estimator = estimators.get_estimator(method)
        estimators.check_model(estimator, self.cell_fn, self.num_layers, self.bidirectional,
                               self.compute_dtype)
        return estimator

    def check_estimator(self, estimator, params: RNNParams, batch: int,
                        max_elements: int = estimators.MAX_STATE_ELEMENTS) -> None:
        """``estimators.check_model`` with this model's fields and size (see ``estimator``)."""
        self.estimator(estimator)  # the cell, layers and directions first
        estimators.check_model(estimator, self.cell_fn, self.num_layers, self.bidirectional,
                               self.compute_dtype, layers_of(params), batch, max_elements)

    # --- PyTorch interop (jaxrnn._src.interop) --------------------------------
    def torch_names(self) -> list[str]:
        """The ``state_dict`` keys of the matching ``torch.nn.RNN/LSTM/GRU``, in order.

        With ``proj_size``, each layer and direction also has ``weight_hr`` after its
        biases, as in PyTorch.

        Raises:
            ValueError: the cell is not one of PyTorch's (a user cell, indrnn, peephole_lstm,
                layernorm_lstm).
        """
        from jaxrnn._src import interop  # after the model: it imports RNNParams

        return interop.torch_names(self)

    def from_torch(self, rnn_state_dict: Mapping[str, Any],
                   readout_state_dict: Mapping[str, Any] | None = None, dtype=None
                   ) -> RNNParams:
        """Parameters from PyTorch ``state_dict``s (numpy arrays or tensors).

        Args:
            rnn_state_dict: keys as in ``torch.nn.RNN/LSTM/GRU`` (``weight_ih_l0``,
                ``bias_hh_l1_reverse``, ...).
            readout_state_dict: keys ``weight`` (O, dirs*H) and ``bias`` (O,) of an
                ``nn.Linear``; None (and only None) for ``output_size=None``. With ``proj_size=P``, P replaces H here, in
                ``weight_hh`` (4H, P) and in the input width of layers above the
                first; ``weight_hr`` is (P, H).
            dtype: cast to this dtype; default: keep the arrays' own.

        Raises:
            ValueError: missing or unexpected keys, a wrong shape, or a cell that is
                not one of PyTorch's.
        """
        from jaxrnn._src import interop

        return interop.from_torch(self, rnn_state_dict, readout_state_dict, dtype)

    def to_torch(self, params: RNNParams
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """``(rnn_state_dict, readout_state_dict)`` of numpy arrays under PyTorch's names.

        ``readout_state_dict`` is None for parameters without a readout.

        The arrays are writable copies; load them with
        ``module.load_state_dict({k: torch.from_numpy(v) ...})``. With ``proj_size``,
        each layer and direction also gives ``weight_hr`` (P, H), after its biases.

        Raises:
            ValueError: the cell is not one of PyTorch's, or ``params`` does not
                match this model's parameter type.
        """
        from jaxrnn._src import interop

        return interop.to_torch(self, params)

def loss_fn(model: RNN, loss: str, method: ScanMethod, params, xs, targets, state, lengths,
            dropout_key=None, last_only: bool = False):
    """The scalar loss, without input validation (callers validate); jit-friendly.

    ``xs (T, B, D)`` and ``targets`` are time-major whatever ``model.batch_first``
    (as ``check_inputs`` and ``check_targets`` return them).

    With ``last_only`` (static), only the last step's outputs are scored against
    ``targets[-1:]`` (tasks such as the adding problem); ``lengths`` must then be None.
    """
    hs, _ = model._features(params, xs, state, lengths, method, dropout_key)
    mask = sequence_mask(lengths, xs.shape[0])
    if last_only:
        if lengths is not None:
            raise ValueError("last_only scoring takes full-length sequences: lengths must be None")
        hs, targets = hs[-1:], targets[-1:]
    ys = model.readout(params, hs, mask)
    return losses_lib.get_loss(loss)(ys, targets, mask)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _loss_and_grad(model: RNN, loss: str, method: ScanMethod, params, xs, targets, state, lengths,
                   dropout_key):
    return jax.value_and_grad(loss_fn, argnums=3)(model, loss, method, params, xs, targets,
                                                   state, lengths, dropout_key)


def layers_of(params: RNNParams) -> tuple:
    """The layers' parameters of a one-direction model, one NamedTuple per layer."""
    return tuple(p for (p,) in params.layers)


def estimator_grads(params: RNNParams, dlayers, dreadout) -> RNNParams:
    """An estimator's gradients as an ``RNNParams`` like ``params``."""
    return RNNParams(tuple((g,) for g in dlayers),
                     params.readout._replace(weight=dreadout.weight, bias=dreadout.bias))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 9, 10))
def estimated_loss_and_grad(model: RNN, estimator, loss: str, params, xs, targets, state,
                            lengths, key, last_only: bool = False, state_grad: bool = False):
    """``loss_and_grad`` by a forward-in-time estimator, on validated, time-major arrays.

    Returns:
        ``(loss, grads)``; with ``state_grad`` (an estimator whose ``read_out`` also
        gives the initial carries' gradient, ``RTRL(state_grad=True)``),
        ``(loss, grads, dstate)`` with ``dstate`` in the state's shape.
    """
    B = xs.shape[1]
    carries0 = model.initial_carries(state, B, params_dtype(params))
    readout = estimators.Readout(params.readout.weight, params.readout.bias)
    value, g, dreadout = estimators.loss_and_grad(estimator, model.cell_fn, layers_of(params),
                                                  readout, loss, xs, targets, carries0, lengths,
                                                  key, last_only)
    if not state_grad:
        return value, estimator_grads(params, g, dreadout)
    g, gq = g  # gq (B, S): the initial carries' gradient, every layer's parts in order
    widths = [c.shape[-1] for carry in carries0 for c in carry]
    parts = jnp.split(gq, np.cumsum(widths)[:-1], axis=-1)
    k = len(carries0[0])
    dcarries = [tuple(parts[l * k:(l + 1) * k]) for l in range(len(carries0))]
    return value, estimator_grads(params, g, dreadout), model.state_from_carries(dcarries)
