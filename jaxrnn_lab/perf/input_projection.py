"""The input projection's product: every way of writing it for XLA:CPU against numpy and torch (#10).

The largest single product of an LSTM training step at T=100, B=128, H=512 is the
input projection ``xs (T*B, D) x W_ih^T (D, 4H)``; the benchmark's product floor
found XLA 2.5x slower on it than numpy's OpenBLAS. This script times, at the
benchmark's input-projection shapes, interleaved round-robin in one process per
``XLA_FLAGS`` setting (the flags are read once, at start-up):

* ``x@w.T``: ``xs @ w_ih.T`` on (T, B, D), as ``scan.forward_scan`` writes it;
* ``x@wT``: against a row-major ``(D, 4H)`` copy of ``w_ih`` made beforehand;
* ``flat@wT``: the same on ``xs`` reshaped to ``(T*B, D)``;
* ``per_step``: one ``(B, D) x (D, 4H)`` product per step inside a ``lax.scan``
  (what computing the projection inside the recurrence would cost);
* ``chunks``: ``lax.map`` over chunks of ``chunk`` steps, one product each;
* ``numpy``: ``np.matmul(x, wT, out=...)`` (OpenBLAS); ``torch``: ``F.linear``;
* ``callback``: numpy's product called from inside a jitted function through
  ``jax.pure_callback`` (the one way to put OpenBLAS into jaxrnn's compiled step:
  it pays for handing the arrays to Python and back).

Commands::

    python -m jaxrnn_lab.perf.input_projection --quick --out /tmp/ip     # seconds
    python -m jaxrnn_lab.perf.input_projection                          # docs/experiments/input_projection

Writes ``input_projection.json`` and ``input_projection.md``; compare within a row only.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from jaxrnn_lab import harness as common

FLAG_SETS = (
    "",  # the defaults
    "--xla_cpu_experimental_ynn_fusion_type=",  # YNNPACK off for dots
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_experimental_xnn_fusion_type=dot",
    "--xla_cpu_multi_thread_eigen=false",
)
VARIANTS = ("x@w.T", "x@wT", "flat@wT", "per_step", "chunks", "numpy", "torch", "callback")


@dataclasses.dataclass(frozen=True)
class Settings:
    flag_sets: tuple = FLAG_SETS  # XLA_FLAGS values, one process each
    # (T, B, D, G*H): the input projections of the benchmark's LSTM (100, 128, 512),
    # LSTM (100, 32, 128) and Elman (200, 64, 256) points
    shapes: tuple = ((100, 128, 128, 2048), (100, 32, 32, 512), (200, 64, 64, 256))
    chunk: int = 10  # steps per product in the ``chunks`` variant
    rounds: int = 5  # round-robin rounds; each times every variant ``calls`` times
    calls: int = 3  # calls per variant and round (the round's median counts)
    seed: int = 0


FULL = Settings()
QUICK = Settings(flag_sets=("",), shapes=((10, 4, 8, 32),), chunk=5, rounds=2, calls=2)

# The worker: runs in a fresh process with XLA_FLAGS set; prints one JSON line.
WORKER = r"""
import json, os, statistics, sys, time
import numpy as np, jax, jax.numpy as jnp
shapes, chunk, rounds, calls, seed = json.loads(sys.argv[1])
try:
    import torch
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # as many threads as XLA:CPU
except ImportError:
    torch = None

def median_ms(f):
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3

rows = []
for T, B, D, GH in shapes:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, D), np.float32)
    w = rng.standard_normal((GH, D), np.float32)
    xj, wj = jnp.asarray(x), jnp.asarray(w)
    wtj = jnp.asarray(np.ascontiguousarray(w.T))
    k = chunk if T % chunk == 0 else 1
    fns = {
        "x@w.T": (jax.jit(lambda x, w: x @ w.T), (xj, wj)),
        "x@wT": (jax.jit(lambda x, wt: x @ wt), (xj, wtj)),
        "flat@wT": (jax.jit(lambda x, wt: (x.reshape(-1, D) @ wt).reshape(T, B, GH)), (xj, wtj)),
        "per_step": (jax.jit(lambda x, wt: jax.lax.scan(lambda c, xt: (c, xt @ wt), 0.0, x)[1]),
                     (xj, wtj)),
        "chunks": (jax.jit(lambda x, wt: jax.lax.map(lambda c: c @ wt,
                                                     x.reshape(T // k, k * B, D)).reshape(T, B, GH)),
                   (xj, wtj)),
        "callback": (jax.jit(lambda x, wt: jax.pure_callback(
            lambda x, wt: (np.asarray(x).reshape(-1, D) @ np.asarray(wt)).reshape(T, B, GH),
            jax.ShapeDtypeStruct((T, B, GH), jnp.float32), x, wt)), (xj, wtj)),
    }
    run = {name: (lambda f=f, a=a: f(*a).block_until_ready()) for name, (f, a) in fns.items()}
    x2, wt, out = x.reshape(-1, D), np.ascontiguousarray(w.T), np.empty((T * B, GH), np.float32)
    run["numpy"] = lambda: np.matmul(x2, wt, out=out)
    if torch is not None:
        xt, wtt = torch.from_numpy(x2), torch.from_numpy(w)
        run["torch"] = lambda: torch.nn.functional.linear(xt, wtt)
    ref = x.reshape(-1, D) @ w.T
    for name, (f, a) in fns.items():  # every XLA form computes the same product
        got = np.asarray(f(*a)).reshape(-1, GH)
        assert np.allclose(got, ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max()), name
    for f in run.values():  # warm up (compile, first touch)
        f(); f()
    times = {name: [] for name in run}
    for r in range(rounds):
        order = list(run)[r % len(run):] + list(run)[:r % len(run)]
        for name in order:
            times[name].append(median_ms(run[name]))
    rows.append({"T": T, "B": B, "D": D, "GH": GH,
                 "ms": {n: statistics.median(v) for n, v in times.items()}})
print("RESULT " + json.dumps(rows))
"""


def sweep_one(flags: str, settings: Settings) -> dict:
    arg = [settings.shapes, settings.chunk, settings.rounds, settings.calls, settings.seed]
    return common.run_with_xla_flags(WORKER, arg, flags)


def markdown(results: list[dict]) -> str:
    """One row per (flags, shape): ms per variant, and the best XLA form over numpy."""
    head = ("| XLA_FLAGS | (T, B, D, G*H) | " + " | ".join(f"{v} ms" for v in VARIANTS)
            + " | best XLA / numpy |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        name = f"`{r['flags']}`" if r["flags"] else "(defaults)"
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['status']} |")
            continue
        for row in r["rows"]:
            ms = row["ms"]
            xla = min(ms[v] for v in VARIANTS[:5])
            cells = [f"{ms[v]:.3g}" if v in ms else "-" for v in VARIANTS]
            lines.append(f"| {name} | ({row['T']}, {row['B']}, {row['D']}, {row['GH']}) | "
                         + " | ".join(cells) + f" | {xla / ms['numpy']:.2f} |")
    return "\n".join(lines) + "\n"


def run(settings: Settings, out: Path, progress: bool) -> dict:
    from tqdm.auto import tqdm

    results = [sweep_one(f, settings)
               for f in tqdm(settings.flag_sets, desc="XLA_FLAGS", disable=not progress)]
    (out / "input_projection.md").write_text(markdown(results))
    return {"sweep": results, "cpu_pressure": Path("/proc/pressure/cpu").read_text()
            if Path("/proc/pressure/cpu").exists() else None}


if __name__ == "__main__":
    sys.exit(common.main("input_projection", __doc__, FULL, QUICK, run))
