"""The names the public API accepts, as ``Literal`` types (one home for each set).

The runtime tuples are derived from these (``scan.METHODS``, ``train.TRAIN_METHODS``);
``cells.CELLS`` and ``losses.LOSSES`` are tables whose keys a test keeps equal to
``CellName`` and ``LossName``. A type checker then rejects a misspelt name
(``method="bpt"``) before the program runs.
"""

from __future__ import annotations

from typing import Literal

# the per-layer gradient methods of the scan (RNN.apply, RNN.loss, layer, make_tbptt_step)
ScanMethod = Literal["bptt", "autodiff"]
# the forward-in-time gradient estimators (jaxrnn.estimators.ESTIMATORS' keys)
EstimatorName = Literal["rtrl", "snap1", "snap2", "uoro", "kf_rtrl", "rflo", "eprop"]
# the whole-loss gradient methods (RNN.loss_and_grad, make_train_step): the scan's and
# the estimators
Method = Literal["bptt", "autodiff", "rtrl", "snap1", "snap2", "uoro", "kf_rtrl", "rflo",
                 "eprop"]
# the losses of jaxrnn._src.losses.LOSSES
LossName = Literal["half_sse", "mse", "xent"]
# the built-in cells of jaxrnn._src.cells.CELLS
CellName = Literal["elman", "lstm", "gru", "indrnn", "peephole_lstm", "layernorm_lstm", "leaky"]
