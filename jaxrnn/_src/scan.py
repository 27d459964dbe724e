r"""One recurrent layer over a sequence: the forward ``lax.scan`` and the handwritten BPTT.

Forward, for any cell (time-major, ``xs (T, B, D)``):

.. math::
    xp_t = W_{ih} x_t + b_{ih} \quad (\text{all } t \text{ in one matrix product}), \qquad
    (carry_t, res_t) = \mathrm{step}(carry_{t-1}, xp_t)

Backward (BPTT) is a *reverse* ``lax.scan`` that carries only the recurrence:

.. math::
    \delta carry_t = \Big(\frac{\partial L}{\partial h_t} + \texttt{dh\_next}, \ldots\Big), \qquad
    (\delta carry_{t-1}, \delta gi_t, \delta gh_t) = \mathrm{backward\_step}(\delta carry_t)

and the weight gradients are summed over the steps *after* the loop, each as one
matrix product over all ``T*B`` rows:

.. math::
    \frac{\partial L}{\partial W_{ih}} = \sum_t \delta gi_t^\top x_t, \quad
    \frac{\partial L}{\partial W_{hh}} = \sum_t \delta gh_t^\top h_{t-1}, \quad
    \frac{\partial L}{\partial x_t} = \delta gi_t W_{ih}.

``layer(..., method="bptt")`` wires this backward pass into JAX with
``jax.custom_vjp``, so ``jax.grad`` of any loss built on the layer uses it;
``method="autodiff"`` lets ``jax.grad`` differentiate the very same forward scan.

Variable lengths: with a boolean ``mask (T, B)``, a step where ``mask`` is False
leaves the carry unchanged and outputs zeros; in the backward pass it passes the
carry's cotangent through unchanged and contributes nothing to any gradient.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from functools import partial
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

from jaxrnn._src import hiscan, validation
from jaxrnn._src.cells import Carry, Cell, CellParams, Outer
from jaxrnn._src.formulation import Formulation, formulation
from jaxrnn._src.losses import zero_masked
from jaxrnn._src.names import ScanMethod

METHODS: tuple[ScanMethod, ...] = get_args(ScanMethod)  # ("bptt", "autodiff")

# Steps per iteration of the forward and the reverse scan's loops (``lax.scan``'s
# ``unroll``). 1: unrolling measured slower for every cell and grid point, up to 20x
# for the gated cells' bptt, whose buffers are then copied instead of updated in place
# (docs/experiments/step_formulations/unroll).
UNROLL = 1

DgiOver = Literal["dhs", "residual", "output"]  # where the reverse scan writes dgi


class ForwardTrace(NamedTuple):
    """What the forward scan keeps for the backward pass."""

    carries: Carry  # each (T, B, H): the carry after every step (frozen where masked)
    residuals: object  # cell-specific per-step residuals, leading axis T


class BackwardTrace(NamedTuple):
    """Per-step quantities of the reverse scan, for teaching and diagnostics."""

    dh: jax.Array  # (T, B, H): total dL/dh_t (the loss's term plus dh_next)
    dgi: jax.Array  # (T, B, G*H): dL/d(input pre-activation); ``da_t`` for Elman
    dgh: jax.Array  # (T, B, G*H): dL/d(recurrent pre-activation)
    dh_next: jax.Array  # (T, B, H): dL/dh_{t-1}, what step t passes back to step t-1
    # the cell's own per-step parameter terms (backward_step's fourth value), stacked
    # over T: {field: (T, B) + shape, or Outer((T, B, M), (T, B, K))}; {} for none
    dextra: dict = {}


def project_inputs(cell: Cell, params: CellParams, xs: jax.Array) -> jax.Array:
    """The input projection for all steps at once.

    Args:
        cell: the cell.
        params: its parameters.
        xs: inputs, (T, B, D).

    Returns:
        ``xs @ W_ih^T + b_ih`` (plus ``b_hh`` when the cell folds it), (T, B, G*H).
    """
    xp = xs @ params.w_ih.T
    bias = input_bias(cell, params)
    return xp if bias is None else xp + bias


def step_layer(cell: Cell, params: CellParams, carry: Carry, x_t: jax.Array,
               compute_dtype=None) -> Carry:
    """One step of one layer on a raw input ``x_t (B, D)``: the next carry, as the scan's step.

    The input projection, the cell's step and the carry's dtype follow
    ``forward_scan`` (``compute_dtype`` included): ``RNN.step`` runs it per layer.
    """
    params, x_t = in_compute_dtype((params, x_t), compute_dtype)
    new_carry, _ = cell.step(params, carry, project_inputs(cell, params, x_t))
    return _in_carry_dtype(new_carry, carry)


def input_bias(cell: Cell, params: CellParams) -> jax.Array | None:
    """``b_ih`` (plus ``b_hh`` when the cell folds it), (G*H,), or None without bias."""
    bias = params.b_ih
    if params.b_hh is not None and cell.fold_recurrent_bias:
        bias = params.b_hh if bias is None else bias + params.b_hh
    return bias


def _select(m: jax.Array | None, new, old):
    """``new`` where the (B,) mask ``m`` is True, else ``old`` (leaf-wise)."""
    if m is None:
        return new
    return jax.tree.map(lambda a, b: jnp.where(m[:, None], a, b), new, old)


def in_compute_dtype(tree, compute_dtype):
    """``tree``'s floating leaves in ``compute_dtype``: the one home of the mixed-precision cast.

    ``None`` (the default) leaves ``tree`` as it is, so a layer without a compute dtype
    traces exactly as before. The forward scan casts the parameters and the inputs
    with it; the reverse scan casts the parameters it multiplies by; the carry keeps
    its own dtype (``_in_carry_dtype``).
    """
    if compute_dtype is None:
        return tree

    def cast(a):
        if a is None or not jnp.issubdtype(a.dtype, jnp.floating) or a.dtype == compute_dtype:
            return a
        return a.astype(compute_dtype)

    return jax.tree.map(cast, tree)


def _in_carry_dtype(new, carry):
    """The step's new carry in the carry's dtypes (a no-op unless a compute dtype narrows it)."""
    return jax.tree.map(lambda n, c: n if n.dtype == c.dtype else n.astype(c.dtype), new, carry)


def _formulation() -> Formulation:
    """The formulation of the backend being traced for: ``jax.default_backend()``'s."""
    return formulation(jax.default_backend())


def _loop_params(params: CellParams):
    """``params`` as the loop body sees them: ``w_hh`` read from a row-major transpose.

    With the backend's ``transposed_w_hh`` (CPU, ``formulation.py``; otherwise the
    params as they are). XLA:CPU runs the in-loop product faster as ``h @ W`` with
    ``W (H, G*H)`` stored row-major than as ``h @ w_hh.T`` with PyTorch's
    ``w_hh (G*H, H)``. So the
    transpose is made once, before the loop, behind an ``optimization_barrier`` (XLA
    would otherwise fold the two transposes away), and the body's ``w_hh`` is that
    copy transposed back: XLA folds this second transpose into the product's
    dimension numbers, so a cell's ``h @ w_hh.T`` reads the row-major copy. The cell
    sees the values and the shape its contract documents. Measured on an LSTM
    forward scan, B=32, H=128: 10-17 us less per step (docs/experiments/step_formulations).

    Returns:
        A function of no arguments, called inside the loop body, giving the params.
    """
    w_hh = getattr(params, "w_hh", None)
    if not _formulation().transposed_w_hh:
        return lambda: params  # PyTorch's layout, the product's layout left to XLA
    if not isinstance(w_hh, jax.Array) or w_hh.ndim != 2:
        return lambda: params  # a recurrent weight that is not a matrix: as it is
    w_t = jax.lax.optimization_barrier(w_hh.T)  # (H, G*H): one copy per call, not per step
    return lambda: params._replace(w_hh=w_t.T)


