r"""``check_cell``: a cell's handwritten ``backward_step`` against ``jax.vjp`` of its ``step``,
and its ``tangent_step`` against ``jax.jvp``.

Two checks, in float64, at random parameters (``init``'s, each entry moved by
0.3 times a standard normal, so that gains starting at 1 are not 1), carries and
inputs:

* **one step**: ``backward_step(params, carry_prev, carry, residuals, dcarry)``
  against ``jax.vjp`` of ``step`` at a random cotangent ``dcarry`` of the new
  carry: ``dcarry_prev`` (each part), ``dgi`` (the cotangent of ``xp_t``), and the
  gradient of every parameter the step reads (``w_hh`` from ``dgh^T h_{t-1}``,
  ``b_hh`` from ``dgh`` when it is not folded, the cell's own fields from its
  fourth value); and ``tangent_step`` against ``jax.jvp`` of ``step`` at random
  tangents of the parameters, the carry and ``xp_t`` (``dcarry`` rows);
* **a sequence**: the generic reverse scan (``scan.backward_scan``) against
  ``jax.vjp`` of the forward scan over a short batch of sequences of mixed lengths,
  for every parameter, the inputs and the initial carry; and the tangent scan
  (``scan.tangent_scan``) against ``jax.jvp`` of the forward scan (``dhs``,
  ``dcarry_T``).

The two agree in exact arithmetic; in float64 a right backward step gives relative
errors near 1e-15 and a wrong one errors of order one.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn._src.cells import Cell, Outer, check_cell_class
from jaxrnn._src.scan import (param_fields, backward_scan, check_backward_step, check_step,
                              forward_scan, tangent_scan)

TOL = 1e-10  # what a right backward step meets in float64


class Row(NamedTuple):
    """One compared output."""

    check: str  # "step" or "sequence"
    output: str  # e.g. "dcarry_prev[0]", "dgi", "w_hh (dgh)", "peephole"
    shape: tuple
    max_abs_error: float  # max |handwritten - jax.vjp|
    rel_error: float  # max_abs_error / max |jax.vjp| (absolute where that is 0)


class CellReport(NamedTuple):
    """What ``check_cell`` found; prints as a table, one row per compared output."""

    cell: str
    rows: tuple[Row, ...]

    @property
    def max_rel_error(self) -> float:
        """The worst relative error over every row."""
        return max(r.rel_error for r in self.rows)

    @property
    def ok(self) -> bool:
        """Every row within ``TOL`` (1e-10)."""
        return self.max_rel_error <= TOL

    def __str__(self) -> str:
        head = (f"check_cell({self.cell}): handwritten backward_step vs jax.vjp, "
                f"tangent_step vs jax.jvp, float64")
        lines = [head, "", "| check | output | shape | max abs error | rel error | |",
                 "|---|---|---|---|---|---|"]
        for r in self.rows:
            mark = "ok" if r.rel_error <= TOL else "WRONG"
            lines.append(f"| {r.check} | {r.output} | {r.shape} | {r.max_abs_error:.2e} "
                         f"| {r.rel_error:.2e} | {mark} |")
        verdict = "PASS" if self.ok else "FAIL"
        lines += ["", f"max_rel_error = {self.max_rel_error:.2e} (tolerance {TOL:g}): {verdict}"]
        return "\n".join(lines)


def _row(check: str, output: str, hand, auto) -> Row:
    hand, auto = np.asarray(hand, np.float64), np.asarray(auto, np.float64)
    err = float(np.max(np.abs(hand - auto))) if auto.size else 0.0
    scale = float(np.max(np.abs(auto))) if auto.size else 0.0
    return Row(check, output, tuple(auto.shape), err, err / scale if scale > 0 else err)


def _normal_like(key, tree, scale=1.0):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype)
                                        for k, x in zip(keys, leaves)])


def _step_param_grads(cell: Cell, params, carry_prev, dgi, dgh, extra) -> dict:
    """The step's parameter gradients as the generic scan forms them from its outputs."""
    grads = {}
    h_prev = carry_prev[0]
    if "w_hh" not in extra and params.w_hh.ndim == 2:
        grads["w_hh (dgh)"] = ("w_hh", dgh.T @ h_prev)  # dgh^T h_{t-1}
    if params.b_hh is not None and not cell.fold_recurrent_bias:
        grads["b_hh (dgh)"] = ("b_hh", dgh.sum(axis=0))  # sum_b dgh
    for f, v in extra.items():
        g = v.dg.T @ v.a if isinstance(v, Outer) else v.sum(axis=0)
        grads[f] = (f, g)
    return grads


