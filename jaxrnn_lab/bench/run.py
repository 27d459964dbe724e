"""The run: every contender and the product floor at every grid point, in one process."""

from __future__ import annotations

import dataclasses
import time
import warnings

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import jaxrnn
from jaxrnn_lab.bench.contenders import (flax_contender, init_params, jaxrnn_contender,
                                         torch_contender)
from jaxrnn_lab.bench.environment import (cpu_pressure, environment, jax_threads, load_average,
                                          torch_module)
from jaxrnn_lab.bench.floor import KERNELS, product_floor, xla_chain_contender
from jaxrnn_lab.bench.report import ratios
from jaxrnn_lab.bench.settings import (CELL_VARIANTS, CONTENDERS, METHODS, MIXED_PRECISION,
                                       STEPS, GridPoint, Settings, grid_point)
from jaxrnn_lab.bench.timing import budget_repeats, summarize, time_round_robin


def _as_float(loss) -> float:
    return float(np.asarray(loss.numpy() if hasattr(loss, "numpy") else loss))


def bench_point(cell: str, point: GridPoint, settings: Settings, threads: int) -> dict:
    """Builds, compiles, warms up and times every contender, then the product floor, on one point.

    Args:
        cell: ``"elman"``, ``"lstm"`` or ``"gru"``.
        point: ``(T, B, H, num_layers, bidirectional)`` (or ``(T, B, H)``).
        settings: repeats, warm-up, budget, seed, learning rate.
        threads: the torch contender's threads (XLA:CPU's).

    Returns:
        JSON-ready: the sizes, ``methods[name]`` for every name of ``METHODS``
        (``status``, times in ms, compile time, first-step loss, memory; the
        floor's ``floor_ms`` and ``products``; ``bptt_bf16`` and ``autodiff_bf16``:
        the same steps with ``compute_dtype="bfloat16"``, or "not run" without
        ``settings.bf16``), ``ratios`` and ``wall_s``.
    """
    t_start = time.perf_counter()
    T, B, H, L, bidirectional = grid_point(point)
    D = O = grid_point(point).io_size
    model = jaxrnn.RNN(cell=cell, input_size=D, hidden_size=H, output_size=O, num_layers=L,
                       bidirectional=bidirectional)
    rng = np.random.default_rng(settings.seed)
    params = init_params(model, rng)
    xs = rng.standard_normal((T, B, D), np.float32)
    targets = rng.standard_normal((T, B, O), np.float32)
    batch = jaxrnn.Batch(jnp.asarray(xs), jnp.asarray(targets))

    contenders = [jaxrnn_contender(model, params, batch, m, settings.lr)
                  for m in ("bptt", "autodiff")]
    missing = {}  # contender -> why it did not run
    for name, (method, dtype) in MIXED_PRECISION.items():  # the same weights and data
        if settings.bf16:
            mixed = dataclasses.replace(model, compute_dtype=dtype)
            contenders.append(jaxrnn_contender(mixed, params, batch, method, settings.lr, name))
        else:
            missing[name] = "not run"
    if torch_module() is None:
        missing["torch"] = missing["torch_1t"] = "not installed"
    else:
        contenders.append(torch_contender(model, params, xs, targets, settings.lr, threads,
                                          settings.torch_memory))
        if settings.torch_single_thread:
            contenders.append(torch_contender(model, params, xs, targets, settings.lr, 1,
                                              False, name="torch_1t"))  # same memory as torch
        else:
            missing["torch_1t"] = "not run"
    flax_c = flax_contender(model, params, batch, settings.lr)
    if flax_c is None:
        missing["flax"] = "not installed"
    else:
        contenders.append(flax_c)
    contenders.append(xla_chain_contender(model, params, batch))

    results: dict[str, dict] = {}
    for c in contenders:  # warm-up: untimed; the first step's loss is the sanity check
        for i in range(settings.warmup):
            if c.before:
                c.before()
            t0 = time.perf_counter()
            loss = c.run()
            c.info["last_step_s"] = time.perf_counter() - t0
            if i == 0:
                c.info["first_step_s"] = time.perf_counter() - t0
                if c.name in STEPS:
                    c.info["first_loss"] = _as_float(loss)
    # A contender whose steps are so slow that its repeats would exceed the budget
    # gets fewer (at least min(3, repeats)); the JSON records each one's count.
    repeats = {c.name: budget_repeats(settings.repeats, settings.budget_s, c.info["last_step_s"])
               for c in contenders}
    t_timing = time.perf_counter()
    times = time_round_robin(contenders, repeats)
    t_floor = time.perf_counter()
    results["floor"] = product_floor(model, T, B, threads=threads,
                                     repeats=settings.floor_repeats, warmup=settings.warmup,
                                     budget_s=settings.budget_s, seed=settings.seed)
    t_end = time.perf_counter()
    for c in contenders:
        if c.profile:  # after the timing, so that it cannot disturb it
            if c.before:
                c.before()
            c.info["memory"] = c.profile()
        results[c.name] = {"status": "ok", **summarize(times[c.name]), **c.info}
    results.update({name: {"status": why} for name, why in missing.items()})
    results = {name: results[name] for name in METHODS}  # the table's order

    out = {"cell": cell, "T": T, "B": B, "H": H, "num_layers": L,
           "bidirectional": bidirectional, "input_size": D, "output_size": O,
           "gates": model.cell_fn.num_gates, "methods": results,
           "wall_s": {"setup_and_warmup": t_timing - t_start, "timing": t_floor - t_timing,
                      "floor": t_end - t_floor, "total": time.perf_counter() - t_start}}
    out["ratios"] = ratios(results)
    return out