def _inplace_index(residuals, shape, dtype) -> int | None:
    """Index of the first residual leaf shaped like one step of the input projection.

    That leaf is stored over the input projection's own (T, B, G*H) buffer, whose
    step t is dead once read: no second buffer of that size is allocated, nor
    zero-filled as ``lax.scan`` fills every stacked output before its loop (measured:
    a tenth of an LSTM forward scan at T=100, B=128, H=512). XLA updates the buffer
    in place when the stored leaf is an elementwise function of ``xp_t``, as in the
    built-in gated cells; otherwise it copies the whole buffer at every step (correct,
    but quadratic in T), which is why a cell opts in with ``Cell.residual_over_input``.
    ``residuals`` holds shapes (from ``jax.eval_shape``).
    """
    return _first_leaf_like(residuals, shape, dtype)


def _first_leaf_like(tree, shape, dtype) -> int | None:
    """Index of the first leaf of ``tree`` with ``shape`` and ``dtype``, or None."""
    for k, leaf in enumerate(jax.tree.leaves(tree)):
        if tuple(leaf.shape) == tuple(shape) and leaf.dtype == dtype:
            return k
    return None


def _shape_str(x) -> str:
    return str(tuple(x.shape)) if hasattr(x, "shape") else type(x).__name__


def _check_like(what: str, got, expected) -> None:
    """Raises a ValueError naming ``what`` unless ``got`` has ``expected``'s structure and shapes."""
    got_l, got_t = jax.tree.flatten(got)
    exp_l, exp_t = jax.tree.flatten(expected)
    if got_t != exp_t:
        raise ValueError(f"{what} must have the structure {exp_t}, got {got_t}")
    for k, (g, e) in enumerate(zip(got_l, exp_l)):
        if tuple(g.shape) != tuple(e.shape):
            part = f"{what}[{k}]" if len(exp_l) > 1 else what
            raise ValueError(f"{part} must have shape {tuple(e.shape)}, got shape {tuple(g.shape)}")


def check_step(cell: Cell, carry, xp, out) -> None:
    """Checks ``cell.step``'s output (shapes, from ``jax.eval_shape``) against its inputs.

    Raises:
        ValueError: naming the output, the expected and the actual structure or shape.
    """
    name = type(cell).__name__
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(f"{name}.step must return a pair (carry, residuals), got "
                         f"{type(out).__name__}" + (f" of length {len(out)}"
                                                    if isinstance(out, tuple) else ""))
    _check_like(f"{name}.step's carry", out[0], carry)
    for leaf in jax.tree.leaves(out[1]):
        if leaf.ndim == 0 or leaf.shape[0] != xp.shape[0]:
            raise ValueError(f"{name}.step's residuals must have a leading batch axis of "
                             f"size B={xp.shape[0]}, got a leaf of shape {tuple(leaf.shape)}")


def param_fields(params) -> tuple[str, ...]:
    if not (isinstance(params, tuple) and hasattr(params, "_fields")):
        raise ValueError(f"a cell's params must be a NamedTuple with fields w_ih, w_hh, b_ih, "
                         f"b_hh, got {type(params).__name__}")
    missing = [f for f in ("w_ih", "w_hh", "b_ih", "b_hh") if f not in params._fields]
    if missing:
        raise ValueError(f"a cell's params must have the fields w_ih, w_hh, b_ih, b_hh; "
                         f"{type(params).__name__} lacks {missing}")
    return params._fields


def check_backward_step(cell: Cell, params, carry, xp, out) -> dict:
    """Checks ``cell.backward_step``'s output (shapes) against the step's carry and ``xp``.

    Returns:
        The fourth value (``{field: per-step gradient}``), ``{}`` when there is none.

    Raises:
        ValueError: naming the output, the expected and the actual structure or shape.
    """
    name = type(cell).__name__
    if not (isinstance(out, tuple) and len(out) in (3, 4)):
        raise ValueError(f"{name}.backward_step must return (dcarry_prev, dgi, dgh) or "
                         f"(dcarry_prev, dgi, dgh, dparams), got {type(out).__name__}"
                         + (f" of length {len(out)}" if isinstance(out, tuple) else ""))
    _check_like(f"{name}.backward_step's dcarry_prev", out[0], carry)
    for k, what in ((1, "dgi"), (2, "dgh")):
        if not hasattr(out[k], "shape") or tuple(out[k].shape) != tuple(xp.shape):
            raise ValueError(f"{name}.backward_step's {what} must have shape {tuple(xp.shape)} "
                             f"(B, G*H), got shape {_shape_str(out[k])}")
    extra = out[3] if len(out) == 4 else {}
    if not isinstance(extra, dict):
        raise ValueError(f"{name}.backward_step's fourth value must be a dict "
                         f"{{field: gradient}}, got {type(extra).__name__}")
    fields = param_fields(params)
    B = xp.shape[0]
    for f, v in extra.items():
        if f not in fields or getattr(params, f) is None:
            raise ValueError(f"{name}.backward_step's dparams names {f!r}, which is not an "
                             f"array field of {type(params).__name__} {fields}")
        shape = tuple(getattr(params, f).shape)
        if isinstance(v, Outer):
            if len(shape) != 2 or tuple(v.dg.shape) != (B, shape[0]) or tuple(
                    v.a.shape) != (B, shape[1]):
                raise ValueError(f"{name}.backward_step's dparams[{f!r}] = Outer(dg, a) must "
                                 f"have dg (B, M) and a (B, K) for the ({shape}) parameter, "
                                 f"got dg {_shape_str(v.dg)} and a {_shape_str(v.a)}")
        elif not hasattr(v, "shape") or tuple(v.shape) != (B,) + shape:
            raise ValueError(f"{name}.backward_step's dparams[{f!r}] must have shape "
                             f"{(B,) + shape} (one term per example), got shape {_shape_str(v)}")
    return extra


# --- varying manual axes (``jax.shard_map``): where a value differs between shards ---------

def _varying(leaf) -> frozenset:
    """The mesh axes ``leaf`` varies over: ``jax.typeof(leaf).manual_axis_type.varying``.

    (JAX 0.10 removed the former spelling ``jax.typeof(leaf).vma``.) Inside
    ``jax.shard_map`` (with its default ``check_vma=True``), a value sharded over an
    axis, or computed from one, *varies* over it; a replicated one does not.
    Outside ``shard_map`` the set is empty.
    """
    return frozenset(jax.typeof(leaf).manual_axis_type.varying)


def varying_axes(*trees) -> frozenset:
    """The mesh axes any leaf of ``trees`` varies over (empty outside ``shard_map``)."""
    return frozenset().union(*(_varying(leaf) for leaf in jax.tree.leaves(trees)))


def vary(tree, axes: frozenset):
    """``tree`` with every leaf cast to vary over ``axes`` (``jax.lax.pcast(..., to="varying")``).

    A leaf already varying over all of ``axes`` is returned as it is, so outside
    ``shard_map`` (``axes`` empty) this adds nothing to the program. JAX transposes
    the cast into a ``psum`` over the axes it added.
    """
    def cast(leaf):
        missing = tuple(sorted(axes - _varying(leaf), key=str))
        return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree.map(cast, tree)


def _initial_carry(carry0: Carry, params, xs: jax.Array, mask) -> Carry:
    """``carry0`` varying wherever the layer's inputs vary.

    A carry after one step varies where ``params``, ``xs`` or ``mask`` do, and
    ``lax.scan`` wants its carry's type unchanged by the step: a zero state built
    with ``jnp.zeros`` (replicated) is cast to vary over the inputs' axes.
    """
    return vary(carry0, varying_axes(params, xs, mask))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _PrimalAxes:
    """A static residual: where each leaf of each primal argument varies, and its dtype."""

    axes: tuple  # per primal argument, a tuple of frozensets, one per array leaf
    dtypes: tuple  # per primal argument, a tuple of dtypes, one per array leaf