def _step_rows(cell: Cell, params, carry_prev, xp, key) -> list:
    """One step: ``backward_step`` against ``jax.vjp`` of ``step`` (shapes first, for clear
    errors, then the values, jit-compiled); ``key`` draws the carry's cotangent."""
    out_shape = jax.eval_shape(cell.step, params, carry_prev, xp)
    check_step(cell, carry_prev, xp, out_shape)
    dcarry = _normal_like(key, out_shape[0])

    def backward_of_step(p, c, x, dc):
        carry, res = cell.step(p, c, x)
        return cell.backward_step(p, c, carry, res, dc)

    check_backward_step(cell, params, carry_prev, xp, jax.eval_shape(
        backward_of_step, params, carry_prev, xp, dcarry))

    @jax.jit
    def one_step(params, carry_prev, xp, dcarry):
        (carry, res), vjp = jax.vjp(cell.step, params, carry_prev, xp)
        auto = vjp((dcarry, jax.tree.map(jnp.zeros_like, res)))
        hand = cell.backward_step(params, carry_prev, carry, res, dcarry)
        extra = hand[3] if len(hand) == 4 else {}
        grads = _step_param_grads(cell, params, carry_prev, hand[1], hand[2], extra)
        return auto, hand[0], hand[1], {label: g for label, (_, g) in grads.items()}

    (d_params, d_carry_prev, d_xp), h_carry_prev, h_dgi, grads = one_step(
        params, carry_prev, xp, dcarry)
    rows = [_row("step", f"dcarry_prev[{i}]", a, b)
            for i, (a, b) in enumerate(zip(h_carry_prev, d_carry_prev))]
    rows.append(_row("step", "dgi", h_dgi, d_xp))
    for label, g in grads.items():  # the label starts with the field's name
        rows.append(_row("step", label, g, getattr(d_params, label.split(" ")[0])))
    return rows + _tangent_step_rows(cell, params, carry_prev, xp, key)


def _tangent_step_rows(cell: Cell, params, carry_prev, xp, key) -> list:
    """One step, forward mode: ``tangent_step`` against ``jax.jvp`` of ``step``."""
    k1, k2, k3 = jax.random.split(jax.random.fold_in(key, 1), 3)
    tangents = (_normal_like(k1, params), _normal_like(k2, carry_prev), _normal_like(k3, xp))

    @jax.jit
    def one_step(params, carry_prev, xp, tangents):
        dparams, dcarry_prev, dxp = tangents
        step = lambda p, c, x: cell.step(p, c, x)[0]  # noqa: E731
        auto = jax.jvp(step, (params, carry_prev, xp), tangents)[1]
        carry, res = cell.step(params, carry_prev, xp)
        hand = cell.tangent_step(params, carry_prev, xp, carry, res, dparams, dcarry_prev, dxp)
        return auto, tuple(hand)

    auto, hand = one_step(params, carry_prev, xp, tangents)
    _check_like_carry(cell, hand, auto)
    return [_row("step", f"tangent dcarry[{i}]", h, a) for i, (h, a) in enumerate(zip(hand, auto))]


def _check_like_carry(cell: Cell, hand, auto) -> None:
    if len(hand) != len(auto) or any(h.shape != a.shape for h, a in zip(hand, auto)):
        raise ValueError(f"{type(cell).__name__}.tangent_step must return the carry's tangent, "
                         f"shapes {[a.shape for a in auto]}, got {[h.shape for h in hand]}")


