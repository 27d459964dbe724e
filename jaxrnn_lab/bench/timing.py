"""Timing: interleaved round-robin runs of several contenders, and their summary statistics."""

from __future__ import annotations

import gc
import statistics
import time

from jaxrnn_lab.bench.contenders import Contender


def budget_repeats(repeats: int, budget_s: float, step_s: float) -> int:
    """Timed runs of a contender whose run takes ``step_s``: ``repeats``, fewer if over budget.

    A contender whose ``repeats`` runs would take over ``budget_s`` seconds gets
    ``budget_s / step_s`` of them, but at least ``min(3, repeats)``.
    """
    return max(min(3, repeats), min(repeats, int(budget_s / max(step_s, 1e-12))))


def settle(max_s: float = 1.0, slice_s: float = 0.002, busy: float = 0.25) -> float:
    """Sleeps until this process's threads stop burning CPU (at most ``max_s``); the seconds slept.

    A thread pool spin-waits for more work after a call: after a multi-threaded
    matrix product one OpenBLAS thread (numpy's) spun for ~0.13 s and PyTorch's
    OpenMP threads for ~0.01 s on 2 cores, taking a core from whatever runs next.
    This waits, in slices of ``slice_s``, until the process uses less than
    ``busy`` cores.
    """
    t_start = time.perf_counter()
    while True:
        t0, c0 = time.perf_counter(), time.process_time()
        time.sleep(slice_s)
        t1 = time.perf_counter()
        if (time.process_time() - c0) / (t1 - t0) < busy or t1 - t_start > max_s:
            return t1 - t_start


def time_round_robin(contenders: list[Contender], repeats: dict[str, int],
                     collect: bool = True) -> dict[str, list[float]]:
    """Seconds per run of each contender: one run each per round, order rotated.

    The garbage collector is off while a run is timed; each run blocks on its
    results before the clock stops (``Contender.run`` does).

    Args:
        contenders: what to time.
        repeats: timed runs per contender name; one that has its count sits out
            the remaining rounds.
        collect: run the garbage collector before every round, off the clock
            (a full collection takes ~0.1 s with jax and torch loaded: too long
            for runs of a millisecond, which the collector cannot disturb anyway).

    Returns:
        ``{name: [seconds of each run, in order]}``.
    """
    times = {c.name: [] for c in contenders}
    n = len(contenders)
    for r in range(max(repeats.values())):
        if collect:
            gc.collect()
        for c in contenders[r % n:] + contenders[:r % n]:
            if len(times[c.name]) >= repeats[c.name]:
                continue
            if c.before:
                c.before()
            gc.disable()
            t0 = time.perf_counter()
            c.run()  # blocks until the step's results are ready
            dt = time.perf_counter() - t0
            gc.enable()
            times[c.name].append(dt)
    return times


def summarize(seconds: list[float]) -> dict:
    """Median, minimum and quartiles (ms) of some run times (s), with every time (ms)."""
    ms = sorted(s * 1e3 for s in seconds)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "q1_ms": q[0],
            "q3_ms": q[2], "repeats": len(ms), "times_ms": [s * 1e3 for s in seconds]}