def _primal_axes(*primals) -> _PrimalAxes:
    """Records, at forward time, where every leaf of ``primals`` varies (``_varying``)
    and its dtype."""
    return _PrimalAxes(tuple(tuple(_varying(leaf) for leaf in jax.tree.leaves(p))
                             for p in primals),
                       tuple(tuple(jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(p))
                             for p in primals))


def _cast_to_primals(cotangents: tuple, recorded: _PrimalAxes) -> tuple:
    """Each cotangent in its primal's dtype, as ``jax.grad`` returns it.

    The backward pass computes in the dtype the forward pass computed in, the
    parameters': a narrower input's gradient (bfloat16 ``xs``, float32 parameters)
    comes out of ``dgi @ W_ih`` in float32 and is rounded to the input's dtype, as
    JAX's transpose of the promotion does. A cotangent already in its primal's dtype
    is returned as it is.
    """
    def cast(ct, dtype):
        return ct if ct.dtype == dtype else ct.astype(dtype)

    out = []
    for ct, dtypes in zip(cotangents, recorded.dtypes):
        leaves, treedef = jax.tree.flatten(ct)
        out.append(jax.tree.unflatten(treedef, [cast(c, d) for c, d in zip(leaves, dtypes)]))
    return tuple(out)


def _sum_over_replicas(cotangents: tuple, recorded: _PrimalAxes) -> tuple:
    """Each cotangent summed over the mesh axes it varies on and its primal does not.

    The handwritten backward pass computes, say, ``dW_ih`` from batch-sharded
    activations, so it varies over the data axis, while a replicated ``W_ih`` does
    not: the cotangent of a replicated primal is the sum of the shards' terms, as
    JAX's own transpose (of the implicit ``pvary``) returns it. Nothing is summed
    outside ``shard_map``.
    """
    def psum_to(ct, axes):
        extra = tuple(sorted(_varying(ct) - axes, key=str))
        return jax.lax.psum(ct, extra) if extra else ct

    out = []
    for ct, axes in zip(cotangents, recorded.axes):
        leaves, treedef = jax.tree.flatten(ct)
        out.append(jax.tree.unflatten(treedef, [psum_to(c, a) for c, a in zip(leaves, axes)]))
    return tuple(out)


def forward_scan(cell: Cell, params: CellParams, xs: jax.Array, carry0: Carry,
                 mask: jax.Array | None = None, keep_residuals: bool = True,
                 compute_dtype=None) -> tuple[jax.Array, Carry, ForwardTrace]:
    """Runs the layer forward with ``lax.scan``.

    Args:
        cell: the cell.
        params: its parameters.
        xs: inputs, (T, B, D), time-major.
        carry0: initial carry, a tuple of (B, H) arrays. Inside ``jax.shard_map`` it
            is cast to vary over the mesh axes ``params``, ``xs`` or ``mask`` vary
            over (a replicated zero state needs no marking).
        mask: optional boolean (T, B); False marks steps past a sequence's length.
        keep_residuals: store the cell's residuals for the backward pass. False
            (``method="autodiff"``, which saves its own) keeps only the carries.
        compute_dtype: mixed precision: the step's products and gate math run in
            this dtype (the parameters and ``xs`` cast to it, ``in_compute_dtype``)
            while the carry keeps ``carry0``'s dtype from step to step; None (the
            default) computes in the parameters' dtype.

    Returns:
        ``(hs, carry_T, trace)``: outputs ``hs (T, B, H)`` (zero where masked), the
        final carry (the carry at each sequence's last valid step), and the
        ``ForwardTrace`` the backward pass needs. The first residual leaf shaped
        like one step of the input projection, (B, G*H), is written over the input
        projection's buffer (``_inplace_index``).
    """
    # The bias is added inside the loop, where it fuses into the step's elementwise
    # work, rather than to all T steps at once: that would write a second (T, B, G*H)
    # array (measured: 6% of an LSTM training step at T=100, B=128, H=512).
    carry0 = _initial_carry(carry0, params, xs, mask)  # under shard_map: varying as xs is
    params, xs = in_compute_dtype((params, xs), compute_dtype)  # mixed precision: the step's
    xp = xs @ params.w_ih.T  # the input projection of every step, one product
    bias = input_bias(cell, params)
    loop_params = _loop_params(params)
    T = xs.shape[0]
    if cell.residual_over_input:
        xp = vary(xp, varying_axes(carry0))  # the loop's buffer: varying as the carry is

    def step(carry, xp_t):
        if bias is not None:
            xp_t = xp_t + bias  # W_ih x_t + b_ih (+ b_hh where folded)
        new_carry, res = cell.step(loop_params(), carry, xp_t)
        return _in_carry_dtype(new_carry, carry), res  # the carry keeps its dtype

    out_shape = jax.eval_shape(step, carry0, xp[0])  # traced once: shapes only
    check_step(cell, carry0, xp[0], out_shape)
    res_shape = out_shape[1]
    k = None
    if keep_residuals and cell.residual_over_input:
        k = _inplace_index(res_shape, xp.shape[1:], xp.dtype)

    def body(state, inputs):
        carry, buf = state
        t, m_t = inputs[0], inputs[1]
        new_carry, res = step(carry, buf[t] if k is not None else inputs[2])
        new_carry = _select(m_t, new_carry, carry)  # frozen past the sequence's end
        leaves = jax.tree.leaves(res) if keep_residuals else []
        if k is not None:
            buf = jax.lax.dynamic_update_index_in_dim(buf, leaves[k], t, 0)  # over xp_t
            leaves = leaves[:k] + leaves[k + 1:]
        return (new_carry, buf), (new_carry, leaves)

    ts = jnp.arange(T)
    if k is not None:  # xp travels as the loop's buffer, read and overwritten in place
        (carry_T, buf), (carries, rest) = jax.lax.scan(body, (carry0, xp), (ts, mask),
                                                       unroll=UNROLL)
    else:
        (carry_T, buf), (carries, rest) = jax.lax.scan(body, (carry0, None), (ts, mask, xp),
                                                       unroll=UNROLL)
    residuals = ()
    if keep_residuals:
        treedef = jax.tree.structure(res_shape)
        leaves = rest if k is None else rest[:k] + [buf] + rest[k:]
        residuals = jax.tree.unflatten(treedef, leaves)
    hs = carries[0]
    if mask is not None:
        hs = jnp.where(mask[:, :, None], hs, 0)
    return hs, carry_T, ForwardTrace(carries, residuals)


def sum_outer(dg: jax.Array, a: jax.Array) -> jax.Array:
    """``sum_t dg_t^T a_t`` for ``dg (T, B, G)``, ``a (T, B, K)``: one (G, K) product.

    In the backend's formulation (``formulation.py``, read at trace time). With
    ``explicit_outer_transposes`` (CPU), computed as ``((a^T) dg)^T`` with both
    transposes made explicit, each behind an ``optimization_barrier``: the narrow
    ``a`` (K columns) is transposed into ``(K, T, B)`` before the product, and the
    small (K, G) result after it. Left to itself, XLA folds either transpose into
    the product's dimension numbers, and XLA:CPU then runs it on its generic (Eigen)
    kernel instead of its fast one (YNNPACK): 2.5-4.0 ms instead of 1.5 ms for dW_ih
    and 6.9-8.0 ms instead of 4.2 ms for dW_hh of an LSTM at T=100, B=32, H=128
    (docs/experiments/step_formulations). Otherwise the plain contraction, its
    layout left to XLA.
    """
    # Contract over (t, b) directly, without merging the two axes: a reshape would
    # make XLA gather a batch sharded over devices (tests/test_sharding.py).
    if not _formulation().explicit_outer_transposes:
        return jax.lax.dot_general(dg, a, (((0, 1), (0, 1)), ((), ())))  # (G, K)
    a_t = jax.lax.optimization_barrier(jnp.transpose(a, (2, 0, 1)))  # (K, T, B), row-major
    prod = jax.lax.dot_general(a_t, dg, (((1, 2), (0, 1)), ((), ())))  # (K, G)
    return jax.lax.optimization_barrier(prod).T


