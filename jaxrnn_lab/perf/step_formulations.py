"""Formulations of each cell's step, backward step and generic scan, timed side by side (issue #10).

jaxrnn's speed is decided by how a step is written for XLA, not by its matrix
products alone: the same LSTM step costs 75 to 160 us per step at B=32, H=128
depending on where it slices, what it stores and in which layout it reads its
weight. This script measures the alternatives in one process, interleaved, so
that the library's choice for every cell is a measured one. For each cell and
grid point it times, all variants round-robin:

* ``fwd``: the forward scan of one layer as ``method="bptt"`` runs it (input
  projection, recurrence, the residuals it stores);
* ``bptt``: ``jax.value_and_grad`` of a loss on that layer with the handwritten
  reverse scan (forward, reverse scan, the weight-gradient products after it);
* ``autodiff``: the same through ``jax.grad`` of the forward scan, where a variant
  changes the forward.

The variants are the library as it is (``chosen``) and the library with one choice
undone at a time, plus ``head``, every choice undone (the formulation jaxrnn had
before issue #10):

* cell math (each a ``Cell`` subclass below, same contract, same gradients):
  ``split`` (``jnp.split`` into gates, each activated and the residual
  concatenated again, ``tanh(c)`` stored; the backward step concatenates four
  gate cotangents), ``slices`` (basic slices instead of ``jnp.split``),
  ``store_tanh_c``, ``four_products`` (the LSTM's backward concatenates
  ``dc*g, dc*c, dc*i, dh*tanh(c)`` instead of multiplying two concatenations),
  ``per_gate_products`` (four (B,H)x(H,H) products instead of one (B,H)x(H,4H)),
  ``one_tanh`` (the GRU written like the LSTM: r and z in one tanh, its
  derivatives on the whole (B, 3H) array; measured, not chosen);
* generic scan: ``w_hh_in_loop`` (the loop reads PyTorch's ``w_hh (G*H, H)``
  transposed at every step instead of a row-major ``(H, G*H)`` copy made once),
  ``stacked_residuals`` (the residual is a stacked ``lax.scan`` output, zero-filled
  before the loop, instead of written over the input projection's buffer),
  ``stacked_dgi`` (``dgi`` a zero-filled stacked output of the reverse scan instead
  of written over ``dhs`` (Elman) or over the gates' residual buffer (LSTM, GRU)),
  ``folded_sum_outer`` (the weight-gradient products with their transposes left to
  XLA, which folds them into a product its fast kernel does not take),
  and alternatives measured but not chosen: ``bias_in_product`` (each bias
  gradient the last column of its weight-gradient product, a row of ones appended
  to the transposed input, instead of a reduction over ``(T, B)`` of its own) and
  ``unroll_2``, ``unroll_4`` (``lax.scan(unroll=k)`` in the forward and the reverse
  scan: k steps per loop iteration, fewer iterations; ``scan.UNROLL``),
  ``sum_outer_flat`` (each weight-gradient product on ``(T*B, .)`` reshapes,
  ``dg^T @ a``) and ``sum_outer_chunks`` (``sum_outer`` over 10 slices of time in a
  ``lax.scan``, summed): the two forms that beat ``sum_outer`` at some shapes when
  timed alone (jaxrnn_lab/perf/weight_gradient.py).

Every variant's gradient is checked against ``chosen``'s before it is timed
(``max_rel_diff``, float32), and the compiled HLO of every ``bptt`` variant gives
the number of operations (thunks) in each loop's body (``loop_ops``: forward,
reverse), the cost that dominates at small sizes.

Commands::

    python -m jaxrnn_lab.perf.step_formulations --quick --out /tmp/sf   # seconds
    python -m jaxrnn_lab.perf.step_formulations                         # docs/experiments/step_formulations
    python -m jaxrnn_lab.perf.step_formulations --variants chosen,unroll_2 --out /tmp/u  # some variants

Writes ``step_formulations.json``, ``step_formulations.md`` (the table) and
``step_formulations.png``. Times are medians over the rounds, on whatever machine
runs it; compare the variants as ratios within one run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import statistics
import sys
import time
from pathlib import Path

from jaxrnn_lab import harness as common
from jaxrnn_lab.perf import weight_gradient  # the weight-gradient product forms (a sibling script)
import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn._src import cells as cells_lib
from jaxrnn._src import scan as scan_lib
from jaxrnn._src.cells import GRU, LSTM, CellParams, Elman, split_gates


@dataclasses.dataclass(frozen=True)
class Settings:
    cells: tuple[str, ...] = ("elman", "lstm", "gru")
    # (T, B, H): the benchmark's single-layer grid; input size H // 4
    grid: tuple[tuple[int, int, int], ...] = (
        (100, 32, 128), (200, 64, 256), (1000, 16, 64), (100, 128, 512))
    rounds: int = 15  # interleaved timed rounds (fewer where they would exceed budget_s)
    budget_s: float = 40.0  # cap on one variant-measure's timed seconds per point
    variants: tuple[str, ...] | None = None  # None: every variant of each cell
    measures: tuple[str, ...] = ("fwd", "bptt", "autodiff")
    bidirectional: tuple[int, int, int] | None = (100, 32, 128)  # (T, B, H), or None
    seed: int = 0


FULL = Settings()
QUICK = Settings(grid=((8, 2, 8),), rounds=2, variants=("chosen", "head"),
                 measures=("fwd", "bptt"), bidirectional=None)


# --- the alternative cell formulations (same contract, same math) -------------

@dataclasses.dataclass(frozen=True)
class LSTMSplit(LSTM):
    """jaxrnn's LSTM before issue #10: split, four activations, residual re-concatenated."""

    def step(self, params, carry, xp):
        h_prev, c_prev = carry
        pre = xp + self.recurrent_preactivation(params, h_prev)
        pi, pf, pg, po = split_gates(pre, 4)
        i, f, o = jax.nn.sigmoid(pi), jax.nn.sigmoid(pf), jax.nn.sigmoid(po)
        g = jnp.tanh(pg)
        c = f * c_prev + i * g
        tc = jnp.tanh(c)
        return (o * tc, c), (jnp.concatenate([i, f, g, o], axis=-1), tc)

    def backward_step(self, params, carry_prev, carry, res, dcarry):
        _, c_prev = carry_prev
        gates, tc = res
        i, f, g, o = split_gates(gates, 4)
        dh, dc_next = dcarry
        dc = dc_next + dh * o * (1 - tc * tc)
        dgates = jnp.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f),
                                  dc * i * (1 - g * g), dh * tc * o * (1 - o)], axis=-1)
        return (dgates @ params.w_hh, dc * f), dgates, dgates


