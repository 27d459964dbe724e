r"""Local learning rules with eligibility traces: e-prop (Bellec et al. 2020), RFLO (Murray 2019).

Both keep, per unit, an *eligibility trace*: the sensitivity of the unit's state to
its own parameters through the unit's internal dynamics only, the influence of
:math:`h_{t-1}` through the recurrent weights dropped:

.. math::
    e_t = \tilde J_t\, e_{t-1} + M_t, \qquad
    \tilde J_t = \frac{\partial s_t}{\partial s_{t-1}}\Big|_{W_{hh} = 0}, \qquad
    \frac{\partial L}{\partial \theta_{i\cdot}} \approx \sum_t L_{t,i}\, e_{t, i\cdot}

with :math:`M_t` the immediate influence (as RTRL's) and :math:`L_t` the *learning
signal*: :math:`\partial\ell_t/\partial h_t` through the true readout
(:math:`\delta y_t W`, symmetric feedback) or through a fixed random matrix
(:math:`\delta y_t B`, random feedback). The trace is SnAp-1's compact state
(``snap.unit_parallel_update``) with :math:`\tilde J_t` in place of the unit-diagonal
:math:`J_t`: memory :math:`B (n/H) S`, per step :math:`n/H` tangents of the layer.

* **e-prop** (Bellec, Scherr, Subramoney, Hajek, Salaj, Legenstein & Maass 2020,
  Nat. Commun. 11:3625, "A solution to the learning dilemma for recurrent networks
  of spiking neurons"): their eligibility vector :math:`\epsilon^t_{ji} =
  \frac{\partial h^t_j}{\partial h^{t-1}_j}\epsilon^{t-1}_{ji} + \frac{\partial
  h^t_j}{\partial W_{ji}}` follows the neuron's hidden state (here the carry: the
  leak of the leaky cell, an LSTM's :math:`c_t`, a GRU's :math:`z \odot h_{t-1}`),
  never its output's path through the recurrent weights (self-connections included:
  IndRNN's :math:`u` is cut from :math:`\tilde J_t` too), and the eligibility trace
  :math:`e^t_{ji} = \frac{\partial z^t_j}{\partial h^t_j}\epsilon^t_{ji}` is its
  image at the output. Symmetric e-prop (the default) or random e-prop.
* **RFLO** (Murray 2019, eLife 8:e43299, "Local online learning in recurrent
  networks with random feedback"), for the leaky RNN
  :math:`h_t = (1-\alpha) h_{t-1} + \alpha\phi(a_t)` and Elman's
  (:math:`\alpha = 1`): the trace of weight :math:`W_{ij}` (inputs
  :math:`z_t = [x_t, h_{t-1}, 1]`)

  .. math::
      B_{t,ij} = (1-\alpha)\, B_{t-1,ij} + \alpha\, \phi'(a_{t,i})\, z_{t,j}, \qquad
      \Delta W_{ij} \propto \textstyle\sum_t (\delta y_t B^{\mathrm{fb}})_i\, B_{t,ij},

  which is e-prop's trace on these cells; the feedback is random by default
  (Murray's). Marschall et al.'s ``RFLO`` (omarschall/vanilla-rtrl,
  ``learning_algorithms/RFLO.py``, the same trace) uses the readout :math:`W_{out}`
  unless given a ``W_FB``: ``RFLO(feedback="symmetric")`` is their default.

The random feedback :math:`B^{\mathrm{fb}}` (O, H) is drawn from the estimator's
key at ``init``, uniform in :math:`\pm 1/\sqrt{H}` as the readout's own
initialisation (``RNN.init``), and fixed for the run; the state keeps its key (the
output size is known only at the read-out).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jaxrnn._src.cells import Elman, Leaky
from jaxrnn._src.estimators.base import Estimator
from jaxrnn._src.estimators.snap import (check_unit_local, compact_cost, unit_layout,
                                         unit_parallel_read_out, unit_parallel_update)

FEEDBACKS = ("symmetric", "random")


class TraceState(NamedTuple):
    """The eligibility traces and the random feedback's key."""

    traces: tuple  # one layer's carry parts, (n/H, B, H) each: every direction's trace
    feedback_key: Any  # the key data of the random feedback (uint32), or None (symmetric)


def feedback_matrix(key_data: jax.Array, shape: tuple[int, int], dtype) -> jax.Array:
    """The fixed random feedback ``B (O, H)``: uniform in ±1/sqrt(H), as the readout's init.

    Args:
        key_data: the key's data (``jax.random.key_data``), as ``TraceState`` keeps it.
        shape: ``(O, H)``, the readout weight's shape.
        dtype: its dtype.
    """
    bound = 1.0 / math.sqrt(shape[1])
    return jax.random.uniform(jax.random.wrap_key_data(key_data), shape, dtype, -bound, bound)


