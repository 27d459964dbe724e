"""jaxrnn: recurrent networks in JAX with a handwritten, reverse-scan BPTT.

The public API::

    model = jaxrnn.RNN(cell="elman", input_size=D, hidden_size=H, output_size=O)
    params = model.init(jax.random.key(0))
    ys, state = model.apply(params, xs)                       # xs (T, B, D) -> ys (T, B, O)
    loss, grads = model.loss_and_grad(params, xs, targets, method="bptt")
"""

from jaxrnn.cells import (GRU, LSTM, Cell, CellParams, Elman, IndRNN, LayerNormLSTM,
                          LSTMPParams, Outer, PeepholeLSTM, ProjectedLSTM, make_cell)
from jaxrnn.cellcheck import CellReport, check_cell
from jaxrnn.losses import half_sse, mse, xent
from jaxrnn.model import RNN, ReadoutParams, RNNParams, reverse_sequences, sequence_mask
from jaxrnn.scan import BackwardTrace, ForwardTrace, backward_scan, forward_scan, layer
from jaxrnn.checkpoint import Checkpointer, CheckpointState
from jaxrnn.diagnostics import Diagnostics, gradient_diagnostics, step_gradients
from jaxrnn.generate import sample
from jaxrnn.rtrl import rtrl_loss_and_grad
from jaxrnn.tasks import ADDING_BASELINE, TASKS, Batch, bits_per_char, make_task, reference_example
from jaxrnn.loop import LoopResult, fit, train_loop
from jaxrnn.train import make_optimizer, make_tbptt_step, make_train_step

__version__ = "0.1.0"

__all__ = [
    "RNN",
    "RNNParams",
    "ReadoutParams",
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
    "make_cell",
    "layer",
    "forward_scan",
    "backward_scan",
    "ForwardTrace",
    "BackwardTrace",
    "sequence_mask",
    "reverse_sequences",
    "half_sse",
    "mse",
    "xent",
    "Batch",
    "reference_example",
    "make_task",
    "TASKS",
    "ADDING_BASELINE",
    "bits_per_char",
    "make_train_step",
    "make_tbptt_step",
    "make_optimizer",
    "train_loop",
    "LoopResult",
    "fit",
    "Checkpointer",
    "CheckpointState",
    "sample",
    "gradient_diagnostics",
    "step_gradients",
    "Diagnostics",
    "rtrl_loss_and_grad",
    "__version__",
]
