"""Forward-in-time gradient estimators: exact RTRL and its approximations, measured.

The research API of temporal credit assignment (docs/estimators.md)::

    loss, grads = model.loss_and_grad(params, xs, targets, method="uoro", key=key)
    online = jaxrnn.make_online_step(model, optax.sgd(0.1), method="snap1", every=1)
    jaxrnn.estimators.estimator_alignment(model, params, xs, targets, "kf_rtrl",
                                          key=key, draws=100)

An estimator is a frozen dataclass with ``init``, ``update``, ``read_out``,
``check`` and ``cost`` (``Estimator``'s docstring); a new one is one module, and
``model.loss_and_grad(method=MyEstimator())`` runs it. ``import jaxrnn.estimators``
imports no more than ``import jaxrnn``.
"""

from jaxrnn._src.assess import DrawAlignment, estimator_alignment, step_alignment
from jaxrnn._src.estimators import ESTIMATORS, get_estimator
from jaxrnn._src.estimators.base import (MAX_STATE_ELEMENTS, Cost, Estimator, Trace, stack_step,
                                         stack_tangent)
from jaxrnn._src.estimators.kf_rtrl import KFRTRL
from jaxrnn._src.estimators.local import RFLO, EProp
from jaxrnn._src.estimators.measure import Alignment, Paired, alignment
from jaxrnn._src.estimators.rtrl import RTRL
from jaxrnn._src.estimators.run import Readout, run_chunk
from jaxrnn._src.estimators.snap import SnAp
from jaxrnn._src.estimators.sparsity import apply_mask, fixed_sparsity, recurrent_mask
from jaxrnn._src.estimators.uoro import UORO

__all__ = [
    # the interface
    "Estimator",
    "Trace",
    "Cost",
    "stack_step",
    "stack_tangent",
    "run_chunk",
    "Readout",
    "ESTIMATORS",
    "get_estimator",
    "MAX_STATE_ELEMENTS",
    # the estimators
    "RTRL",
    "SnAp",
    "UORO",
    "KFRTRL",
    "RFLO",
    "EProp",
    # sparse recurrent weights (SnAp-n)
    "recurrent_mask",
    "apply_mask",
    "fixed_sparsity",
    # measuring
    "Alignment",
    "alignment",
    "Paired",
    "DrawAlignment",
    "estimator_alignment",
    "step_alignment",
]