def _zero_recurrence(w_hh: jax.Array) -> jax.Array:
    """The recurrent weights' unit diagonal as the trace's Jacobian sees it: zero, (G*H,)."""
    return jnp.zeros(w_hh.shape[:1], w_hh.dtype)


@dataclasses.dataclass(frozen=True)
class EProp(Estimator):
    r"""e-prop (Bellec et al. 2020): eligibility traces times a learning signal.

    .. math::
        e_t = \tilde J_t e_{t-1} + M_t, \qquad
        g \mathrel{+}= L_t^\top e_t, \qquad
        L_t = \delta y_t W \ (\text{symmetric}) \text{ or } \delta y_t B^{\mathrm{fb}}
            \ (\text{random})

    :math:`\tilde J_t` the step's Jacobian with the recurrent weights zeroed (the
    unit's internal dynamics only), per unit and parameter of that unit. Memory
    :math:`B (n/H) S` (:math:`S = H` or :math:`2H` per example: the trace of each
    carry part); per step :math:`n/H` directions of :math:`B G H (D + 4)`
    multiplies, :math:`O(B G^2 H (D + H))` (``snap.unit_parallel_update``).
    One layer of the cells ``snap.UNIT_LOCAL_CELLS``.

    Args:
        feedback: ``"symmetric"`` (the readout's W) or ``"random"`` (a fixed random B).
    """

    feedback: str = "symmetric"

    name: ClassVar[str] = "eprop"
    cells: ClassVar[tuple] = ()  # empty: snap.UNIT_LOCAL_CELLS

    def __post_init__(self):
        if self.feedback not in FEEDBACKS:
            raise ValueError(f"{type(self).__name__}'s feedback must be one of {FEEDBACKS}, "
                             f"got {self.feedback!r}")

    @property
    def stochastic(self) -> bool:  # draws B at init: needs a key
        return self.feedback == "random"

    def check(self, cell, num_layers):
        if self.cells:
            check_unit_local(cell, num_layers, self.name, self.cells)
        else:
            check_unit_local(cell, num_layers, self.name)

    def init(self, cell, layers, carries0, key):
        if self.feedback == "random" and key is None:
            raise ValueError(f"method={self.name!r} with feedback='random' draws its feedback "
                             f"matrix: it needs a key (key=...)")
        (layer,), (carry,) = layers, carries0
        n_dir = unit_layout(layer)[2]
        traces = tuple(jnp.zeros((n_dir,) + c.shape, c.dtype) for c in carry)  # e_0 = 0
        if self.feedback == "symmetric":
            return TraceState(traces, None)
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)  # a raw uint32 key
        return TraceState(traces, jax.random.key_data(key))

    def update(self, cell, layers, state, traces, key):
        (layer,), (trace,) = layers, traces
        # e_t = J~_t e_{t-1} + M_t: J_t with W_hh = 0 (the unit's own dynamics)
        return state._replace(traces=unit_parallel_update(cell, layer, state.traces, trace,
                                                          _zero_recurrence))

    def read_out(self, cell, layers, state, dh, dy, readout_weight):
        if self.feedback == "random":
            B = feedback_matrix(state.feedback_key, readout_weight.shape, readout_weight.dtype)
            dh = dy @ B  # L_t = dy_t B: the learning signal through the random feedback
        # else L_t = dh_t = dy_t W, the driver's (through the true readout)
        return (unit_parallel_read_out(layers[0], state.traces, dh),)  # L_t^T e_t

    def cost(self, cell, layers, batch):
        return compact_cost(cell, layers, batch, f"{self.name}, {self.feedback} feedback")


@dataclasses.dataclass(frozen=True)
class RFLO(EProp):
    r"""RFLO (Murray 2019): :math:`B_t = (1-\alpha) B_{t-1} + \alpha\,\phi'(a_t) z_t^\top`.

    The leaky and Elman cells (:math:`\alpha = 1`) only, one layer; the gradient
    :math:`\sum_t (\delta y_t B^{\mathrm{fb}})_i B_{t,ij}` with Murray's random
    feedback by default (``feedback="symmetric"``: Marschall et al.'s default, the
    readout's W). On these cells it is e-prop's trace (``EProp``); memory
    :math:`B H (D + H + 2)` (one column per weight input, one per bias vector), per
    step :math:`D + H + 2` tangents of the layer.

    Args:
        feedback: ``"random"`` (default) or ``"symmetric"``.
    """

    feedback: str = "random"

    name: ClassVar[str] = "rflo"
    cells: ClassVar[tuple] = (Elman, Leaky)