def _one_tanh_lstm(pre, c_prev, blocks):
    """The chosen LSTM's step from its pre-activation ``pre (B, 4H)``, gate blocks by ``blocks``."""
    H = c_prev.shape[-1]
    scale, offset = cells_lib.gate_constants((0.5, 0.5, 1.0, 0.5), H, pre.dtype)
    gates = jnp.tanh(pre * scale) * scale + offset
    i, f, g, o = blocks(gates, 4)
    c = f * c_prev + i * g
    return (o * jnp.tanh(c), c), gates


@dataclasses.dataclass(frozen=True)
class LSTMSlices(LSTM):
    """The chosen LSTM with basic slices instead of ``jnp.split`` in the step."""

    def step(self, params, carry, xp):
        h_prev, c_prev = carry
        pre = xp + self.recurrent_preactivation(params, h_prev)
        return _one_tanh_lstm(pre, c_prev, cells_lib.gate_blocks)


@dataclasses.dataclass(frozen=True)
class LSTMStoreTanhC(LSTM):
    """The chosen LSTM storing ``tanh(c_t)`` as a second residual instead of recomputing it."""

    def step(self, params, carry, xp):
        (h, c), gates = LSTM.step(self, params, carry, xp)
        return (h, c), (gates, jnp.tanh(c))

    def backward_step(self, params, carry_prev, carry, res, dcarry):
        gates, _ = res
        return LSTM.backward_step(self, params, carry_prev, carry, gates, dcarry)


