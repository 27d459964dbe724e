r"""SnAp: RTRL's sensitivities kept on the sparsity pattern of n steps (Menick et al. 2021).

Menick, Elsen, Evci, Osindero, Simonyan & Graves 2021 (ICLR), "Practical real time
recurrent learning with a sparse approximation", Sec. 3: with RTRL's
:math:`P_t = J_t P_{t-1} + M_t` (their influence matrix :math:`J_t = I_t + D_t
J_{t-1}`), SnAp-n keeps :math:`P_t` only on the entries a parameter reaches within
``n`` steps of the recurrent core, and drops the rest at every step:

.. math::
    P_t = (J_t P_{t-1} + M_t) \odot \mathcal{M}_n, \qquad
    (\mathcal{M}_n)_{(i), (\theta \text{ of unit } u)} =
        [\,i \text{ reachable from } u \text{ in at most } n-1 \text{ steps}\,]

where unit ``u`` owns the parameters of its rows of every gate block
(``w_ih[g*H+u]``, ``w_hh[g*H+u]``, ``b[g*H+u]``; IndRNN's ``u[u]``; the peepholes
``w_peep[:, u]``), and unit ``i`` is reachable from ``u`` in one step when some gate
``g`` has ``w_hh[g*H+i, u] != 0`` (every unit reaches itself). The gradient is read
out online as RTRL's: :math:`\partial L/\partial\theta \approx \sum_t
(\partial\ell_t/\partial h_t)^\top P_t`.

* **SnAp-1** (``SnAp(n=1)``, method ``"snap1"``): a unit's state depends only on its
  own parameters, and only the unit-diagonal of :math:`J_t` matters. Stored
  compactly (``unit_parallel_update``): one tangent per *direction*, a (gate block,
  column) pair of a parameter leaf taken at every unit at once, with the recurrent
  weights cut to their unit diagonal in :math:`J_t` so that the units do not mix;
  :math:`n/H` directions in all. Memory :math:`B (n/H) S`, i.e. :math:`B n` for a
  one-part carry (BPTT's order per step, T-independent); time :math:`O(B G^2 H (D +
  H))` a step, the recurrent term elementwise (``_DiagonalRecurrence``).
* **SnAp-n, n >= 2** (``SnAp(n=2)``, method ``"snap2"``): this implementation stores
  :math:`P` densely, with RTRL's memory :math:`B n S` and cost (n tangents a step),
  and masks it after each update; ``cost`` also reports the entries a sparse
  implementation would hold. With a dense ``w_hh`` every unit reaches every other in
  one step, so SnAp-2 *is* RTRL; give the recurrent weights a fixed sparsity mask
  (``sparsity.recurrent_mask``) for it to differ. The pattern is read from the
  current parameters' zeros at every step.

Defined for one layer of the built-in cells whose units interact only through
``w_hh`` (Elman, leaky, LSTM, GRU, IndRNN, peephole LSTM): ``check`` refuses the
layer-norm LSTM (the normalisation couples the units), the projected LSTM (``w_hr``
mixes them), users' cells (their step may couple the units in any way) and stacks
(SnAp-1 would keep no path from a lower layer's parameters to the top layer's
output, so those layers would get no gradient).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxrnn._src.cells import (GRU, LSTM, Elman, IndRNN, LayerNormLSTM, Leaky, PeepholeLSTM,
                               ProjectedLSTM)
from jaxrnn._src.estimators.base import (Cost, Estimator, hidden_size, num_params, stack_tangent,
                                         state_size, step_flops)
from jaxrnn._src.estimators.rtrl import BLOCK, sensitivity_update, unravel_like

# the built-in cells whose units interact only through w_hh (rows g*H + i: unit i)
UNIT_LOCAL_CELLS = (Elman, Leaky, LSTM, GRU, IndRNN, PeepholeLSTM)


def check_unit_local(cell, num_layers: int, method: str, cells=UNIT_LOCAL_CELLS) -> None:
    """Refuses, with one line, a cell or depth a unit-local estimator is not defined on.

    Args:
        cell: the cell.
        num_layers: the stack's depth.
        method: the method's name, for the message.
        cells: the cell classes it is defined on (exact types: a subclass may change the step).

    Raises:
        ValueError: naming the method and the reason.
    """
    names = ", ".join(c.name for c in cells)
    if isinstance(cell, LayerNormLSTM):
        raise ValueError(f"method={method!r} is not defined for the layernorm_lstm cell: its "
                         f"normalisation couples the units (cells: {names})")
    if isinstance(cell, ProjectedLSTM):
        raise ValueError(f"method={method!r} is not defined for the projected LSTM: w_hr mixes "
                         f"the units (cells: {names})")
    if type(cell) in UNIT_LOCAL_CELLS and type(cell) not in cells:
        raise ValueError(f"method={method!r} is defined for the cells {names} only, got "
                         f"cell {cell.name!r}")
    if type(cell) not in cells:
        raise ValueError(f"method={method!r} is defined for the built-in cells {names} only, got "
                         f"{type(cell).__name__} (a user's step may couple the units)")
    if num_layers != 1:
        raise ValueError(f"method={method!r} is defined for one layer only (it keeps a unit's "
                         f"sensitivity to its own layer's parameters), got num_layers={num_layers}")


# --- the unit layout of the built-in cells' parameters ---------------------------------

def unit_layout(params) -> tuple[np.ndarray, np.ndarray, int]:
    """The unit and the direction of every entry of one layer's parameters, flattened.

    Entry order is ``ravel_pytree``'s (fields in order, each C-order). A leaf
    ``(G*H, K)``: row ``g*H+i`` belongs to unit i, direction ``(g, k)``; a vector
    ``(G*H,)`` (or IndRNN's ``(H,)``): entry ``g*H+i``, unit i, direction g; the
    peepholes ``w_peep (3, H)``: entry ``(r, i)``, unit i, direction r. A direction is
    one entry per unit, the same one of every unit.

    Args:
        params: one layer's parameter NamedTuple (concrete or abstract arrays).

    Returns:
        ``(unit (n,), direction (n,), n_dir)``: static int arrays and the number of
        directions (n / H).
    """
    H = params.w_hh.shape[-1]  # w_hh (G*H, H), or IndRNN's (H,)
    fields = field_directions(params)
    units, dirs = [], []
    for name, offset, _ in fields:
        a = getattr(params, name)
        idx = np.indices(a.shape)
        if name == "w_peep":  # (3, H): row r of unit i
            unit, d = idx[1], idx[0]
        elif a.ndim == 1:  # (G*H,) or IndRNN's (H,): entry g*H + i
            unit, d = idx[0] % H, idx[0] // H
        else:  # (G*H, K): row g*H + i, column k
            unit, d = idx[0] % H, (idx[0] // H) * a.shape[1] + idx[1]
        units.append(unit.ravel())
        dirs.append(d.ravel() + offset)
    return np.concatenate(units), np.concatenate(dirs), sum(n for _, _, n in fields)


def field_directions(params) -> list[tuple[str, int, int]]:
    """``(field, first direction, directions)`` of every array field, in ``unit_layout``'s order."""
    out, offset = [], 0
    H = params.w_hh.shape[-1]  # w_hh (G*H, H), or IndRNN's (H,)
    for name in params._fields:
        a = getattr(params, name)
        if a is None:
            continue
        if name == "w_peep":  # (3, H): one direction per row
            n = a.shape[0]
        else:  # (G*H, K) or (G*H,): one per (gate block, column)
            n = (a.shape[0] // H) * (a.shape[1] if a.ndim == 2 else 1)
        out.append((name, offset, n))
        offset += n
    return out


def direction_params(layer, d: jax.Array):
    """Direction ``d``'s tangent of the input-side parameters, shaped like ``layer``.

    1 on the direction's entry of every unit (row ``g*H+i``, column ``k``), else 0,
    built field by field (``G H K`` elements each, not the n of a flattened one-hot).
    ``w_hh``'s immediate term is formed apart (``immediate_recurrent``): here zero.
    """
    H = layer.w_hh.shape[-1]  # w_hh (G*H, H), or IndRNN's (H,)
    fields = {}
    for name, offset, n in field_directions(layer):
        a = getattr(layer, name)
        j = d - offset  # the direction's index within this field (out of range: none of it)
        if name == "w_hh":
            fields[name] = None  # see immediate_recurrent
        elif name == "w_peep":
            fields[name] = jnp.broadcast_to((jnp.arange(a.shape[0]) == j)[:, None],
                                            a.shape).astype(a.dtype)
        elif a.ndim == 1:  # (G*H,): block g = j
            fields[name] = (jnp.arange(a.shape[0]) // H == j).astype(a.dtype)
        else:  # (G*H, K): block g, column k, with j = g K + k
            K = a.shape[1]
            rows = (jnp.arange(a.shape[0]) // H == j // K) & (j >= 0) & (j < n)
            fields[name] = (rows[:, None] & (jnp.arange(K) == j % K)[None, :]).astype(a.dtype)
    return layer._replace(**fields)


def immediate_recurrent(cell, layer, h_prev: jax.Array) -> jax.Array:
    r"""Every direction's immediate term of the recurrent pre-activation, (n_dir, B, G*H).

    :math:`h_{t-1} \dot W_{hh}^	op` (+ :math:`\dot b_{hh}` where not folded) for the
    direction's one-hot tangent, built from its structure: direction ``(g, k)`` of
    ``w_hh`` puts :math:`h_{t-1}[:, k]` on gate block g (IndRNN's vector ``u``:
    :math:`h_{t-1}` itself); direction g of an unfolded ``b_hh`` puts ones on block g;
    every other direction, zero. (A product with the one-hot would cost B H G H per
    direction: :math:`O(H^3)` a step.)
    """
    B, H = h_prev.shape
    GH = cell.num_gates * H
    blocks = []
    for name, _, n in field_directions(layer):
        if name == "w_hh" and layer.w_hh.ndim == 1:  # IndRNN: d(u h)/du = h
            blocks.append(h_prev[None])
        elif name == "w_hh":  # (g, k): h_prev[:, k] on block g
            G = n // H
            E = jnp.repeat(jnp.eye(G, dtype=h_prev.dtype), H, axis=1)  # (G, G*H) blocks
            blocks.append((E[:, None, None, :] * h_prev.T[None, :, :, None]).reshape(n, B, GH))
        elif name == "b_hh" and not cell.fold_recurrent_bias:  # g: ones on block g
            E = jnp.repeat(jnp.eye(n, dtype=h_prev.dtype), H, axis=1)
            blocks.append(jnp.broadcast_to(E[:, None, :], (n, B, GH)))
        else:
            blocks.append(jnp.zeros((n, B, GH), h_prev.dtype))
    return jnp.concatenate(blocks)


class _DiagonalRecurrence:
    """A built-in cell whose recurrent tangent reads a unit-diagonal ``w_hh``, elementwise.

    ``params.w_hh`` is the diagonal (G*H,) (``w_hh[g*H+i, i]``; IndRNN's ``u``), and
    ``dparams.w_hh`` the direction's immediate term (B, G*H), ready formed.
    """

    def recurrent_tangent(self, params, h_prev, dparams, dh_prev):
        G = params.w_hh.shape[0] // dh_prev.shape[-1]
        return jnp.tile(dh_prev, (1, G)) * params.w_hh + dparams.w_hh  # J's term + M's


@functools.cache
def _diagonal_class(cls: type) -> type:
    return type(f"Diagonal{cls.__name__}", (_DiagonalRecurrence, cls), {})


def diagonal_cell(cell):
    """``cell`` with ``_DiagonalRecurrence``'s recurrent tangent (its options kept)."""
    return _diagonal_class(type(cell))(**{f.name: getattr(cell, f.name)
                                          for f in dataclasses.fields(cell)})


def unit_diagonal(w_hh: jax.Array) -> jax.Array:
    """The unit diagonal of ``w_hh``, ``w_hh[g*H+i, i]``, as a (G*H,) vector (IndRNN's: itself)."""
    if w_hh.ndim == 1:
        return w_hh
    H = w_hh.shape[1]
    return jnp.diagonal(w_hh.reshape(-1, H, H), axis1=1, axis2=2).reshape(-1)


def unit_parallel_update(cell, layer, Pc, trace, recurrent_weights):
    r"""One step of the compact unit-local sensitivities, every direction at once.

    .. math::
        \dot s^{(d)}_t = \tilde J_t \dot s^{(d)}_{t-1} + M_t e_d, \qquad
        \tilde J_t = J_t \text{ with } W_{hh} \to \texttt{recurrent\_weights}(W_{hh})

    The cell's ``tangent_step`` reads ``w_hh`` only in ``recurrent_tangent`` (the
    built-in cells'); here that is ``_DiagonalRecurrence``'s, so :math:`\tilde J_t`'s
    recurrent term is elementwise in the unit-diagonal (or zero) weights and the
    units do not mix: entry i of direction d's tangent is unit i's sensitivity to
    its own entry of direction d. Per direction :math:`O(B G H (D + 1))` multiplies
    (the input side's product with the direction's tangent) and :math:`O(B G H)`
    elementwise work: :math:`O(B G^2 H (D + H))` a step.

    Args:
        cell: a built-in unit-local cell.
        layer: the layer's parameters.
        Pc: the carry's tangents, one per carry part, (n_dir, B, H) each.
        trace: the step's ``Trace``.
        recurrent_weights: ``w_hh -> `` its unit diagonal (G*H,) as :math:`J_t` reads it.

    Returns:
        The updated ``Pc``.
    """
    n_dir = unit_layout(layer)[2]
    cut = layer._replace(w_hh=recurrent_weights(layer.w_hh))  # J_t with the cut recurrence
    diag = diagonal_cell(cell)
    imm = immediate_recurrent(cell, layer, trace.carry_prev[0])  # (n_dir, B, G*H)

    def column(d, p, imm_d):  # P_t e_d = J~_t P_{t-1} e_d + M_t e_d, frozen where ended
        dp = direction_params(layer, d)._replace(w_hh=imm_d)
        (new,) = stack_tangent(diag, (cut,), [trace], (dp,), (p,))
        return tuple(new)

    # directions in blocks of BLOCK, as RTRL's columns
    return jax.lax.map(lambda a: column(*a), (jnp.arange(n_dir), tuple(Pc), imm),
                       batch_size=min(n_dir, BLOCK))


def unit_parallel_read_out(layer, Pc, dh: jax.Array):
    r"""The compact sensitivities' gradient term :math:`(\partial\ell_t/\partial h_t)^\top P_t`.

    Entry j (unit i, direction d) of the gradient is :math:`\sum_b dh_{b,i}\,
    (P_c)_{d,b,i}` over the h part (the loss reaches the state through h only).

    Args:
        layer: the layer's parameters (for the layout).
        Pc: the carry's tangents, (n_dir, B, H) each part.
        dh: the loss's gradient at h_t, (B, H).

    Returns:
        The gradient term, shaped like ``layer``.
    """
    units, dirs, _ = unit_layout(layer)
    per_unit = jnp.einsum("bi,dbi->di", dh, Pc[0])  # (n_dir, H): each unit's own entry
    return unravel_like(layer, per_unit[dirs, units])  # gather entry (d, i) for every parameter


def compact_cost(cell, layers, batch: int, what: str) -> Cost:
    """The compact unit-local state's memory and time (SnAp-1, e-prop, RFLO)."""
    S = state_size(cell, layers)
    layer = layers[0]
    n_dir = unit_layout(layer)[2]
    GH, D = layer.w_ih.shape
    return Cost(state=batch * n_dir * S,
                work=n_dir * batch * GH + min(n_dir, BLOCK) * (GH * (D + 2) + batch * GH),
                flops=n_dir * batch * GH * (D + 4),
                formula=f"state B (n/H) S, work (n/H) B G H; per step n/H = {n_dir} "
                        f"directions of B G H (D + 4): O(B G^2 H (D + H)) ({what})")


# --- SnAp-n's pattern ------------------------------------------------------------------

def reachable(w_hh: jax.Array, steps: int) -> jax.Array:
    """``R (H, H)`` bool: ``R[i, u]`` when unit i is reachable from unit u in <= ``steps`` steps.

    One step: ``A[i, u] = any_g w_hh[g*H+i, u] != 0``, plus the diagonal (IndRNN's
    vector reaches only its own unit).
    """
    H = w_hh.shape[-1]  # w_hh (G*H, H), or IndRNN's (H,)
    eye = jnp.eye(H, dtype=bool)
    if w_hh.ndim == 1:
        return eye
    A = (w_hh.reshape(-1, H, H) != 0).any(0) | eye  # A[i, u]: u feeds i in one step
    R = eye
    for _ in range(min(steps, H - 1)):  # paths longer than H - 1 steps reach nothing new
        R = (A.astype(jnp.float32) @ R.astype(jnp.float32)) > 0  # one more step: A R
    return R


def _kept_entries(cell, layers, n: int) -> str:
    """A sparse SnAp-n's kept entries, from the concrete ``w_hh`` (or a note when abstract)."""
    layer = layers[0]
    if isinstance(layer.w_hh, jax.core.Tracer):
        return "kept entries: not known under tracing"
    units, _, _ = unit_layout(layer)
    R = np.asarray(reachable(jnp.asarray(layer.w_hh), n - 1))
    kept = int(R.sum(0)[units].sum()) * len(cell.state_sizes(hidden_size(cell, layer)))
    return f"a sparse implementation keeps B x {kept} entries"


@dataclasses.dataclass(frozen=True)
class SnAp(Estimator):
    r"""SnAp-n (Menick et al. 2021): :math:`P_t = (J_t P_{t-1} + M_t) \odot \mathcal{M}_n`.

    ``n = 1`` (method ``"snap1"``): the compact form of the module docstring, unit i's
    sensitivity to its own parameters only,

    .. math::
        (P_t)_{i,\theta_i} = \tilde J^{(ii)}_t (P_{t-1})_{i,\theta_i} + (M_t)_{i,\theta_i},

    :math:`\tilde J^{(ii)}_t` the unit's own block of :math:`J_t` (its carry parts,
    ``w_hh`` cut to its unit diagonal). Memory :math:`B (n/H) S`; per step
    :math:`n/H` directions of :math:`B G H (D + 4)` multiplies, :math:`O(B G^2 H (D +
    H))`: BPTT's order per step (``unit_parallel_update``).

    ``n >= 2`` (method ``"snap2"`` for n = 2): RTRL's dense update (``rtrl``) masked to
    the units reachable within n - 1 steps of ``w_hh``'s nonzeros, read from the
    current parameters. Memory :math:`B n S` (dense, as RTRL), per step n tangents,
    :math:`2 n B G H (D + H)` multiplies; ``cost`` states the kept entries too.
    With ``n >= H`` every reachable unit is kept: RTRL exactly.

    Args:
        n: the number of steps of the pattern, >= 1.
    """

    n: int = 1

    name: ClassVar[str] = "snap"

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SnAp's n must be an integer >= 1, got {self.n!r}")

    @property
    def method(self) -> str:
        """The method's name: ``"snap1"``, ``"snap2"``, ... ."""
        return f"snap{self.n}"

    def check(self, cell, num_layers):
        check_unit_local(cell, num_layers, self.method)

    def init(self, cell, layers, carries0, key):
        (layer,), (carry,) = layers, carries0
        rows = unit_layout(layer)[2] if self.n == 1 else num_params(layers)
        return (tuple(jnp.zeros((rows,) + c.shape, c.dtype) for c in carry),)

    def update(self, cell, layers, state, traces, key):
        (layer,), (P,), (trace,) = layers, state, traces
        if self.n == 1:  # the compact form: J cut to the unit diagonal
            return (unit_parallel_update(cell, layer, P, trace, unit_diagonal),)
        (P,) = sensitivity_update(cell, layers, state, traces, True)  # J_t P_{t-1} + M_t
        units, _, _ = unit_layout(layer)
        R = reachable(layer.w_hh, self.n - 1)  # R[i, u]: u reaches i within n - 1 steps
        keep = R[:, units].T[:, None, :].astype(P[0].dtype)  # (n, 1, H): parameter j's unit
        return (tuple(p * keep for p in P),)  # (J P + M) masked to SnAp-n's pattern

    def read_out(self, cell, layers, state, dh, dy, readout_weight):
        (layer,), (P,) = layers, state
        if self.n == 1:
            return (unit_parallel_read_out(layer, P, dh),)
        return unravel_like(layers, jnp.einsum("bi,nbi->n", dh, P[0]))  # dl_t/dh_t^T P_t

    def cost(self, cell, layers, batch):
        if self.n == 1:
            return compact_cost(cell, layers, batch, "SnAp-1")
        n, S = num_params(layers), state_size(cell, layers)
        return Cost(state=batch * n * S, work=min(n, BLOCK) * n + batch * n * S,
                    flops=n * step_flops(cell, layers, batch),
                    formula=f"state B n S, dense as RTRL's ({_kept_entries(cell, layers, self.n)}),"
                            f" work ({BLOCK} + B S) n; per step n tangents of the layer")