def _weight_and_bias(dg: jax.Array, a: jax.Array, bias: jax.Array | None):
    """``sum_t dg_t^T a_t``, and ``sum_t sum_b dg_t`` when the layer has ``bias`` (else None).

    The bias gradient is a reduction of its own. Taking it as the last column of the
    product instead, with a row of ones appended to the transposed ``a``, measured
    a tie and costs that row (docs/experiments/step_formulations, variant
    ``bias_in_product``).
    """
    return sum_outer(dg, a), (None if bias is None else dg.sum(axis=(0, 1)))


def _masked(m_t: jax.Array | None, v: jax.Array) -> jax.Array:
    """``v (B, ...)`` with the examples where the (B,) mask is False set to zero."""
    if m_t is None:
        return v
    return jnp.where(m_t.reshape(m_t.shape + (1,) * (v.ndim - 1)), v, 0)


# --- the reverse scan's buffer plan: one object, read by the scan and the memory guard --

class BufferPlan(NamedTuple):
    """Where the reverse scan (``backward_scan``) keeps its per-step quantities.

    Computed from shapes alone (``backward_plan``); ``backward_scan`` follows it and
    the run application's memory estimate counts ``elements`` of it.
    """

    dgi_over: DgiOver  # dgi (T, B, G*H) written over "dhs", over a "residual" leaf, or a
    #   stacked scan "output"
    residual_index: int | None  # with "residual": that leaf's index in the flat residuals
    dgh_is_dgi: bool  # the cell folds b_hh (fold_recurrent_bias): dgh is dgi, one buffer
    summed: tuple[str, ...]  # the cell's own fields whose (B,) + shape terms the loop sums
    outer: tuple[str, ...]  # the cell's own fields stacked as Outer(dg, a), one product after
    input_size: int  # D, the width of xs (T, B, D)
    output_size: int  # P, the width of dhs (T, B, P)
    gate_size: int  # G*H, the width of dgi and dgh

    def elements(self, T: int, B: int) -> int:
        """Elements of the (T, B, .) buffers the reverse scan and the products after it make.

        ``dgi`` where it is a stacked output, ``dgh`` unless it is ``dgi``, ``h_{t-1}``
        transposed for ``dW_hh`` (XLA fuses the shift into the transpose), ``x``
        transposed for ``dW_ih``, and ``dx``. A stacked ``dgi`` shaped like ``dhs``
        (IndRNN, whose loop sums ``u``'s terms) is not counted: XLA gives it a dead
        buffer of that shape. Not counted either: the Outer fields' stacked sides
        (the projected LSTM's ``w_hr``: (T, B, P) and (T, B, H)).
        """
        dgi = self.dgi_over == "output" and self.gate_size != self.output_size
        dgh = not self.dgh_is_dgi
        return T * B * (self.gate_size * (dgi + dgh) + self.output_size + 2 * self.input_size)


def _dgi_over_dhs(dhs: jax.Array, params: CellParams) -> bool:
    """Whether the reverse scan writes ``dgi`` over ``dhs``: when they have one shape."""
    return dhs.shape[-1] == params.w_ih.shape[0]


def dgi_over_residual(residuals, shape, dtype) -> int | None:
    """Index of the residual leaf the reverse scan writes ``dgi (T, B, G*H)`` over, or None."""
    return _first_leaf_like(residuals, shape, dtype)


def _cell_backward(cell: Cell, params, carries: Carry, carry0: Carry, t, carry, res, dcarry):
    """``cell.backward_step`` at step ``t``, ``carries`` the forward's (T, B, H) carries."""
    # carry_{t-1}, read from the stored carries (no shifted copy is made)
    carry_prev = tuple(jnp.where(t > 0, c[jnp.maximum(t - 1, 0)], c0)
                       for c, c0 in zip(carries, carry0))
    return cell.backward_step(params, carry_prev, carry, res, dcarry)


def _backward_extra(cell: Cell, params, carry0: Carry, fwd: ForwardTrace, dhs) -> dict:
    """The shapes of ``backward_step``'s fourth value, from one step traced for shapes only.

    Every argument may be arrays or ``jax.ShapeDtypeStruct``. Raises the
    ``check_backward_step`` errors.
    """
    at0 = lambda tree: jax.tree.map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), tree)
    probe = jax.eval_shape(partial(_cell_backward, cell), params, fwd.carries, carry0,
                           jnp.asarray(dhs.shape[0] - 1), at0(fwd.carries),
                           at0(fwd.residuals), tuple(carry0))
    xp_shape = jax.ShapeDtypeStruct(dhs.shape[1:2] + (params.w_ih.shape[0],), dhs.dtype)
    return check_backward_step(cell, params, tuple(carry0), xp_shape, probe)


def _plan(cell: Cell, params, xs, fwd: ForwardTrace, dhs, extra: dict) -> BufferPlan:
    """The ``BufferPlan`` of ``backward_scan`` (arguments as there, or their shapes)."""
    summed = tuple(f for f, v in extra.items() if not isinstance(v, Outer))
    outer = tuple(f for f, v in extra.items() if isinstance(v, Outer))
    gh = params.w_ih.shape[0]
    # With one gate, dgi (T, B, H) is written over dhs, whose step t is dead once
    # read: no second (T, B, H) buffer is allocated and zero-filled. Not when the loop
    # also sums per-example parameter terms (IndRNN's u): XLA then copies the whole
    # buffer at every step, quadratic in T (IndRNN, T=1000, B=32, H=32: 956 ms per
    # gradient in place, 11 ms without).
    k = None
    if _dgi_over_dhs(dhs, params) and not summed:
        over = "dhs"
    else:
        # With more gates, dgi (T, B, G*H) is written over the residual leaf of that
        # shape (the built-in gated cells' gates, themselves over the input
        # projection's buffer), its step t dead once read: no zero-filled (T, B, G*H)
        # output and one such buffer less (measured: LSTM T=1000, B=16, H=64 bptt
        # 71 -> 50 ms; the peephole LSTM, whose loop also sums its peephole terms,
        # 76 -> 49 ms).
        # (only a leaf of the cotangents' dtype: over bfloat16 gates under mixed precision
        # the plan saved memory, GRU 0.87x of float32's temp bytes instead of 1.37x, but
        # made the bf16 step 1.25-1.79x slower, LSTM/GRU at T=100 and 1000, measured
        # interleaved: python -m jaxrnn_lab.perf.revisions --compute-dtype bfloat16)
        k = dgi_over_residual(jax.tree.leaves(fwd.residuals), dhs.shape[:2] + (gh,), dhs.dtype)
        over = "output" if k is None else "residual"
    return BufferPlan(over, k, cell.fold_recurrent_bias, summed, outer, xs.shape[-1],
                      dhs.shape[-1], gh)


def backward_plan(cell: Cell, params: CellParams, xs, carry0: Carry, dhs) -> BufferPlan:
    """The reverse scan's ``BufferPlan`` for a layer, from shapes alone (nothing is computed).

    Args:
        cell: the cell.
        params: its parameters, arrays or ``jax.ShapeDtypeStruct``.
        xs: the inputs (T, B, D), or their shape and dtype.
        carry0: the initial carry, a tuple of (B, H), or their shapes.
        dhs: the cotangent of the outputs (T, B, P), or its shape and dtype.

    Returns:
        The ``BufferPlan`` that ``backward_scan`` follows for these shapes.
    """
    fwd = jax.eval_shape(lambda p, x, c: forward_scan(cell, p, x, c)[2], params, xs, carry0)
    return _plan(cell, params, xs, fwd, dhs, _backward_extra(cell, params, carry0, fwd, dhs))