@dataclasses.dataclass(frozen=True)
class LSTMFourProducts(LSTM):
    """The chosen LSTM whose backward step concatenates four products for dL/d[i, f, g, o]."""

    def backward_step(self, params, carry_prev, carry, res, dcarry):
        _, c_prev = carry_prev
        _, c = carry
        gates = res
        H = c.shape[-1]
        i, f, g, o = cells_lib.gate_blocks(gates, 4)
        dh, dc_next = dcarry
        tc = jnp.tanh(c)
        dc = dc_next + dh * o * (1 - tc * tc)
        dact = jnp.concatenate([dc * g, dc * c_prev, dc * i, dh * tc], axis=-1)
        scale, offset = cells_lib.gate_constants((0.5, 0.5, 1.0, 0.5), H, gates.dtype)
        u = gates - offset
        dgates = dact * (scale * scale - u * u)
        return (dgates @ params.w_hh, dc * f), dgates, dgates


@dataclasses.dataclass(frozen=True)
class LSTMPerGate(LSTM):
    """The chosen LSTM with one (B,H)x(H,H) product per gate in the step."""

    def step(self, params, carry, xp):
        h_prev, c_prev = carry
        blocks = [h_prev @ w.T for w in jnp.split(params.w_hh, 4, axis=0)]
        pre = xp + jnp.concatenate(blocks, axis=-1)
        return _one_tanh_lstm(pre, c_prev, split_gates)


@dataclasses.dataclass(frozen=True)
class GRUOneTanh(GRU):
    """The GRU written like the chosen LSTM: r, z in one tanh, whole-array derivatives."""

    def step(self, params, carry, xp):
        (h_prev,) = carry
        H = h_prev.shape[-1]
        gh = self.recurrent_preactivation(params, h_prev)
        x_rz, xn = jnp.split(xp, [2 * H], axis=-1)
        h_rz, hn = jnp.split(gh, [2 * H], axis=-1)
        rz = 0.5 * jnp.tanh(0.5 * (x_rz + h_rz)) + 0.5  # sigmoid = 1/2 + 1/2 tanh(./2)
        r, z = split_gates(rz, 2)
        n = jnp.tanh(xn + r * hn)
        return (n + z * (h_prev - n),), (jnp.concatenate([rz, n], axis=-1), hn)

    def backward_step(self, params, carry_prev, carry, res, dcarry):
        (h_prev,) = carry_prev
        rzn, hn = res
        H = hn.shape[-1]
        r, z, n = cells_lib.gate_blocks(rzn, 3)
        (dh,) = dcarry
        dn, dz = dh * (1 - z), dh * (h_prev - n)
        dan = dn * (1 - n * n)
        scale, offset = cells_lib.gate_constants((0.5, 0.5, 1.0), H, rzn.dtype)
        u = rzn - offset
        dgi = jnp.concatenate([dan * hn, dz, dn], axis=-1) * (scale * scale - u * u)
        dgh = dgi * jnp.concatenate([jnp.ones_like(rzn[..., :2 * H]), r], axis=-1)
        return (dh * z + dgh @ params.w_hh,), dgi, dgh


@dataclasses.dataclass(frozen=True)
class GRUSlices(GRU):
    """The library's GRU with basic slices instead of ``jnp.split`` in the step."""

    def step(self, params, carry, xp):
        (h_prev,) = carry
        H = h_prev.shape[-1]
        gh = self.recurrent_preactivation(params, h_prev)
        r = jax.nn.sigmoid(xp[:, :H] + gh[:, :H])
        z = jax.nn.sigmoid(xp[:, H:2 * H] + gh[:, H:2 * H])
        hn = gh[:, 2 * H:]
        n = jnp.tanh(xp[:, 2 * H:] + r * hn)
        return ((1 - z) * n + z * h_prev,), (jnp.concatenate([r, z, n], axis=-1), hn)


