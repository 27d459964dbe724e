"""The reference worked example, step by step: forward table, BPTT table, totals, one update.

Every number is computed by the library: the forward values by ``scan.forward_scan``,
the per-step backward values by the handwritten reverse scan
(``scan.backward_scan(..., with_trace=True)``), and the totals are cross-checked
against ``jax.grad`` (``method="autodiff"``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxrnn.extend import backward_scan, forward_scan, project_inputs
from jaxrnn_app.tasks import Example


class Walkthrough(NamedTuple):
    """All the numbers of a one-unit walkthrough, as numpy arrays (one entry per step)."""

    x: np.ndarray  # (T,)
    target: np.ndarray  # (T,)
    a: np.ndarray  # (T,) pre-activation a_t
    h: np.ndarray  # (T,) hidden state h_t
    y: np.ndarray  # (T,) output y_t
    loss: float
    dy: np.ndarray  # (T,) dL/dy_t = y_t - target_t
    dh: np.ndarray  # (T,) total dL/dh_t = dy_t W_hy + dh_next
    da: np.ndarray  # (T,) dL/da_t = dh_t (1 - h_t^2)
    dh_next: np.ndarray  # (T,) da_t W_hh, passed back to step t-1
    grads: dict  # {"W_xh", "W_hh", "W_hy"}: totals from the handwritten BPTT
    autodiff_grads: dict  # the same from jax.grad through the forward scan
    updated: dict  # weights after W <- W - lr dW
    weights: dict  # weights before the step
    lr: float


def walkthrough(ex: Example) -> Walkthrough:
    """Runs the example's forward pass, BPTT and one gradient step.

    Args:
        ex: from ``tasks.reference_example`` (one unit, one sequence, no biases).

    Returns:
        A ``Walkthrough`` with every intermediate number.
    """
    model, params, batch = ex.model, ex.params, ex.batch
    cell = model.cell_fn
    (p,) = params.layers[0]
    w_hy = params.readout.weight
    carry0 = (ex.h0[0],)  # (B=1, H=1)

    # Forward: a_t = W_xh x_t + W_hh h_{t-1}, h_t = tanh(a_t), y_t = W_hy h_t.
    hs, _, fwd = forward_scan(cell, p, batch.xs, carry0)
    h_prev = jnp.concatenate([carry0[0][None], hs[:-1]], axis=0)
    a = project_inputs(cell, p, batch.xs) + cell.recurrent_preactivation(p, h_prev)
    ys = hs @ w_hy.T
    loss = 0.5 * jnp.sum((ys - batch.targets) ** 2)

    # Backward: dy_t = y_t - target_t, dL/dh_t from the readout, then the reverse scan.
    dy = ys - batch.targets  # dL/dy_t for L = 1/2 sum (y_t - target_t)^2
    dhs = dy @ w_hy  # the loss's own term in dL/dh_t: dy_t W_hy
    dcarry_T = (jnp.zeros_like(carry0[0]),)  # nothing flows in after the last step
    dp, _, _, trace = backward_scan(cell, p, batch.xs, carry0, fwd, dhs, dcarry_T,
                                    with_trace=True)
    dw_hy = jnp.einsum("tbo,tbh->oh", dy, hs)  # sum_t dy_t h_t

    grads = {"W_xh": float(dp.w_ih[0, 0]), "W_hh": float(dp.w_hh[0, 0]),
             "W_hy": float(dw_hy[0, 0])}
    _, g_auto = model.loss_and_grad(params, batch.xs, batch.targets, loss="half_sse",
                                    method="autodiff", state=ex.h0)
    autodiff_grads = {"W_xh": float(g_auto.layers[0][0].w_ih[0, 0]),
                      "W_hh": float(g_auto.layers[0][0].w_hh[0, 0]),
                      "W_hy": float(g_auto.readout.weight[0, 0])}
    weights = {"W_xh": float(p.w_ih[0, 0]), "W_hh": float(p.w_hh[0, 0]),
               "W_hy": float(w_hy[0, 0])}
    updated = {k: weights[k] - ex.lr * grads[k] for k in weights}

    col = lambda v: np.asarray(v, dtype=np.float64)[:, 0, 0]  # noqa: E731
    return Walkthrough(
        x=col(batch.xs), target=col(batch.targets), a=col(a), h=col(hs), y=col(ys),
        loss=float(loss), dy=col(dy), dh=col(trace.dh), da=col(trace.dgi),
        dh_next=col(trace.dh_next), grads=grads, autodiff_grads=autodiff_grads,
        updated=updated, weights=weights, lr=float(ex.lr))


def _g(v: float) -> str:
    """Four significant digits, trailing zeros kept (0.5000, -0.03788)."""
    return f"{v:#.4g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def format_walkthrough(w: Walkthrough) -> str:
    """The walkthrough as text: tables in markdown, the numbers at the example's precision."""
    T = len(w.x)
    out = []
    out.append("Model: a_t = W_xh x_t + W_hh h_{t-1}, h_t = tanh(a_t), y_t = W_hy h_t, "
               "L = 1/2 sum_t (y_t - target_t)^2")
    out.append("Weights: " + ", ".join(f"{k} = {v:g}" for k, v in w.weights.items()))
    out.append("")
    out.append(f"Forward pass, t = 1 -> {T}")
    out.append(_table(["t", "x_t", "a_t", "h_t", "y_t", "target"],
                      [[str(t + 1), f"{w.x[t]:g}", f"{w.a[t]:.4f}", f"{w.h[t]:.4f}",
                        f"{w.y[t]:.4f}", str(float(w.target[t]))] for t in range(T)]))
    out.append(f"L = {w.loss:.4f}")
    out.append("")
    out.append(f"Backward pass (BPTT, handwritten reverse scan), t = {T} -> 1")
    out.append("  dy_t = y_t - target_t;  dh_t = dy_t W_hy + dh_next;  "
               "da_t = dh_t (1 - h_t^2);  dh_next = da_t W_hh")
    rows = []
    for t in reversed(range(T)):
        rows.append([str(t + 1), _g(w.dy[t]), _g(w.dh[t]), _g(w.da[t]),
                     _g(w.dh_next[t]) if t > 0 else "(unused)"])
    out.append(_table(["t", "dy_t", "dh_t", "da_t", "dh_next passed back"], rows))
    out.append("")
    out.append("Total gradients (summed over the steps)")
    out.append("  dW_xh = sum_t da_t x_t, dW_hh = sum_t da_t h_{t-1}, dW_hy = sum_t dy_t h_t")
    for k, v in w.grads.items():
        out.append(f"  d{k} = {v:.5f}   (jax.grad: {w.autodiff_grads[k]:.5f})")
    diff = max(abs(w.grads[k] - w.autodiff_grads[k]) for k in w.grads)
    out.append(f"  max |bptt - jax.grad| = {diff:.1e}")
    out.append("")
    out.append(f"One gradient-descent step, lr = {w.lr:g} (W <- W - lr dW)")
    for k, v in w.updated.items():
        out.append(f"  {k}: {w.weights[k]:g} - {w.lr:g} * ({w.grads[k]:.5f}) = {v:.5f}")
    return "\n".join(out)