# --- the reverse loop ----------------------------------------------------------------

class _Loop(NamedTuple):
    """What every step of the reverse loop reads (closed over, not carried)."""

    cell: Cell
    params: CellParams
    plan: BufferPlan
    carries: Carry  # the forward's carries, each (T, B, H)
    carry0: Carry  # the initial carry, each (B, H)
    res_def: object  # the residuals' tree structure
    with_trace: bool


class _State(NamedTuple):
    """The reverse loop's carry."""

    dcarry: Carry  # dL/dcarry_t coming in from step t+1, each (B, H)
    dhs_buf: jax.Array | None  # plan "dhs": dhs (T, B, H), dgi_t written over step t
    dh_t: jax.Array | None  # ... and its step t, read by the previous iteration (read-ahead)
    res_buf: jax.Array | None  # plan "residual": that leaf (T, B, G*H), dgi_t over step t
    res_t: jax.Array | None  # ... and its step t, read by the previous iteration (read-ahead)
    acc: dict  # {summed field: (B,) + shape}: the per-example terms summed so far


class _Stacked(NamedTuple):
    """The reverse loop's stacked outputs (leading axis T); None where not stacked."""

    dgi: jax.Array | None  # (T, B, G*H), plan "output"
    dgh: jax.Array | None  # (T, B, G*H), unless dgh is dgi
    outer: tuple  # Outer((T, B, M), (T, B, K)) per plan.outer field
    dh: jax.Array | None = None  # with_trace: (T, B, H), total dL/dh_t
    dh_next: jax.Array | None = None  # with_trace: (T, B, H), dL/dh_{t-1}
    terms: dict | None = None  # with_trace: {summed field: (T, B) + shape}


def _reverse_step(loop: _Loop, state: _State, inputs):
    """One iteration of the reverse scan, step t (T-1 down to 0): ``(state, stacked)``."""
    plan = loop.plan
    t, carry, res, dh_t, m_t = inputs
    res_buf, res_t = state.res_buf, state.res_t
    if plan.dgi_over == "dhs":
        dh_t = state.dh_t  # the loss's dL/dh_t: read ahead by the last iteration
    if plan.dgi_over == "residual":
        k = plan.residual_index
        res = res[:k] + [res_t] + res[k:]  # res_t: read ahead by the last iteration
    res = jax.tree.unflatten(loop.res_def, res)
    dcarry_in = state.dcarry
    dcarry = (dcarry_in[0] + dh_t,) + tuple(dcarry_in[1:])  # dh_t = dL/dh_t (loss) + dh_next
    out = _cell_backward(loop.cell, loop.params, loop.carries, loop.carry0, t, carry, res,
                         dcarry)
    dcarry_prev, dgi, dgh = out[:3]
    extra = out[3] if len(out) == 4 else {}
    if m_t is not None:
        # A masked step output a constant zero and left the carry unchanged:
        # its cotangent passes straight through, ignoring dh_t.
        dcarry_prev = _select(m_t, dcarry_prev, dcarry_in)
        dgi = jnp.where(m_t[:, None], dgi, 0)  # ... and no gradient contribution
        dgh = jnp.where(m_t[:, None], dgh, 0)
    # the cell's own small parameters: their per-example terms summed in the loop
    terms = {f: _masked(m_t, extra[f]) for f in plan.summed}
    acc = {f: state.acc[f] + terms[f] for f in plan.summed}
    dhs_buf, dh_ahead = state.dhs_buf, None
    if plan.dgi_over == "dhs":
        # dgi_t over dh_t, then dh_{t-1} read from the updated buffer, for the next
        # iteration, as the "residual" plan does below: reading dh_t here made XLA copy
        # the whole buffer at every step for a cell whose dcarry_prev reads dh off
        # dgi's path (the leaky cell's (1 - alpha) dh)
        dhs_buf = jax.lax.dynamic_update_index_in_dim(dhs_buf, dgi, t, 0)  # over dh_t
        dh_ahead = dhs_buf[jnp.maximum(t - 1, 0)]
    elif plan.dgi_over == "residual":
        # dgi_t over res_t, then res_{t-1} read from the updated buffer, for the
        # next iteration: every reader of the buffer follows the write, so XLA
        # updates it in place. Reading res_t from the buffer in this iteration made
        # XLA copy the whole buffer at every step: dc_prev also reads res_t, off
        # dgi's path, so not every reader precedes the write (an
        # optimization_barrier does not order them: XLA:CPU drops barriers before
        # copy insertion). At t = 0 the read is clamped and unused.
        res_buf = jax.lax.dynamic_update_index_in_dim(res_buf, dgi.astype(res_buf.dtype), t, 0)
        res_t = res_buf[jnp.maximum(t - 1, 0)]
    stacked = _Stacked(
        dgi if plan.dgi_over == "output" else None, None if plan.dgh_is_dgi else dgh,
        # the cell's own matrices: both sides stacked, one product after the loop
        tuple(Outer(_masked(m_t, extra[f].dg), extra[f].a) for f in plan.outer))
    if loop.with_trace:
        stacked = stacked._replace(dh=dcarry[0], dh_next=dcarry_prev[0], terms=terms)
    return _State(dcarry_prev, dhs_buf, dh_ahead, res_buf, res_t, acc), stacked


class _Reversed(NamedTuple):
    """The reverse loop's results, by name."""

    dcarry0: Carry  # dL/dcarry0, each (B, H)
    dgi: jax.Array  # (T, B, G*H), from whichever buffer the plan wrote it into
    dgh: jax.Array  # (T, B, G*H), dgi itself when the plan says so
    acc: dict  # {summed field: (B,) + shape}
    stacked: _Stacked  # the per-step outputs (the trace's, the Outer fields')


def _reverse_loop(loop: _Loop, fwd: ForwardTrace, dhs, dcarry_T, mask, extra) -> _Reversed:
    """Runs the reverse ``lax.scan`` as ``loop.plan`` lays it out; its results by name."""
    plan, T = loop.plan, dhs.shape[0]
    in_place = plan.dgi_over == "dhs"
    res_leaves = jax.tree.leaves(fwd.residuals)
    k = plan.residual_index
    res_in = res_leaves if k is None else res_leaves[:k] + res_leaves[k + 1:]
    acc0 = {f: jnp.zeros(extra[f].shape, extra[f].dtype) for f in plan.summed}
    # under shard_map the sums vary as the terms do (each a function of all of these)
    acc0 = vary(acc0, varying_axes(loop.params, loop.carry0, fwd, dhs, dcarry_T, mask))
    res_buf, res_t = (None, None) if k is None else (res_leaves[k], res_leaves[k][T - 1])
    state0 = _State(tuple(dcarry_T), dhs if in_place else None, dhs[T - 1] if in_place else None,
                    res_buf, res_t, acc0)
    final, stacked = jax.lax.scan(
        partial(_reverse_step, loop), state0,
        (jnp.arange(T), fwd.carries, res_in, None if in_place else dhs, mask),
        reverse=True, unroll=UNROLL)
    dgi = {"dhs": final.dhs_buf, "residual": final.res_buf, "output": stacked.dgi}
    dgi = dgi[plan.dgi_over]
    dgh = dgi if plan.dgh_is_dgi else stacked.dgh
    return _Reversed(final.dcarry, dgi, dgh, final.acc, stacked)


# --- after the loop: the weight gradients as matrix products ---------------------------

