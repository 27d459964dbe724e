r"""The gradient estimators' per-step time and memory against the hidden size H (#23).

Each forward-in-time estimator (``jaxrnn.estimators``: ``rtrl``, ``snap1``,
``snap2``, ``uoro``, ``kf_rtrl``, ``rflo``, ``eprop``) updates its own state at every
step of the network and reads out that step's gradient term. This script times
that online work on a one-layer leaky RNN (``jaxrnn.Leaky``, alpha 0.5; D and O
small, so that the recurrence dominates) at each H of a grid, with the handwritten
BPTT as the reference (``model.loss_and_grad(method="bptt")`` over the same T
steps; per step = time / T):

* **time**: one jitted ``jaxrnn.estimators.run_chunk`` over T steps (the network's
  step, the estimator's update and read-out at every step, the estimator's state
  given and returned as in online training), warmed up, median over rounds in which
  the methods run interleaved (order rotated), divided by T;
* **memory**: XLA's buffer assignment of that compiled chunk
  (``Compiled.memory_analysis()``: argument + output - alias + temp, as the
  benchmark's ``xla_memory``), beside the estimator's own prediction ``cost()``:
  its state's elements and its multiplies per step.

A point whose predicted state exceeds the library's limit
(``jaxrnn.estimators.MAX_STATE_ELEMENTS``) or whose predicted multiplies per step
exceed ``Settings.max_step_multiplies`` (the time budget: RTRL and the dense SnAp-2
grow as H^4) is skipped, and the JSON says why. The slope of log time (and of log
memory) against log H is fitted per method over its largest measured H points.

Commands::

    python -m jaxrnn_lab.perf.estimator_cost --quick --out /tmp/ec   # seconds
    python -m jaxrnn_lab.perf.estimator_cost                  # docs/experiments/estimator_cost

Writes ``estimator_cost.json``, ``estimator_cost.md`` and one figure per batch size,
``estimator_cost_B<B>.png``; compare within one run only.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxrnn
from jaxrnn import estimators
from jaxrnn_lab import harness as common
from jaxrnn_lab.bench.contenders import xla_memory
from jaxrnn_lab.bench.environment import cpu_model, cpu_pressure, load_average

METHODS = ("bptt", "rtrl", "snap1", "snap2", "uoro", "kf_rtrl", "rflo", "eprop")

# The per-step multiplies each method's update grows with, as implemented (the
# exponent of H with D, O fixed); the figure draws these as dashed guides. SnAp-1,
# e-prop and RFLO update n/H = D + H + 2 directions of B H elementwise work each,
# O(H^2) per step as published (snap.unit_parallel_update).
THEORY_SLOPE = {"bptt": 2, "rtrl": 4, "snap1": 2, "snap2": 4, "uoro": 2, "kf_rtrl": 3,
                "rflo": 2, "eprop": 2}


@dataclasses.dataclass(frozen=True)
class Settings:
    hidden_sizes: tuple = (8, 16, 32, 64, 128, 256)
    batches: tuple = (1, 8)  # 1: the online setting
    steps: int = 50  # T of one timed chunk
    input_size: int = 2  # D
    output_size: int = 2  # O
    alpha: float = 0.5  # the leaky cell's leak
    rounds: int = 5  # interleaved rounds; each times every method (the rounds' median counts)
    min_round_s: float = 0.05  # calls per method and round: enough to take about this long
    max_step_multiplies: float = 2e9  # skip points predicted above this (the time budget)
    fit_points: int = 3  # the slope is fitted over each method's largest this many H
    seed: int = 0


FULL = Settings()
QUICK = Settings(hidden_sizes=(4, 8), batches=(1,), steps=5, rounds=2, min_round_s=0.0,
                 fit_points=2)


def make_model(settings: Settings, H: int) -> jaxrnn.RNN:
    """The one-layer leaky RNN of the grid at hidden size H."""
    return jaxrnn.RNN(cell=jaxrnn.Leaky(alpha=settings.alpha), input_size=settings.input_size,
                      hidden_size=H, output_size=settings.output_size)


def chunk_fn(estimator, model: jaxrnn.RNN, T: int, B: int):
    """``f(layers, readout, xs, targets, state, key) -> ChunkResult``: T online steps.

    The network starts from zero carries; the estimator's state is an argument and
    is returned (as ``make_online_step`` carries it), so its size shows in XLA's
    argument and output buffers.
    """
    cell, H = model.cell_fn, model.hidden_size
    carries0 = [(jnp.zeros((B, H), jnp.float32),)]
    valid = jnp.ones((T, B), bool)  # every step runs and is scored
    div = jnp.ones((), jnp.float32)  # half_sse divides by 1

    def f(layers, readout, xs, targets, state, key):
        return estimators.run_chunk(estimator, cell, layers, readout, "half_sse", xs, targets,
                                    carries0, valid, valid, div, state, key)

    return jax.jit(f)


def contenders(settings: Settings, H: int, B: int) -> tuple[dict, dict]:
    """The methods' ``(args, jitted f)`` at (H, B) and the skipped ones with the reason.

    Returns:
        ``(runs, skipped)``: ``runs[method] = (f, args, predicted)``, ``predicted``
        the estimator's ``cost()`` (None for bptt); ``skipped[method] = reason``.
    """
    T, D, O = settings.steps, settings.input_size, settings.output_size
    model = make_model(settings, H)
    k_init, k_x, k_y, k_est = jax.random.split(jax.random.key(settings.seed), 4)
    params = model.init(k_init)
    xs = jax.random.normal(k_x, (T, B, D), jnp.float32)
    targets = jax.random.normal(k_y, (T, B, O), jnp.float32)
    layers = tuple(p for (p,) in params.layers)
    readout = estimators.Readout(params.readout.weight, params.readout.bias)
    carries0 = [(jnp.zeros((B, H), jnp.float32),)]
    bptt = jax.jit(lambda p, x, y: model.loss_and_grad(p, x, y, method="bptt"))
    runs, skipped = {"bptt": (bptt, (params, xs, targets), None)}, {}
    for method in METHODS[1:]:
        est = estimators.get_estimator(method)
        cost = est.cost(model.cell_fn, layers, B)
        if cost.state + cost.work > estimators.MAX_STATE_ELEMENTS:
            skipped[method] = (f"predicted state + work {cost.state + cost.work:.3g} elements > "
                               f"the library's limit {estimators.MAX_STATE_ELEMENTS:.3g}")
            continue
        if cost.flops > settings.max_step_multiplies:
            skipped[method] = (f"predicted {cost.flops:.3g} multiplies per step > the time "
                               f"budget {settings.max_step_multiplies:.3g}")
            continue
        k0, k1 = jax.random.split(jax.random.fold_in(k_est, METHODS.index(method)))
        state = est.init(model.cell_fn, layers, carries0, k0)
        runs[method] = (chunk_fn(est, model, T, B), (layers, readout, xs, targets, state, k1),
                        cost)
    return runs, skipped


def time_calls(f, args, calls: int) -> float:
    """The median seconds of ``calls`` calls of ``f(*args)``, each waited for."""
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure_point(settings: Settings, H: int, B: int) -> dict:
    """Every method at (H, B): compiled memory, then the per-step time, interleaved."""
    load_start = load_average()
    runs, skipped = contenders(settings, H, B)
    rows, calls = {}, {}
    for method, (f, args, cost) in runs.items():
        t0 = time.perf_counter()
        compiled = f.lower(*args).compile()  # timed below as it is: one compile
        compile_s = time.perf_counter() - t0
        runs[method] = (compiled, args, cost)
        first = time_calls(compiled, args, 2)  # warm up (first touch), and the call's length
        calls[method] = max(1, math.ceil(settings.min_round_s / max(first, 1e-6)))
        rows[method] = {"memory": xla_memory(compiled), "compile_s": compile_s,
                        "predicted": None if cost is None else {
                            "state_elements": cost.state, "work_elements": cost.work,
                            "step_multiplies": cost.flops, "formula": cost.formula}}
    times = {m: [] for m in runs}
    order = list(runs)
    for r in range(settings.rounds):
        for method in order[r % len(order):] + order[:r % len(order)]:
            f, args, _ = runs[method]
            times[method].append(time_calls(f, args, calls[method]))
    for method, row in rows.items():
        row["step_us"] = statistics.median(times[method]) / settings.steps * 1e6
        row["calls_per_round"] = calls[method]
    return {"H": H, "B": B, "T": settings.steps, "methods": rows, "skipped": skipped,
            "load": {"start": load_start, "end": load_average()}}


def fit_slope(hs, ys) -> float | None:
    """The least-squares slope of log y against log H (None under two points)."""
    if len(hs) < 2:
        return None
    return float(np.polyfit(np.log(hs), np.log(ys), 1)[0])


def slopes(points: list[dict], fit_points: int) -> dict:
    """Per batch and method: the slopes of time, XLA's peak bytes and ``cost()`` vs H.

    Each over the method's largest ``fit_points`` measured H.
    """
    out = {}
    for B in sorted({p["B"] for p in points}):
        out[B] = {}
        for method in METHODS:
            pts = [p for p in points if p["B"] == B and method in p["methods"]][-fit_points:]
            hs = [p["H"] for p in pts]
            rows = [p["methods"][method] for p in pts]
            pred = [r["predicted"] for r in rows]
            out[B][method] = {
                "H": hs, "theory": THEORY_SLOPE[method],
                "time": fit_slope(hs, [r["step_us"] for r in rows]),
                "peak_bytes": fit_slope(hs, [r["memory"]["peak_bytes"] for r in rows]),
                "temp_bytes": fit_slope(hs, [max(r["memory"]["temp_size_in_bytes"], 1)
                                             for r in rows]),
                "predicted_multiplies": None if None in pred else fit_slope(
                    hs, [c["step_multiplies"] for c in pred]),
                "predicted_state": None if None in pred else fit_slope(
                    hs, [c["state_elements"] for c in pred])}
    return out


def _fmt(x, unit: float = 1.0) -> str:
    return "-" if x is None else f"{x / unit:.3g}"


def markdown(points: list[dict], fits: dict) -> str:
    """The per-step time and memory table per (B, H, method), then the fitted slopes."""
    head = ("| B | H | method | us per step | XLA peak MB | XLA temp MB | "
            "predicted state elements | predicted work elements | predicted multiplies per step |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in points:
        for method in METHODS:
            if method in p["skipped"]:
                lines.append(f"| {p['B']} | {p['H']} | {method} | skipped: "
                             f"{p['skipped'][method]} | | | | | |")
                continue
            r = p["methods"][method]
            pred = r["predicted"] or {}
            lines.append(
                f"| {p['B']} | {p['H']} | {method} | {r['step_us']:.3g} | "
                f"{_fmt(r['memory']['peak_bytes'], 1e6)} | "
                f"{_fmt(r['memory']['temp_size_in_bytes'], 1e6)} | "
                f"{_fmt(pred.get('state_elements'))} | {_fmt(pred.get('work_elements'))} | "
                f"{_fmt(pred.get('step_multiplies'))} |")
    lines += ["", "| B | method | H fitted | time slope | theory (as implemented) | "
                  "cost() multiplies slope | XLA peak slope | cost() state slope |",
              "|---|---|---|---|---|---|---|---|"]
    for B, per in fits.items():
        for method, s in per.items():
            lines.append(f"| {B} | {method} | {', '.join(map(str, s['H']))} | "
                         f"{_fmt(s['time'])} | {s['theory']} | "
                         f"{_fmt(s['predicted_multiplies'])} | {_fmt(s['peak_bytes'])} | "
                         f"{_fmt(s['predicted_state'])} |")
    return "\n".join(lines) + "\n"


def plot(points: list[dict], B: int, T: int, fit_points: int, path: Path) -> None:
    """Log-log per-step time and XLA peak memory against H.

    Dashed on the time panel: each method's slope as implemented, through its largest
    point, over the ``fit_points`` largest H; dotted on the memory panel: ``cost()``'s
    state + work elements in float32 bytes.
    """
    plt = common.pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.get_cmap("tab10")
    for i, method in enumerate(METHODS):
        pts = [p for p in points if p["B"] == B and method in p["methods"]]
        if not pts:
            continue
        hs = np.array([p["H"] for p in pts], float)
        us = np.array([p["methods"][method]["step_us"] for p in pts])
        mb = np.array([p["methods"][method]["memory"]["peak_bytes"] / 1e6 for p in pts])
        c = colors(i)
        ax_t.plot(hs, us, "o-", color=c, label=method)
        ax_m.plot(hs, mb, "o-", color=c, label=method)
        k, g = THEORY_SLOPE[method], hs[-fit_points:]  # the guide: H^k through the largest point
        ax_t.plot(g, us[-1] * (g / g[-1]) ** k, "--", color=c, alpha=0.6, lw=1.5)
        pred = [p["methods"][method]["predicted"] for p in pts]
        if None not in pred:
            ax_m.plot(hs, [4e-6 * (c_["state_elements"] + c_["work_elements"]) for c_ in pred],
                      ":", color=c, alpha=0.6)
    ax_t.set(xscale="log", yscale="log", xlabel="H", ylabel="microseconds per step",
             title=f"time per step (B={B}; dashed: H^k as implemented)")
    ax_m.set(xscale="log", yscale="log", xlabel="H", ylabel="MB",
             title=f"XLA peak memory of a {T}-step chunk (B={B}; dotted: cost())")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(settings: Settings, out: Path, progress: bool) -> dict:
    from tqdm.auto import tqdm

    pressure, load = cpu_pressure(), load_average()
    grid = [(H, B) for B in settings.batches for H in settings.hidden_sizes]
    points = [measure_point(settings, H, B)
              for H, B in tqdm(grid, desc="estimator cost", disable=not progress)]
    fits = slopes(points, settings.fit_points)
    (out / "estimator_cost.md").write_text(markdown(points, fits))
    for B in settings.batches:
        plot(points, B, settings.steps, settings.fit_points, out / f"estimator_cost_B{B}.png")
    return {"points": points, "slopes": fits, "theory_slopes": THEORY_SLOPE,
            "jax": jax.__version__, "jaxlib": jax.lib.__version__,
            "cpu": cpu_model(), "cpu_pressure": {"start": pressure, "end": cpu_pressure()},
            "load_average": {"start": load, "end": load_average()}}


if __name__ == "__main__":
    sys.exit(common.main("estimator_cost", __doc__, FULL, QUICK, run))
