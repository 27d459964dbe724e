"""Does ``batch_first=True`` cost training time? Its step against the time-major one, interleaved.

A ``batch_first`` model transposes its sequences at the boundary (``xs`` and the
targets in, inside the jitted step) and then runs the same time-major scans. This
script builds, in one process, the benchmark's training step (``RNN`` +
``make_train_step`` + Adam, input and output size H/4, float32, seed 0) twice per
point: time-major on a ``(T, B, D)`` batch and ``batch_first=True`` on the same
batch transposed, and compiles both. Then, round after round, it times ``calls``
steps of one and then of the other, alternating which goes first; the result per
point is the median over rounds of ``batch_first / time_major``.

Commands::

    python -m jaxrnn_lab.perf.batch_first --quick    # seconds: tiny points, 3 rounds
    python -m jaxrnn_lab.perf.batch_first            # LSTM at T=100, B=32, H=128 and T=200, B=64, H=256

Writes ``batch_first.json`` and ``batch_first.md`` under ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxrnn

# (cell, method, T, B, H)
POINTS = (("lstm", "bptt", 100, 32, 128), ("lstm", "bptt", 200, 64, 256))
QUICK_POINTS = (("lstm", "bptt", 20, 4, 16), ("gru", "bptt", 20, 4, 16))


@dataclasses.dataclass(frozen=True)
class Settings:
    points: tuple = POINTS
    rounds: int = 15
    calls: int = 5  # steps per timing; the timing is their median


QUICK = Settings(points=QUICK_POINTS, rounds=3, calls=2)


def build(cell: str, method: str, T: int, B: int, H: int, batch_first: bool):
    """A compiled training step of the benchmark's model, its state and its batch."""
    D = O = max(1, H // 4)
    model = jaxrnn.RNN(cell=cell, input_size=D, hidden_size=H, output_size=O,
                       batch_first=batch_first)
    params = model.init(jax.random.key(0))
    opt = jaxrnn.make_optimizer("adam", 1e-3)
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((T, B, D)), jnp.float32)
    targets = jnp.asarray(rng.standard_normal((T, B, O)), jnp.float32)
    if batch_first:
        xs, targets = jnp.swapaxes(xs, 0, 1), jnp.swapaxes(targets, 0, 1)
    step = jaxrnn.make_train_step(model, opt, method=method, donate=False)
    state = (params, opt.init(params))
    batch = jaxrnn.Batch(xs, targets)
    jax.block_until_ready(step(*state, batch))  # compile
    return step, state, batch


def time_step(built, calls: int) -> float:
    """The median seconds of ``calls`` steps."""
    step, state, batch = built
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(step(*state, batch))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(point, settings: Settings) -> dict:
    """One point: both layouts timed in alternation; the median of per-round ratios."""
    built = {bf: build(*point, batch_first=bf) for bf in (False, True)}
    times = {False: [], True: []}
    for r in range(settings.rounds):
        for bf in ((False, True) if r % 2 == 0 else (True, False)):  # neither always first
            times[bf].append(time_step(built[bf], settings.calls))
    ratios = [b / t for b, t in zip(times[True], times[False])]
    cell, method, T, B, H = point
    return {"cell": cell, "method": method, "T": T, "B": B, "H": H,
            "time_major_ms": 1e3 * statistics.median(times[False]),
            "batch_first_ms": 1e3 * statistics.median(times[True]),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios)}


def markdown(rows: list[dict], load: str) -> str:
    lines = ["Training step, batch_first=True against time-major (median of rounds; ratio = "
             "batch_first / time-major, median of the per-round ratios, with their range). "
             f"Load average at the start: {load}.", "",
             "| cell | method | T, B, H | time-major ms | batch-first ms | ratio | range |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['method']} | {r['T']}, {r['B']}, {r['H']} | "
                     f"{r['time_major_ms']:.2f} | {r['batch_first_ms']:.2f} | {r['ratio']:.3f} | "
                     f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny points, 3 rounds")
    parser.add_argument("--out", type=Path, default=Path("runs/perf/batch_first"))
    parser.add_argument("--rounds", type=int, default=None, help="override the rounds")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error(f"--rounds must be >= 1, got {args.rounds}")
        settings = dataclasses.replace(settings, rounds=args.rounds)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = [measure(p, settings) for p in settings.points]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_first.json").write_text(json.dumps(
        {"settings": dataclasses.asdict(settings), "load": load,
         "backend": jax.default_backend(), "rows": rows}, indent=1))
    table = markdown(rows, load)
    (args.out / "batch_first.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