def _weight_gradients(cell: Cell, params, plan: BufferPlan, xs, carry0, fwd: ForwardTrace,
                      rev: _Reversed):
    """``(dparams, dxs)``: every weight gradient one product over all T*B rows."""
    dgi, dgh = rev.dgi, rev.dgh
    hs = fwd.carries[0]  # (T, B, H): h_t
    hs_prev = jnp.concatenate([carry0[0][None], hs[:-1]])  # (T, B, H): h_{t-1}, h_{-1} = h0
    grads = {}
    # sum_t dgi_t^T x_t, and sum_t dgi_t for b_ih
    grads["w_ih"], db_ih = _weight_and_bias(dgi, xs, params.b_ih)
    if "w_hh" not in plan.summed + plan.outer and params.w_hh.ndim == 2:
        # sum_t dgh_t^T h_{t-1}, and sum_t dgh_t for b_hh (folded: dgh is dgi, and XLA
        # computes the one sum once)
        grads["w_hh"], db_hh = _weight_and_bias(dgh, hs_prev, params.b_hh)
    else:
        db_hh = None if params.b_hh is None else dgh.sum(axis=(0, 1))  # sum_t dgh_t
    dxs = dgi @ params.w_ih  # dL/dx_t = dgi_t W_ih
    if db_ih is not None:
        grads["b_ih"] = db_ih
    if db_hh is not None:
        grads["b_hh"] = db_hh
    grads.update({f: rev.acc[f].sum(axis=0) for f in plan.summed})  # sum_b of sum_t, in-loop
    outer_terms = dict(zip(plan.outer, rev.stacked.outer))
    grads.update({f: sum_outer(o.dg, o.a) for f, o in outer_terms.items()})  # sum_t dg_t^T a_t
    missing = [f for f in params._fields
               if getattr(params, f) is not None and f not in grads]
    if missing:
        raise ValueError(f"{type(cell).__name__}.backward_step gives no gradient for the "
                         f"parameter field(s) {missing}: return them as its fourth value, "
                         f"{{field: per-example term (B,) + shape or Outer(dg, a)}}")
    return params._replace(**grads), dxs


def backward_scan(cell: Cell, params: CellParams, xs: jax.Array, carry0: Carry,
                  fwd: ForwardTrace, dhs: jax.Array, dcarry_T: Carry,
                  mask: jax.Array | None = None, with_trace: bool = False,
                  compute_dtype=None):
    """Handwritten BPTT: the reverse scan, then the weight gradients as matrix products.

    The reverse scan's buffers follow ``backward_plan``'s ``BufferPlan`` (the same
    plan the memory estimate reads).

    Args:
        cell: the cell.
        params: its parameters (``CellParams`` or the cell's own NamedTuple).
        xs: inputs of the forward pass, (T, B, D).
        carry0: initial carry of the forward pass, tuple of (B, H).
        fwd: the ``ForwardTrace`` from ``forward_scan``.
        dhs: cotangent of the outputs ``hs``, (T, B, H).
        dcarry_T: cotangent of the final carry, tuple of (B, H).
        mask: the forward pass's mask, (T, B), or None.
        with_trace: also return the per-step ``BackwardTrace``.
        compute_dtype: the forward pass's (``forward_scan``). The cell's backward
            step multiplies by the parameters in this dtype, while the cotangents
            stay in the carry's dtype: ``dh_next`` and every weight-gradient product
            have a carry-dtype operand, so they accumulate in that dtype (float32
            under bfloat16 compute), never as narrow products cast afterwards.

    Returns:
        ``(dparams, dxs (T, B, D), dcarry0)``, ``dparams`` shaped like ``params``,
        plus the ``BackwardTrace`` when ``with_trace``.

    Raises:
        ValueError: ``backward_step`` returns the wrong structure or shapes, or no
            gradient for one of the cell's own parameter fields.
    """
    params, xs = in_compute_dtype((params, xs), compute_dtype)  # as the forward scan saw them
    extra = _backward_extra(cell, params, carry0, fwd, dhs)
    plan = _plan(cell, params, xs, fwd, dhs, extra)
    loop = _Loop(cell, params, plan, fwd.carries, carry0,
                 jax.tree.structure(fwd.residuals), with_trace)
    rev = _reverse_loop(loop, fwd, dhs, dcarry_T, mask, extra)
    dparams, dxs = _weight_gradients(cell, params, plan, xs, carry0, fwd, rev)
    if with_trace:
        dextra = dict(rev.stacked.terms)
        dextra.update(zip(plan.outer, rev.stacked.outer))
        st = rev.stacked
        return dparams, dxs, rev.dcarry0, BackwardTrace(st.dh, rev.dgi, rev.dgh, st.dh_next,
                                                        dextra)
    return dparams, dxs, rev.dcarry0


# --- forward mode: the tangent scan --------------------------------------------------------

def tangent_scan(cell: Cell, params: CellParams, xs: jax.Array, carry0: Carry,
                 fwd: ForwardTrace, dparams: CellParams, dxs: jax.Array, dcarry0: Carry,
                 mask: jax.Array | None = None, compute_dtype=None) -> tuple[jax.Array, Carry]:
    r"""Forward mode: the tangent of the layer's outputs, from the forward scan's trace.

    .. math::
        \dot{xp}_t = \dot x_t W_{ih}^\top + x_t \dot W_{ih}^\top + \dot b \quad
        (\text{all } t \text{ in one product each}), \qquad
        \dot{carry}_t = \mathrm{tangent\_step}(carry_{t-1}, carry_t, res_t;
        \dot\theta, \dot{carry}_{t-1}, \dot{xp}_t)

    a forward ``lax.scan`` that carries only the carry's tangent and reads the
    stored carries and residuals, as the reverse scan does (``Cell.tangent_step``).
    A masked step leaves the tangent unchanged and outputs a zero tangent.

    Args:
        cell, params, xs, carry0, mask, compute_dtype: the forward pass's.
        fwd: the ``ForwardTrace`` of ``forward_scan`` on them (residuals kept).
        dparams: the parameters' tangent, shaped like ``params``.
        dxs: the inputs' tangent, (T, B, D).
        dcarry0: the initial carry's tangent, shaped like ``carry0``.

    Returns:
        ``(dhs (T, B, H), dcarry_T)``: the tangents of ``forward_scan``'s ``hs`` and
        ``carry_T``.
    """
    params, xs, dparams, dxs = in_compute_dtype((params, xs, dparams, dxs), compute_dtype)
    xp = project_inputs(cell, params, xs)  # recomputed: the forward may reuse its buffer
    dxp = dxs @ params.w_ih.T + xs @ dparams.w_ih.T  # product rule, every step at once
    dbias = input_bias(cell, dparams)
    if dbias is not None:
        dxp = dxp + dbias  # + b_ih (+ b_hh where folded)
    carries_prev = tuple(jnp.concatenate([c0[None], c[:-1]]) for c0, c in zip(carry0, fwd.carries))
    dcarry0 = vary(tuple(dcarry0), varying_axes(params, xs, carry0, mask, dparams, dxs, dcarry0))

    def body(dcarry, inputs):
        xp_t, dxp_t, carry_prev, carry, res, m_t = inputs
        new = cell.tangent_step(params, carry_prev, xp_t, carry, res, dparams, dcarry, dxp_t)
        new = _select(m_t, _in_carry_dtype(tuple(new), dcarry), dcarry)  # frozen where masked
        return new, new[0]

    dcarry_T, dhs = jax.lax.scan(body, dcarry0, (xp, dxp, carries_prev, fwd.carries,
                                                 fwd.residuals, mask), unroll=UNROLL)
    if mask is not None:
        dhs = jnp.where(mask[:, :, None], dhs, 0)
    return dhs, dcarry_T