# --- the generic scan's choices, each undone by swapping one helper while tracing --

def _folded_sum_outer(dg, a):
    """``sum_outer`` before issue #10: the transposes left to XLA."""
    return jax.lax.dot_general(a, dg, (((0, 1), (0, 1)), ((), ()))).T


def _bias_in_product(dg, a, bias):
    """The bias gradient as the last column of the weight-gradient product (not chosen).

    ``scan.sum_outer`` with a row of ones appended to the transposed ``a`` inside the
    transpose it makes anyway, so ``dg`` is read by the product alone.
    """
    if bias is None:
        return scan_lib.sum_outer(dg, a), None
    a_t = jnp.transpose(a, (2, 0, 1))  # (K, T, B)
    a_t = jnp.concatenate([a_t, jnp.ones((1,) + a_t.shape[1:], a.dtype)])  # (K+1, T, B)
    a_t = jax.lax.optimization_barrier(a_t)
    prod = jax.lax.dot_general(a_t, dg, (((1, 2), (0, 1)), ((), ())))  # (K+1, G)
    prod = jax.lax.optimization_barrier(prod).T
    return prod[:, :-1], prod[:, -1]


SCAN_UNDO = {  # variant -> {scan module attribute: replacement}
    "w_hh_in_loop": {"_loop_params": lambda params: (lambda: params)},
    "stacked_residuals": {"_inplace_index": lambda *args: None},
    "stacked_dgi": {"_dgi_over_dhs": lambda *args: False,
                    "dgi_over_residual": lambda *args: None},
    "folded_sum_outer": {"sum_outer": _folded_sum_outer},
}
SCAN_ALTERNATIVES = {  # measured, not chosen (not part of ``head``): variant -> swaps
    "bias_in_product": {"_weight_and_bias": _bias_in_product},
    "unroll_2": {"UNROLL": 2},  # lax.scan(unroll=2) in the forward and the reverse scan
    "unroll_4": {"UNROLL": 4},
    "sum_outer_flat": {"sum_outer": weight_gradient.flat_outer},
    "sum_outer_chunks": {"sum_outer": functools.partial(weight_gradient.chunked_outer,
                                                        chunks=10)},
}

CELL_VARIANTS = {
    "elman": {},
    "lstm": {"split": LSTMSplit, "slices": LSTMSlices, "store_tanh_c": LSTMStoreTanhC,
             "four_products": LSTMFourProducts, "per_gate_products": LSTMPerGate},
    "gru": {"one_tanh": GRUOneTanh, "slices": GRUSlices},
}
HEAD_CELL = {"elman": Elman, "lstm": LSTMSplit, "gru": GRU}  # the GRU's step is unchanged


def variants_of(cell: str) -> dict[str, tuple[type, dict]]:
    """Every variant of ``cell``: name -> (cell class, scan helpers to swap)."""
    base = {"elman": Elman, "lstm": LSTM, "gru": GRU}[cell]
    out = {"chosen": (base, {})}
    out.update({name: (cls, {}) for name, cls in CELL_VARIANTS[cell].items()})
    for name, undo in SCAN_UNDO.items():
        if name == "stacked_residuals" and cell == "elman":
            continue  # Elman stores no residual
        out[name] = (base, undo)
    out.update({name: (base, swaps) for name, swaps in SCAN_ALTERNATIVES.items()})
    out["head"] = (HEAD_CELL[cell], {k: v for u in SCAN_UNDO.values() for k, v in u.items()})
    return out


