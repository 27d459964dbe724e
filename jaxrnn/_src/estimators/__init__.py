"""Forward-in-time gradient estimators: exact RTRL and its approximations (see ``base``)."""

from jaxrnn._src.estimators.base import MAX_STATE_ELEMENTS, Cost, Estimator, Trace
from jaxrnn._src.estimators.kf_rtrl import KFRTRL
from jaxrnn._src.estimators.local import RFLO, EProp
from jaxrnn._src.estimators.rtrl import RTRL
from jaxrnn._src.estimators.run import Readout, loss_and_grad, run_chunk
from jaxrnn._src.estimators.snap import SnAp
from jaxrnn._src.estimators.uoro import UORO

# the estimators by their method names (names.EstimatorName, which a test keeps equal)
ESTIMATORS: dict[str, Estimator] = {
    "rtrl": RTRL(), "snap1": SnAp(1), "snap2": SnAp(2), "uoro": UORO(), "kf_rtrl": KFRTRL(),
    "rflo": RFLO(), "eprop": EProp()}


def get_estimator(method) -> Estimator:
    """The estimator for ``method``: a name in ``ESTIMATORS`` or an ``Estimator`` instance.

    Raises:
        ValueError: an unknown name.
    """
    if isinstance(method, Estimator):
        return method
    if method not in ESTIMATORS:
        raise ValueError(f"method must be one of {sorted(ESTIMATORS)}, got {method!r}")
    return ESTIMATORS[method]


def check_model(estimator: Estimator, cell, num_layers: int, bidirectional: bool,
                compute_dtype, layers=None, batch: int | None = None,
                max_elements: int = MAX_STATE_ELEMENTS) -> None:
    """Checks that ``estimator`` runs on this model (and, given ``layers`` and ``batch``, its size).

    The model passes its own fields; nothing here reads an ``RNN``.

    Raises:
        ValueError: one line naming the method: a bidirectional model (the backward
            direction needs the future), a compute dtype, a cell or depth the
            estimator is not defined on, or (given ``layers`` and ``batch``) a state
            and working memory above ``max_elements``, with the estimator's cost.
    """
    name = f"method={estimator.method!r}"
    if bidirectional:
        raise ValueError(f"{name} runs forward in time: bidirectional=True is not supported "
                         f"(the backward direction needs the future); use method='bptt'")
    if compute_dtype is not None:
        raise ValueError(f"{name} computes in the parameters' dtype: compute_dtype="
                         f"{compute_dtype!r} is not supported; use method='bptt'")
    estimator.check(cell, num_layers)
    if layers is None or batch is None:
        return
    cost = estimator.cost(cell, layers, batch)
    if cost.state + cost.work > max_elements:
        raise ValueError(
            f"{name} is too large for this model: its state and working arrays hold "
            f"{cost.state + cost.work:,} elements for B={batch} (limit max_elements="
            f"{max_elements:,}; {cost.formula}). Use method='bptt', or a smaller "
            f"hidden_size or batch")
