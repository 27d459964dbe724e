"""Is the step as fast as before? Two git revisions' training steps, timed interleaved.

A change that moves code without meaning to change the step (issue 20's redesign)
must leave its speed alone. This script checks out ``--base`` into a temporary
``git worktree`` and starts one long-lived worker process per revision, each
importing its own ``jaxrnn``. Both workers build the same training steps (the
benchmark's: ``RNN`` + ``make_train_step`` + Adam, input and output size H/4,
float32, seed 0) from the public API both revisions share, and compile them. Then,
round after round, the parent asks the base worker and the head worker in turn to
time one step of each (cell, method, grid point): every pair of measurements is
made seconds apart on the same machine, so load that drifts during the run moves
both. The result per point is the median over rounds of ``head / base``.

Commands::

    python -m jaxrnn_lab.perf.revisions --base c5dc4b7 --quick    # a minute
    python -m jaxrnn_lab.perf.revisions --base c5dc4b7            # the benchmark's grid
    python -m jaxrnn_lab.perf.revisions --base eb6ff72~1 --lengths  # padded batches

``--lengths`` gives every batch lengths drawn in [T/2, T] (seed 0), so the masked
path (the select per step, and the padding zeroed before the layer reads it) is
what is timed. ``--compute-dtype bfloat16`` times mixed-precision steps (both
revisions must have ``RNN(compute_dtype=...)``); ``--cells`` and ``--grid`` narrow
the points.

Writes ``revisions.json`` and ``revisions.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# (T, B, H, num_layers, bidirectional): the benchmark's default grid.
GRID = ((100, 32, 128, 1, False), (200, 64, 256, 1, False), (1000, 16, 64, 1, False),
        (100, 128, 512, 1, False), (100, 32, 128, 2, True))
QUICK_GRID = ((20, 4, 16, 1, False), (20, 4, 16, 2, True))
CELLS = ("elman", "lstm", "gru")
METHODS = ("bptt", "autodiff")

# The worker: one per revision, its PYTHONPATH the revision's tree. Reads one JSON
# request per line: ["build", points] compiles every step, ["time", i, n] times n
# calls of step i and answers the median seconds.
WORKER = r"""
import json, statistics, sys, time
import jax, jax.numpy as jnp, numpy as np
import jaxrnn
steps = []
for line in sys.stdin:
    req = json.loads(line)
    if req[0] == "build":
        with_lengths, compute = req[2], req[3]
        for cell, method, (T, B, H, L, bi) in req[1]:
            D = O = max(1, H // 4)
            extra = {} if compute is None else {"compute_dtype": compute}
            model = jaxrnn.RNN(cell=cell, input_size=D, hidden_size=H, output_size=O,
                               num_layers=L, bidirectional=bi, **extra)
            params = model.init(jax.random.key(0))
            opt = jaxrnn.make_optimizer("adam", 1e-3)
            rng = np.random.default_rng(0)
            lengths = (jnp.asarray(rng.integers(T // 2, T + 1, B), jnp.int32)
                       if with_lengths else None)
            batch = jaxrnn.Batch(jnp.asarray(rng.standard_normal((T, B, D)), jnp.float32),
                                 jnp.asarray(rng.standard_normal((T, B, O)), jnp.float32),
                                 lengths)
            step = jaxrnn.make_train_step(model, opt, method=method, donate=False)
            state = [params, opt.init(params)]
            jax.block_until_ready(step(state[0], state[1], batch))  # compile
            steps.append((step, state, batch))
        print(json.dumps(len(steps)), flush=True)
    else:
        _, i, n = req
        step, state, batch = steps[i]
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            jax.block_until_ready(step(state[0], state[1], batch))
            times.append(time.perf_counter() - t0)
        print(json.dumps(statistics.median(times)), flush=True)
"""


class Worker:
    """A worker process importing the jaxrnn of ``tree``."""

    def __init__(self, tree: Path):
        env = dict(os.environ, PYTHONPATH=str(tree))
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=tree)

    def ask(self, *request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.proc.wait()}")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def compare(base: Path, head: Path, points, rounds: int, calls: int,
            lengths: bool = False, compute_dtype: str | None = None) -> list[dict]:
    """Per point: median base and head seconds, and the median of the rounds' ratios."""
    workers = {"base": Worker(base), "head": Worker(head)}
    try:
        for w in workers.values():
            w.ask("build", points, lengths, compute_dtype)
        times: dict[str, list[list[float]]] = {k: [[] for _ in points] for k in workers}
        for r in range(rounds):
            for i in range(len(points)):
                order = ("base", "head") if (r + i) % 2 == 0 else ("head", "base")
                for k in order:  # A B, then B A: neither always goes first
                    times[k][i].append(workers[k].ask("time", i, calls))
            print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    finally:
        for w in workers.values():
            w.close()
    rows = []
    for i, (cell, method, point) in enumerate(points):
        ratios = [h / b for h, b in zip(times["head"][i], times["base"][i])]
        rows.append({"cell": cell, "method": method, "point": list(point),
                     "base_ms": 1e3 * statistics.median(times["base"][i]),
                     "head_ms": 1e3 * statistics.median(times["head"][i]),
                     "ratio": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios)})
    return rows


def markdown(rows: list[dict], base: str, head: str) -> str:
    lines = [f"Training step, {head} against {base} (median of rounds; ratio = head / base, "
             f"median of the per-round ratios, with their range)", "",
             "| cell | method | T, B, H, L, bi | base ms | head ms | ratio | range |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        T, B, H, L, bi = r["point"]
        lines.append(f"| {r['cell']} | {r['method']} | {T}, {B}, {H}, {L}, "
                     f"{'bi' if bi else 'uni'} | {r['base_ms']:.2f} | {r['head_ms']:.2f} | "
                     f"{r['ratio']:.3f} | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--head", default=None,
                        help="git revision to compare (default: the working tree)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds")
    parser.add_argument("--calls", type=int, default=3, help="steps per measurement")
    parser.add_argument("--lengths", action="store_true",
                        help="padded batches: lengths drawn in [T/2, T]")
    parser.add_argument("--compute-dtype", default=None, choices=("bfloat16", "float16"),
                        help="mixed-precision steps (RNN(compute_dtype=...))")
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=CELLS)
    parser.add_argument("--grid", nargs="+", default=None, metavar="T,B,H[,L[,bi]]",
                        help="grid points (default: the benchmark's)")
    parser.add_argument("--out", default="runs/revisions", help="output directory")
    args = parser.parse_args(argv)
    grid = QUICK_GRID if args.quick else GRID
    if args.grid:
        grid = [tuple(int(v) for v in g.split(",")[:4]) + (g.endswith(",bi"),)
                if len(g.split(",")) > 3 else tuple(int(v) for v in g.split(",")) + (1, False)
                for g in args.grid]
    rounds = args.rounds or (3 if args.quick else 9)
    points = [(c, m, p) for p in grid for c in args.cells for m in METHODS]
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for name, rev in (("base", args.base), ("head", args.head)):
            if rev is None:
                trees[name] = ROOT
                continue
            trees[name] = Path(tmp) / name
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach",
                            str(trees[name]), rev], check=True, capture_output=True)
        try:
            rows = compare(trees["base"], trees["head"], points, rounds, args.calls,
                           args.lengths, args.compute_dtype)
        finally:
            for name, rev in (("base", args.base), ("head", args.head)):
                if rev is not None:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                    str(trees[name])], check=False, capture_output=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "revisions.json").write_text(json.dumps(
        {"base": args.base, "head": args.head or "working tree", "rounds": rounds,
         "calls": args.calls, "lengths": args.lengths, "compute_dtype": args.compute_dtype,
         "load": os.getloadavg(),
         "rows": rows}, indent=1))
    text = markdown(rows, args.base, args.head or "working tree")
    (out / "revisions.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