@contextlib.contextmanager
def swapped(undo: dict):
    """Replaces attributes of ``jaxrnn._src.scan`` while a function is traced."""
    saved = {k: getattr(scan_lib, k) for k in undo}
    try:
        for k, v in undo.items():
            setattr(scan_lib, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(scan_lib, k, v)


def loop_ops(hlo: str) -> list[int]:
    """Number of operations in each compiled ``while`` body (bookkeeping ops excluded)."""
    comps, cur = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if m:
            cur = comps.setdefault(m.group(1), [])
            continue
        if line.startswith("}"):
            cur = None
        elif cur is not None:
            op = re.search(r"= (?:\([^)]*\)|\S+) ([\w\-]+)\(", line)
            if op and op.group(1) not in ("get-tuple-element", "tuple", "bitcast",
                                          "constant", "parameter"):
                cur.append(op.group(1))
    bodies = re.findall(r"while\(.*?body=%([\w.\-]+)", hlo)
    return [len(comps.get(b, [])) for b in bodies]


# --- one grid point --------------------------------------------------------------

def _problem(cell: str, T: int, B: int, H: int, seed: int):
    G = {"elman": 1, "lstm": 4, "gru": 3}[cell]
    D = max(1, H // 4)
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(H)
    u = lambda *s: jnp.asarray(rng.uniform(-bound, bound, s), jnp.float32)  # noqa: E731
    params = CellParams(u(G * H, D), u(G * H, H), u(G * H), u(G * H))
    xs = jnp.asarray(rng.standard_normal((T, B, D)), jnp.float32)
    w_y = u(D, H)
    return params, xs, w_y


def _functions(cell_obj, params, xs, w_y, measures):
    carry0 = cell_obj.zero_carry(xs.shape[1], params.w_hh.shape[1])

    def loss(method):
        def f(p, xs):
            hs, _ = scan_lib.layer(cell_obj, p, xs, carry0, None, method)
            return jnp.mean((hs @ w_y.T) ** 2)  # a readout and a loss on every step
        return jax.value_and_grad(f)

    def fwd(p, xs):
        hs, carry_T, trace = scan_lib.forward_scan(cell_obj, p, xs, carry0)
        return hs, carry_T, trace

    out = {"fwd": fwd, "bptt": loss("bptt"), "autodiff": loss("autodiff")}
    return {m: out[m] for m in measures}


def _changes_forward(name: str) -> bool:
    return name in ("chosen", "head", "split", "slices", "per_gate_products", "one_tanh",
                    "w_hh_in_loop", "store_tanh_c", "unroll_2", "unroll_4")


def bench_point(cell: str, T: int, B: int, H: int, settings: Settings) -> list[dict]:
    params, xs, w_y = _problem(cell, T, B, H, settings.seed)
    variants = variants_of(cell)
    if settings.variants is not None:
        variants = {k: v for k, v in variants.items() if k in settings.variants}
    compiled, rows = {}, {}
    reference = None
    for name, (cls, undo) in variants.items():
        measures = [m for m in settings.measures
                    if m != "autodiff" or _changes_forward(name)]
        row = {"cell": cell, "T": T, "B": B, "H": H, "variant": name}
        with swapped(undo):
            fns = _functions(cls(), params, xs, w_y, measures)
            for m, fn in fns.items():
                compiled[(name, m)] = jax.jit(fn).lower(params, xs).compile()
            if "bptt" in fns:
                row["loop_ops"] = loop_ops(compiled[(name, "bptt")].as_text())
        if "bptt" in fns:
            value, grads = compiled[(name, "bptt")](params, xs)
            if reference is None:
                reference = grads
            row["max_rel_diff"] = max(
                float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)))
        rows[name] = row
    ms = _interleaved(compiled, {k: (params, xs) for k in compiled}, settings.rounds,
                      settings.budget_s)
    for (name, m), t in ms.items():
        rows[name][f"{m}_ms"] = t
    chosen = rows.get("chosen", {})
    for row in rows.values():
        for m in settings.measures:
            if f"{m}_ms" in row and f"{m}_ms" in chosen:
                row[f"{m}_vs_chosen"] = row[f"{m}_ms"] / chosen[f"{m}_ms"]
    return list(rows.values())


