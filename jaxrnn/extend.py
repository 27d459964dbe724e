"""Lower-level pieces for the run application, the lab and advanced users.

As ``jax.extend`` is to ``jax``: the building blocks below the public API
(``jaxrnn.__all__``), for code that composes its own training or measures the
library's parts. ``import jaxrnn.extend`` imports no more than ``import jaxrnn``.
These names may change between 0.x releases (see ``CHANGELOG.md``).
"""

from jaxrnn._src.cells import CELLS, Carry, gate_blocks, gate_constants, split_gates
from jaxrnn._src.model import loss_fn
from jaxrnn._src.rtrl import MAX_SENSITIVITY_ELEMENTS, check_model, sensitivity_size
from jaxrnn._src.scan import (METHODS, BackwardTrace, BufferPlan, ForwardTrace, backward_plan,
                              backward_scan, forward_scan, lean_bptt_layer, project_inputs,
                              sum_outer, tangent_scan)
from jaxrnn._src.validation import check_compute_dtype
from jaxrnn._src.train import (TRAIN_METHODS, StepFn, check_train_options, check_truncation,
                               clip_recurrent, truncation_windows)

__all__ = [
    # cells
    "CELLS",
    "Carry",
    "split_gates",
    "gate_blocks",
    "gate_constants",
    # scans
    "METHODS",
    "forward_scan",
    "backward_scan",
    "tangent_scan",
    "ForwardTrace",
    "BackwardTrace",
    "project_inputs",
    "lean_bptt_layer",
    "sum_outer",
    "BufferPlan",
    "backward_plan",
    # model and training
    "loss_fn",
    "TRAIN_METHODS",
    "StepFn",
    "check_train_options",
    "check_truncation",
    "check_compute_dtype",
    "clip_recurrent",
    "truncation_windows",
    # RTRL
    "MAX_SENSITIVITY_ELEMENTS",
    "check_model",
    "sensitivity_size",
]