def _tangent_lin(static, params, xs, carry0, mask):
    """``hiscan``'s ``lin``: the forward scan keeping what the tangent scan reads."""
    cell, compute_dtype = static[0], static[-1]
    hs, carry_T, fwd = forward_scan(cell, params, xs, carry0, mask, compute_dtype=compute_dtype)
    return (hs, carry_T), (params, xs, carry0, fwd, mask)


def _tangent_linearized(static, saved, dparams, dxs, dcarry0):
    """``hiscan``'s ``linearized``: the tangent scan over the saved forward trace."""
    cell, compute_dtype = static[0], static[-1]
    params, xs, carry0, fwd, mask = saved
    dhs, dcarry_T = tangent_scan(cell, params, xs, carry0, fwd, dparams, dxs, dcarry0, mask,
                                 compute_dtype)
    # each tangent in its output's dtype (the carry's)
    return dhs.astype(fwd.carries[0].dtype), _in_carry_dtype(dcarry_T, tuple(fwd.carries))


# --- custom_vjp wiring -------------------------------------------------------

@partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def bptt_layer(cell: Cell, params: CellParams, xs: jax.Array, carry0: Carry,
               mask: jax.Array | None, compute_dtype=None) -> tuple[jax.Array, Carry]:
    """One layer whose derivative is the handwritten BPTT (``method="bptt"``).

    Args:
        cell: the cell (static).
        params: its parameters.
        xs: inputs, (T, B, D).
        carry0: initial carry, tuple of (B, H).
        mask: boolean (T, B) or None.
        compute_dtype: mixed precision (static; ``forward_scan``), or None.

    Returns:
        ``(hs (T, B, H), carry_T)``.

    Inside ``jax.shard_map`` (``check_vma=True``), the backward pass returns each
    cotangent summed over the mesh axes it varies on and its primal does not (a
    replicated ``params``' gradient is the sum of every shard's), so the gradients
    have the types and values ``jax.grad`` gives through the same scan.
    """
    hs, carry_T, _ = forward_scan(cell, params, xs, carry0, mask, keep_residuals=False,
                                  compute_dtype=compute_dtype)
    return hs, carry_T


def _bptt_layer_fwd(cell, params, xs, carry0, mask, compute_dtype=None):
    hs, carry_T, fwd = forward_scan(cell, params, xs, carry0, mask, compute_dtype=compute_dtype)
    axes = _primal_axes(params, xs, carry0)  # static: where each primal varies (shard_map)
    return (hs, carry_T), (params, xs, carry0, fwd, mask, axes)


def _bptt_layer_bwd(cell, compute_dtype, saved, cotangents):
    params, xs, carry0, fwd, mask, axes = saved
    dhs, dcarry_T = cotangents
    grads = backward_scan(cell, params, xs, carry0, fwd, dhs, dcarry_T, mask,
                          compute_dtype=compute_dtype)
    # under shard_map: summed over the shards where the primal is replicated
    grads = _sum_over_replicas(grads, axes)
    dparams, dxs, dcarry0 = _cast_to_primals(grads, axes)  # each in its primal's dtype
    dmask = None  # the mask is boolean: no cotangent
    return dparams, dxs, dcarry0, dmask


bptt_layer.defvjp(_bptt_layer_fwd, _bptt_layer_bwd)


# --- memory-lean BPTT: store the state every `segment` steps, recompute in the backward --