def _interleaved(compiled: dict, args: dict, rounds: int, budget_s: float) -> dict:
    """Median ms of each compiled function, timed round-robin (order rotated)."""
    keys = list(compiled)
    last = {}
    for k in keys:
        jax.block_until_ready(compiled[k](*args[k]))
        t0 = time.perf_counter()
        jax.block_until_ready(compiled[k](*args[k]))
        last[k] = time.perf_counter() - t0
    n = {k: max(3, min(rounds, int(budget_s / max(last[k], 1e-9)))) for k in keys}
    times = {k: [] for k in keys}
    for r in range(max(n.values())):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            if len(times[k]) < n[k]:
                t0 = time.perf_counter()
                jax.block_until_ready(compiled[k](*args[k]))
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def bidirectional_point(cell: str, T: int, B: int, H: int, settings: Settings) -> list[dict]:
    """Both directions of a bidirectional layer: two scans (the library) or one vmapped scan.

    ``one_scan`` stacks the two directions' parameters and inputs along a leading
    axis and ``jax.vmap``s the layer over it, so each step does one batched
    product ``(2, B, H) x (2, H, G*H)`` instead of two.
    """
    p_f, xs, w_y = _problem(cell, T, B, H, settings.seed)
    p_b, _, _ = _problem(cell, T, B, H, settings.seed + 1)
    cell_obj = {"elman": Elman, "lstm": LSTM, "gru": GRU}[cell]()
    carry0 = cell_obj.zero_carry(B, H)

    def run_layer(p, x):
        return scan_lib.layer(cell_obj, p, x, carry0, None, "bptt")[0]

    def two(pf, pb, xs):
        hf, hb = run_layer(pf, xs), run_layer(pb, xs[::-1])[::-1]
        return jnp.mean((hf @ w_y.T) ** 2) + jnp.mean((hb @ w_y.T) ** 2)

    def one(pf, pb, xs):
        p2 = jax.tree.map(lambda a, b: jnp.stack([a, b]), pf, pb)
        hs = jax.vmap(run_layer)(p2, jnp.stack([xs, xs[::-1]]))
        hf, hb = hs[0], hs[1][::-1]
        return jnp.mean((hf @ w_y.T) ** 2) + jnp.mean((hb @ w_y.T) ** 2)

    fns = {"two_scans": two, "one_vmapped_scan": one}
    compiled = {k: jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(p_f, p_b, xs).compile()
                for k, f in fns.items()}
    args = {k: (p_f, p_b, xs) for k in compiled}
    (_, g2), (_, g1) = (compiled[k](*args[k]) for k in ("two_scans", "one_vmapped_scan"))
    diff = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
               for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)))
    ms = _interleaved(compiled, args, settings.rounds, settings.budget_s)
    return [{"cell": cell, "T": T, "B": B, "H": H, "variant": k, "bptt_ms": ms[k],
             "bptt_vs_two_scans": ms[k] / ms["two_scans"], "max_rel_diff": diff,
             "loop_ops": loop_ops(compiled[k].as_text())} for k in fns]


# --- outputs ---------------------------------------------------------------------------

