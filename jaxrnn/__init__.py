"""jaxrnn: recurrent networks in JAX with a handwritten, reverse-scan BPTT.

The public API::

    model = jaxrnn.RNN(cell="elman", input_size=D, hidden_size=H, output_size=O)
    params = model.init(jax.random.key(0))
    ys, state = model.apply(params, xs)                       # xs (T, B, D) -> ys (T, B, O)
    # time-major as PyTorch; RNN(..., batch_first=True): (B, T, D); output_size=None: no head
    loss, grads = model.loss_and_grad(params, xs, targets, method="bptt")

Everything here is re-exported from the private modules under ``jaxrnn._src``;
``import jaxrnn`` imports jax, optax and numpy, nothing else.
"""

from jaxrnn._src.cellcheck import CellReport, check_cell
from jaxrnn._src.cells import (GRU, LSTM, Cell, CellParams, Elman, IndRNN, LayerNormLSTM,
                               Leaky, LSTMPParams, Outer, PeepholeLSTM, ProjectedLSTM, make_cell)
from jaxrnn._src.diagnostics import Diagnostics, gradient_diagnostics, step_gradients
from jaxrnn._src.generate import sample
from jaxrnn._src.loop import LoopResult, train_loop
from jaxrnn._src.losses import half_sse, mse, xent
from jaxrnn._src.model import RNN, ReadoutParams, RNNParams, State, sequence_mask
from jaxrnn._src.names import CellName, EstimatorName, LossName, Method, ScanMethod
from jaxrnn._src.stack import reverse_sequences
from jaxrnn._src.rtrl import rtrl_loss_and_grad
from jaxrnn._src.scan import layer
from jaxrnn._src.train import (Batch, Metrics, OnlineState, OnlineStep, TrainStep,
                               make_online_step, make_optimizer, make_tbptt_step, make_train_step)

from jaxrnn import estimators  # noqa: E402  (the estimators' namespace: jaxrnn.estimators.X)

__version__ = "0.2.0"

__all__ = [
    # models
    "RNN",
    "RNNParams",
    "ReadoutParams",
    "State",
    "Method",
    "ScanMethod",
    "EstimatorName",
    "LossName",
    "CellName",
    "layer",
    "sequence_mask",
    "reverse_sequences",
    # cells and the Cell contract
    "Cell",
    "CellParams",
    "Outer",
    "check_cell",
    "CellReport",
    "Elman",
    "LSTM",
    "ProjectedLSTM",
    "LSTMPParams",
    "GRU",
    "PeepholeLSTM",
    "LayerNormLSTM",
    "IndRNN",
    "Leaky",
    "make_cell",
    # losses
    "half_sse",
    "mse",
    "xent",
    # gradients and training
    "rtrl_loss_and_grad",
    "Batch",
    "make_train_step",
    "make_tbptt_step",
    "make_online_step",
    "OnlineStep",
    "OnlineState",
    "make_optimizer",
    "TrainStep",
    "Metrics",
    "train_loop",
    "LoopResult",
    # diagnostics and generation
    "gradient_diagnostics",
    "step_gradients",
    "Diagnostics",
    "sample",
    "estimators",
    "__version__",
]
