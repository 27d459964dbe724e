"""Forward-in-time gradient estimators: exact RTRL and its approximations (see ``base``)."""

from jaxrnn._src.estimators.base import MAX_STATE_ELEMENTS, Cost, Estimator, Trace
from jaxrnn._src.estimators.rtrl import RTRL
from jaxrnn._src.estimators.run import Readout, loss_and_grad, run_chunk

# the estimators by their method names (names.EstimatorName, which a test keeps equal)
ESTIMATORS: dict[str, Estimator] = {"rtrl": RTRL()}


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
