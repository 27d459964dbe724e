"""The scans' backend-specific formulations, chosen in one place.

Two rewrites in ``scan.py`` were measured faster on XLA:CPU only. Each is a pure
reformulation (the same values, and on CPU bit for bit the ops the library has
always run); which one a trace uses is decided here, by backend, and nowhere else.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Formulation:
    """Which of the scans' CPU-measured rewrites to use (frozen, hashable).

    Attributes:
        transposed_w_hh: the forward loop reads ``w_hh`` from a row-major
            ``(H, G*H)`` copy made once before the loop behind a
            ``jax.lax.optimization_barrier`` (``scan._loop_params``), instead of
            PyTorch's ``(G*H, H)`` read transposed at every step.
        explicit_outer_transposes: the weight-gradient products
            ``sum_t dg_t^T a_t`` make both transposes explicit, each behind an
            ``optimization_barrier`` (``scan.sum_outer``), instead of leaving the
            product's layout to XLA.
    """

    transposed_w_hh: bool
    explicit_outer_transposes: bool


# Both rewrites, as measured on XLA:CPU (docs/performance.md#formulations; the
# measurements: jaxrnn_lab/perf/step_formulations.py, variants ``w_hh_in_loop`` and
# ``folded_sum_outer``, and jaxrnn_lab/perf/weight_gradient.py):
# * transposed_w_hh: XLA:CPU runs the in-loop ``h @ W`` faster with W stored
#   row-major, 10-17 us less per step of an LSTM forward scan at B=32, H=128;
# * explicit_outer_transposes: left to itself, XLA folds the transposes into the
#   product's dimension numbers and XLA:CPU then runs it on its generic Eigen kernel
#   instead of YNNPACK, 1.6-2.7x slower for an LSTM's dW_ih and dW_hh at T=100,
#   B=32, H=128.
CPU = Formulation(transposed_w_hh=True, explicit_outer_transposes=True)
# The plain formulation: PyTorch's layout as it is, and the products' layout left to
# XLA. GPU and TPU were never measured to benefit from either rewrite (their
# compilers choose the layout of a product themselves), so they get this one.
PLAIN = Formulation(transposed_w_hh=False, explicit_outer_transposes=False)


def formulation(backend: str) -> Formulation:
    """The formulation the scans use on ``backend``.

    The scans call it at trace time with ``jax.default_backend()``: a computation
    placed explicitly on a device of another backend gets the default backend's
    formulation, which is correct everywhere and only possibly slower there.

    Args:
        backend: a JAX platform name, as ``jax.default_backend()`` gives it
            (``"cpu"``, ``"gpu"``, ``"tpu"``, ...).

    Returns:
        ``CPU`` (both rewrites, measured there) for ``"cpu"``, else ``PLAIN``.
    """
    return CPU if backend == "cpu" else PLAIN