def _segments(xs: jax.Array, mask: jax.Array | None, segment: int):
    """Pads T up to a multiple of ``segment`` with masked steps and splits time.

    Returns:
        ``(xs_seg (S, k, B, D), mask_seg (S, k, B), T)``.
    """
    T, B = xs.shape[0], xs.shape[1]
    n = -(-T // segment)
    pad = n * segment - T
    if mask is None and pad:
        mask = jnp.ones((T, B), bool)
    if pad:
        xs = jnp.concatenate([xs, jnp.zeros((pad,) + xs.shape[1:], xs.dtype)])
        mask = jnp.concatenate([mask, jnp.zeros((pad, B), bool)])
    split = lambda a: a.reshape((n, segment) + a.shape[1:])  # noqa: E731
    return split(xs), (None if mask is None else split(mask)), T


def _lean_forward(cell, params, xs, carry0, mask, segment, compute_dtype=None):
    carry0 = _initial_carry(carry0, params, xs, mask)  # the segments' loop carries it
    xs_s, mask_s, T = _segments(xs, mask, segment)

    def body(carry, inputs):
        x, m = inputs
        hs, carry_end, _ = forward_scan(cell, params, x, carry, m, keep_residuals=False,
                                        compute_dtype=compute_dtype)
        return carry_end, (hs, carry)  # keep only the carry at the segment's start

    carry_T, (hs, starts) = jax.lax.scan(body, carry0, (xs_s, mask_s))
    hs = hs.reshape((-1,) + hs.shape[2:])[:T]
    return hs, carry_T, starts


@partial(jax.custom_vjp, nondiff_argnums=(0, 5, 6))
def lean_bptt_layer(cell: Cell, params: CellParams, xs: jax.Array, carry0: Carry,
                    mask: jax.Array | None, segment: int, compute_dtype=None
                    ) -> tuple[jax.Array, Carry]:
    r"""Handwritten BPTT that stores the carry only every ``segment`` steps.

    The forward pass keeps the outputs and the carry at the start of each segment
    of ``segment`` steps (computing each segment's input projection inside the
    loop). The backward pass walks the segments in reverse: it recomputes the
    segment's forward scan from its stored carry, runs the handwritten reverse
    scan over it (``backward_scan``) and adds the segment's weight gradients, each
    still one matrix product over the segment's ``segment * B`` rows. Memory for
    the residuals falls from O(T) to O(T / segment + segment) steps' worth, for one
    extra forward pass. The gradients are those of ``bptt_layer``, inside
    ``jax.shard_map`` too.

    Args:
        cell: the cell (static).
        params: its parameters.
        xs: inputs, (T, B, D).
        carry0: initial carry, tuple of (B, H).
        mask: boolean (T, B) or None.
        segment: steps per segment (static), >= 1; about sqrt(T) minimises memory.
        compute_dtype: mixed precision (static; ``forward_scan``), or None.

    Returns:
        ``(hs (T, B, H), carry_T)``.
    """
    hs, carry_T, _ = _lean_forward(cell, params, xs, carry0, mask, segment, compute_dtype)
    return hs, carry_T


def _lean_fwd(cell, params, xs, carry0, mask, segment, compute_dtype=None):
    hs, carry_T, starts = _lean_forward(cell, params, xs, carry0, mask, segment, compute_dtype)
    axes = _primal_axes(params, xs, carry0)  # static: where each primal varies (shard_map)
    return (hs, carry_T), (params, xs, starts, mask, axes)


def _lean_bwd(cell, segment, compute_dtype, saved, cotangents):
    params, xs, starts, mask, axes = saved
    dhs, dcarry_T = cotangents
    T = xs.shape[0]
    xs_s, mask_s, _ = _segments(xs, mask, segment)
    pad = xs_s.shape[0] * segment - T
    dhs_s = jnp.concatenate([dhs, jnp.zeros((pad,) + dhs.shape[1:], dhs.dtype)]) if pad else dhs
    dhs_s = dhs_s.reshape(xs_s.shape[:2] + dhs.shape[1:])

    def body(acc, inputs):
        dparams, dcarry = acc
        x, m, start, dh = inputs
        _, _, fwd = forward_scan(cell, params, x, start, m,  # recompute this segment
                                 compute_dtype=compute_dtype)
        dp, dx, dcarry = backward_scan(cell, params, x, start, fwd, dh, dcarry, m,
                                       compute_dtype=compute_dtype)
        dparams = jax.tree.map(jnp.add, dparams, dp)  # sum the segments' weight gradients
        return (dparams, dcarry), dx

    # the sum starts varying as each segment's terms do (under shard_map; else as is)
    zeros = vary(jax.tree.map(jnp.zeros_like, params),
                 varying_axes(params, xs, starts, mask, dhs, dcarry_T))
    (dparams, dcarry0), dxs = jax.lax.scan(
        body, (zeros, tuple(dcarry_T)), (xs_s, mask_s, starts, dhs_s), reverse=True)
    dxs = dxs.reshape((-1,) + dxs.shape[2:])[:T]
    # under shard_map: summed over the shards where the primal is replicated
    grads = _sum_over_replicas((dparams, dxs, dcarry0), axes)
    dparams, dxs, dcarry0 = _cast_to_primals(grads, axes)  # each in its primal's dtype
    return dparams, dxs, dcarry0, None


lean_bptt_layer.defvjp(_lean_fwd, _lean_bwd)


# --- the same rules as a hijax primitive: forward mode too (JAXRNN_BPTT_RULE=hijax) -----

BPTT_RULES = ("custom_vjp", "hijax")
_warned_fallback = []


def bptt_rule() -> str:
    """How ``method="bptt"`` is wired into JAX, from ``JAXRNN_BPTT_RULE`` (read at trace time).

    ``"hijax"`` (the default): ``hiscan.HiLayer``, the handwritten reverse-mode
    rules plus forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``); on a
    jax without the experimental API (``hiscan.SUPPORTED``) it falls back to
    ``"custom_vjp"`` with a warning. ``"custom_vjp"``: ``bptt_layer`` /
    ``lean_bptt_layer``, reverse mode only, the same gradients bit for bit.

    Raises:
        ValueError: ``JAXRNN_BPTT_RULE`` is not one of ``BPTT_RULES``.
    """
    rule = os.environ.get("JAXRNN_BPTT_RULE", "hijax")
    if rule not in BPTT_RULES:
        raise ValueError(f"JAXRNN_BPTT_RULE must be one of {BPTT_RULES}, got {rule!r}")
    if rule == "hijax" and not hiscan.AVAILABLE:
        if not _warned_fallback:
            _warned_fallback.append(True)
            warnings.warn("JAXRNN_BPTT_RULE=hijax (the default) needs jax.experimental.hijax "
                          f"({hiscan.REASON}); using custom_vjp: forward mode (jax.jvp, "
                          "jax.jacfwd, jax.linearize) through method='bptt' will raise",
                          stacklevel=3)
        return "custom_vjp"
    return rule


def _bptt_primal(static, params, xs, carry0, mask):
    cell, compute_dtype = static
    return autodiff_layer(cell, params, xs, carry0, mask, compute_dtype)


def _bptt_fwd_rule(static, params, xs, carry0, mask):
    cell, compute_dtype = static
    return _bptt_layer_fwd(cell, params, xs, carry0, mask, compute_dtype)


def _bptt_bwd_rule(static, saved, cotangents):
    cell, compute_dtype = static
    return _bptt_layer_bwd(cell, compute_dtype, saved, cotangents)


def _lean_primal(static, params, xs, carry0, mask):
    cell, segment, compute_dtype = static
    hs, carry_T, _ = _lean_forward(cell, params, xs, carry0, mask, segment, compute_dtype)
    return hs, carry_T


def _lean_fwd_rule(static, params, xs, carry0, mask):
    cell, segment, compute_dtype = static
    return _lean_fwd(cell, params, xs, carry0, mask, segment, compute_dtype)


def _lean_bwd_rule(static, saved, cotangents):
    cell, segment, compute_dtype = static
    return _lean_bwd(cell, segment, compute_dtype, saved, cotangents)


# forward mode (jvp, linearize) is the same tangent scan for both: it keeps every step
_BPTT_RULES = hiscan.Rules(_bptt_primal, _bptt_fwd_rule, _bptt_bwd_rule, _tangent_lin,
                           _tangent_linearized)
_LEAN_RULES = hiscan.Rules(_lean_primal, _lean_fwd_rule, _lean_bwd_rule, _tangent_lin,
                           _tangent_linearized)


def autodiff_layer(cell: Cell, params: CellParams, xs: jax.Array, carry0: Carry,
                   mask: jax.Array | None, compute_dtype=None) -> tuple[jax.Array, Carry]:
    """The same forward scan, left to ``jax.grad`` (``method="autodiff"``)."""
    hs, carry_T, _ = forward_scan(cell, params, xs, carry0, mask, keep_residuals=False,
                                  compute_dtype=compute_dtype)
    return hs, carry_T


def layer(cell: Cell, params: CellParams, xs: jax.Array, carry0: Carry,
          mask: jax.Array | None = None, method: ScanMethod = "bptt",
          segment: int | None = None, compute_dtype=None) -> tuple[jax.Array, Carry]:
    """One recurrent layer over a sequence, differentiated by ``method``.

    Args:
        cell: the cell.
        params: its parameters.
        xs: inputs, (T, B, D).
        carry0: initial carry, tuple of (B, H).
        mask: boolean (T, B) or None. Where False, ``xs`` may hold anything (NaN,
            inf): it is replaced by zeros before the layer reads it
            (``losses.zero_masked``), so it reaches no output and no gradient.
        method: ``"bptt"`` (handwritten reverse scan) or ``"autodiff"`` (``jax.grad``).
        segment: with ``method="bptt"``, store the carry only every ``segment``
            steps and recompute segments in the backward pass (``lean_bptt_layer``);
            None stores every step.
        compute_dtype: mixed precision, as Flax's ``dtype`` beside ``param_dtype``:
            the parameters keep their dtype (float32 master weights) and are cast,
            with ``xs``, to this one (bfloat16 or float16) for the step's products
            and gate math; the carry keeps the parameters' dtype, and so do the
            backward pass's cotangents and its weight-gradient products (float32
            accumulation inside the rule). None (the default): the parameters'
            dtype throughout.

    Inside ``jax.shard_map`` (with its default ``check_vma=True``), a ``carry0``
    that does not vary where ``xs`` (or ``params``, ``mask``) varies, such as a
    replicated zero state, is cast to (``jax.lax.pcast(..., to="varying")``), and
    every method returns gradients of the types and values ``jax.grad`` gives:
    a replicated parameter's gradient summed over the shards.

    Dtypes: the layer computes in the parameters' dtype (or ``compute_dtype``);
    ``xs`` may be narrower (bfloat16 or float16 inputs with float32 parameters:
    promoted by the input projection), and every method returns each gradient in
    its primal's dtype.

    Returns:
        ``(hs (T, B, H), carry_T)``.

    Raises:
        TypeError: ``xs`` wider than the parameters, ``carry0`` of a dtype other
            than the parameters', or a ``compute_dtype`` that is not floating or is
            wider than the parameters (``validation.check_layer_dtypes``).
    """
    compute_dtype = validation.check_layer_dtypes(params, xs, carry0, compute_dtype)
    xs = zero_masked(xs, mask)  # past each length xs may hold anything (NaN): it reaches nothing
    if segment is not None:
        if method != "bptt":
            raise ValueError(f"segment applies to method='bptt' only, got method={method!r}")
        if bptt_rule() == "hijax":
            return hiscan.hi_layer(_LEAN_RULES, (cell, segment, compute_dtype),
                                   params, xs, carry0, mask)
        return lean_bptt_layer(cell, params, xs, carry0, mask, segment, compute_dtype)
    if method == "bptt":
        if bptt_rule() == "hijax":
            return hiscan.hi_layer(_BPTT_RULES, (cell, compute_dtype),
                                   params, xs, carry0, mask)
        return bptt_layer(cell, params, xs, carry0, mask, compute_dtype)
    if method == "autodiff":
        return autodiff_layer(cell, params, xs, carry0, mask, compute_dtype)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