def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def markdown(rows: list[dict], settings: Settings) -> str:
    head = ("| cell | T | B | H | variant | fwd ms | bptt ms | autodiff ms | fwd / chosen "
            "| bptt / chosen | autodiff / chosen | loop ops (fwd, rev) | grad diff |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['T']} | {r['B']} | {r['H']} | {r['variant']} "
            f"| {_f(r.get('fwd_ms'))} | {_f(r.get('bptt_ms'))} | {_f(r.get('autodiff_ms'))} "
            f"| {_f(r.get('fwd_vs_chosen'))} | {_f(r.get('bptt_vs_chosen'))} "
            f"| {_f(r.get('autodiff_vs_chosen'))} "
            f"| {', '.join(map(str, r.get('loop_ops', []))) or '-'} "
            f"| {_f(r.get('max_rel_diff'), '{:.1e}')} |")
    lines += ["", f"Medians of up to {settings.rounds} interleaved rounds per grid point "
              f"(fewer where they would exceed {settings.budget_s:g} s); one layer, float32, "
              "input size H/4, loss = mean((h W_y^T)^2) over every step. `/ chosen` > 1: "
              "slower than the library's formulation. `grad diff`: max relative "
              "difference of the variant's gradients from `chosen`'s (float32)."]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    plt = common.pyplot()
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    fig, axes = plt.subplots(1, len(cells), figsize=(5.2 * len(cells), 4.6), squeeze=False)
    for ax, cell in zip(axes[0], cells):
        rs = [r for r in rows if r["cell"] == cell and r.get("bptt_vs_chosen")]
        points = list(dict.fromkeys((r["T"], r["B"], r["H"]) for r in rs))
        names = list(dict.fromkeys(r["variant"] for r in rs))
        width = 0.8 / max(1, len(points))
        for j, pt in enumerate(points):
            vals = [next((r["bptt_vs_chosen"] for r in rs if (r["T"], r["B"], r["H"]) == pt
                          and r["variant"] == n), np.nan) for n in names]
            ax.barh(np.arange(len(names)) + (j - (len(points) - 1) / 2) * width, vals, width,
                    label=f"T={pt[0]} B={pt[1]} H={pt[2]}")
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_yticks(np.arange(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.set_xlabel("bptt step time / chosen's (> 1: slower)")
        ax.set_title(cell)
        ax.grid(True, axis="x", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("One layer's loss + gradient (handwritten BPTT): each formulation "
                 "against the library's", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(settings: Settings, out: Path, progress: bool, variants: str | None = None) -> dict:
    from tqdm.auto import tqdm

    if variants is not None:  # --variants a,b: those variants only
        names = tuple(v for v in variants.split(",") if v)
        known = set().union(*(variants_of(c) for c in settings.cells))
        unknown = [v for v in names if v not in known]
        if unknown or not names:
            raise common.UsageError(f"--variants: unknown variant(s) {unknown or [variants]}; "
                                    f"known: {', '.join(sorted(known))}")
        settings = dataclasses.replace(settings, variants=names, bidirectional=None)

    jobs = [(c, *g) for c in settings.cells for g in settings.grid]
    rows = []
    for cell, T, B, H in tqdm(jobs, desc="step formulations", disable=not progress):
        rows.extend(bench_point(cell, T, B, H, settings))
    bidir = []
    if settings.bidirectional:
        T, B, H = settings.bidirectional
        for cell in tqdm(settings.cells, desc="bidirectional", disable=not progress):
            bidir.extend(bidirectional_point(cell, T, B, H, settings))
    (out / "step_formulations.md").write_text(markdown(rows, settings) + bidir_markdown(bidir))
    chart(rows, out / "step_formulations.png")
    return {"rows": rows, "bidirectional": bidir, "cpu": common.versions()}


def bidir_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["", "Both directions of a bidirectional layer (bptt, loss + gradient of both):", "",
             "| cell | T | B | H | variant | bptt ms | / two scans | loop ops | grad diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['T']} | {r['B']} | {r['H']} | {r['variant']} "
                     f"| {r['bptt_ms']:.2f} | {r['bptt_vs_two_scans']:.2f} "
                     f"| {', '.join(map(str, r['loop_ops']))} | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines) + "\n"


OPTIONS = (common.Option("--variants", {"default": None, "help": (
    "comma-separated variant names to time (e.g. chosen,unroll_2), without the "
    "bidirectional table; default: every variant")}),)

if __name__ == "__main__":
    sys.exit(common.main("step_formulations", __doc__, FULL, QUICK, run, options=OPTIONS))