def _sequence_rows(cell: Cell, params, carry_prev, input_size: int, seq_len: int, xs_key,
                   cot_key) -> list:
    """A sequence through the generic scans (lengths 1..T mixed across the batch):
    ``backward_scan`` against ``jax.vjp`` of ``forward_scan``; ``xs_key`` draws the
    inputs, ``cot_key`` the cotangents."""
    f64 = jnp.float64
    fields = param_fields(params)
    rows = []
    T, B = seq_len, carry_prev[0].shape[0]
    xs = jax.random.normal(xs_key, (T, B, input_size), f64)
    lengths = jnp.asarray([T - (i * (T - 1)) // max(B - 1, 1) for i in range(B)])
    mask = jnp.arange(T)[:, None] < lengths[None, :]

    @jax.jit
    def sequence(params, xs, carry0, key):
        def forward(p, x, c0):
            hs, carry_T, _ = forward_scan(cell, p, x, c0, mask, keep_residuals=False)
            return hs, carry_T

        (hs, carry_T), fvjp = jax.vjp(forward, params, xs, carry0)
        k1, k2 = jax.random.split(key)
        dhs = jax.random.normal(k1, hs.shape, f64)
        dcarry_T = _normal_like(k2, carry_T)
        _, _, trace = forward_scan(cell, params, xs, carry0, mask)
        hand = backward_scan(cell, params, xs, carry0, trace, dhs, dcarry_T, mask)
        # forward mode: the tangent scan against jax.jvp, at the cotangents as tangents
        t_params, t_xs, t_c0 = jax.tree.map(lambda a: a * 0.5 + 0.1, (params, xs, carry0))
        auto_t = jax.jvp(forward, (params, xs, carry0), (t_params, t_xs, t_c0))[1]
        hand_t = tangent_scan(cell, params, xs, carry0, trace, t_params, t_xs, t_c0, mask)
        return fvjp((dhs, dcarry_T)), hand, auto_t, hand_t

    (a_params, a_xs, a_c0), (h_params, h_xs, h_c0), auto_t, hand_t = sequence(
        params, xs, carry_prev, cot_key)
    for f in fields:
        if getattr(params, f) is not None:
            rows.append(_row("sequence", f, getattr(h_params, f), getattr(a_params, f)))
    rows.append(_row("sequence", "dxs", h_xs, a_xs))
    rows += [_row("sequence", f"dcarry0[{i}]", a, b) for i, (a, b) in
             enumerate(zip(h_c0, a_c0))]
    rows.append(_row("sequence", "tangent dhs", hand_t[0], auto_t[0]))
    rows += [_row("sequence", f"tangent dcarry_T[{i}]", h, a) for i, (h, a) in
             enumerate(zip(hand_t[1], auto_t[1]))]
    return rows


def check_cell(cell: Cell, *, input_size: int = 3, hidden_size: int = 4, batch: int = 3,
               seq_len: int = 5, seed: int = 0) -> CellReport:
    """Checks ``cell``'s ``backward_step`` against ``jax.vjp`` of its ``step`` and its
    ``tangent_step`` against ``jax.jvp``, in float64.

    Args:
        cell: a ``jaxrnn.Cell`` instance (a built-in one or a user's).
        input_size: D of the random inputs.
        hidden_size: H.
        batch: B.
        seq_len: T of the sequence check (lengths 1..T mixed across the batch).
        seed: for the random parameters, carries, inputs and cotangents.

    Returns:
        A ``CellReport``: ``.max_rel_error``, ``.ok``, ``.rows``; ``print`` it for the table.

    Raises:
        ValueError: ``cell`` is not a usable ``Cell``, or its ``step``,
            ``backward_step`` or ``tangent_step`` returns the wrong structure or shapes (the message
            names the output, the expected and the actual shape).
    """
    check_cell_class(cell)
    name = type(cell).__name__
    with jax.enable_x64(True):
        f64 = jnp.float64
        k = jax.random.split(jax.random.key(seed), 8)
        params = cell.init(k[0], input_size, hidden_size, True, f64)
        param_fields(params)  # a clear error for params that are not the contract's NamedTuple
        # random parameters, not init's: gains that start at 1 and biases at 0 would
        # hide a backward step that forgets them
        params = jax.tree.map(lambda p, n: p + 0.3 * n, params, _normal_like(k[7], params))
        B, G_H = batch, params.w_ih.shape[0]
        widths = cell.state_sizes(hidden_size)
        if len(widths) != cell.carry_size:
            raise ValueError(f"{name}.state_sizes({hidden_size}) must give carry_size="
                             f"{cell.carry_size} widths, got {len(widths)}")
        carry_prev = tuple(0.5 * jax.random.normal(kk, (B, w), f64) for kk, w in
                           zip(jax.random.split(k[1], cell.carry_size), widths))
        xp = jax.random.normal(k[2], (B, G_H), f64)

        rows = _step_rows(cell, params, carry_prev, xp, k[3])
        rows += _sequence_rows(cell, params, carry_prev, input_size, seq_len, k[4], k[5])
    return CellReport(name, tuple(rows))