def bench_variant(name: str, point: GridPoint, settings: Settings) -> dict:
    """Times ``bptt`` against ``autodiff`` for one of ``CELL_VARIANTS`` at one point.

    The model has one layer, input and output size ``H // 4``, ``model.init``'s
    parameters; both steps are compiled, warmed up and timed round-robin as in
    ``bench_point``.

    Returns:
        JSON-ready: ``variant``, the model's options, sizes, ``methods[bptt|autodiff]``
        (times, compile time, first-step loss, memory) and ``bptt_speedup_vs_autodiff``.
    """
    import jax

    t_start = time.perf_counter()
    T, B, H, L, bidirectional = grid_point(point)
    D = O = point.io_size
    options = {k: (H // 4 if v == "H/4" else v) for k, v in CELL_VARIANTS[name].items()}
    model = jaxrnn.RNN(input_size=D, hidden_size=H, output_size=O, num_layers=L,
                       bidirectional=bidirectional, **options)
    rng = np.random.default_rng(settings.seed)
    params = model.init(jax.random.key(settings.seed))
    batch = jaxrnn.Batch(jnp.asarray(rng.standard_normal((T, B, D), np.float32)),
                         jnp.asarray(rng.standard_normal((T, B, O), np.float32)))
    contenders = [jaxrnn_contender(model, params, batch, m, settings.lr)
                  for m in ("bptt", "autodiff")]
    for c in contenders:
        for i in range(settings.warmup):
            t0 = time.perf_counter()
            loss = c.run()
            c.info["last_step_s"] = time.perf_counter() - t0
            if i == 0:
                c.info["first_loss"] = _as_float(loss)
    repeats = {c.name: budget_repeats(settings.repeats, settings.budget_s, c.info["last_step_s"])
               for c in contenders}
    times = time_round_robin(contenders, repeats)
    methods = {c.name: {"status": "ok", **summarize(times[c.name]), **c.info}
               for c in contenders}
    return {"variant": name, "options": options, "T": T, "B": B, "H": H, "num_layers": L,
            "bidirectional": bidirectional, "input_size": D, "output_size": O,
            "methods": methods,
            "bptt_speedup_vs_autodiff": methods["autodiff"]["median_ms"]
            / methods["bptt"]["median_ms"],
            "wall_s": time.perf_counter() - t_start}


def run_benchmark(settings: Settings = Settings(), progress: bool = True) -> dict:
    """Runs the whole grid; returns every number (JSON-ready).

    Returns:
        ``{"settings", "environment", "contenders", "floor_kernels", "results":
        [point, ...], "variants": [...], "cpu_pressure_end", "load_average_end"}``,
        one point per (cell, T, B, H, num_layers, bidirectional), see
        ``bench_point``, and one entry per cell variant, see ``bench_variant``.
    """
    torch = torch_module()
    threads = jax_threads()
    old_threads = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(threads)  # the same number of threads on both sides
    points = [(c, g) for c in settings.cells for g in settings.grid]
    results = []
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            env = environment(threads)
            bar = tqdm(points, desc="benchmark", disable=not progress, dynamic_ncols=True)
            for cell, g in bar:
                bar.set_postfix_str(f"{cell} T={g.T} B={g.B} H={g.H} L={g.num_layers}"
                                    + (" bidirectional" if g.bidirectional else ""))
                results.append(bench_point(cell, g, settings, threads))
            variants = []
            for name in tqdm(settings.variants, desc="cell variants", disable=not progress):
                variants.append(bench_variant(name, settings.variant_point, settings))
    finally:
        if torch:
            torch.set_num_threads(old_threads)
    return {"settings": dataclasses.asdict(settings), "environment": env,
            "contenders": list(CONTENDERS),
            "floor_kernels": [k for k in KERNELS if k != "torch" or torch],
            "results": results, "variants": variants, "cpu_pressure_end": cpu_pressure(),
            "load_average_end": load_average()}
