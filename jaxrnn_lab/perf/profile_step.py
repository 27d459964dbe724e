"""Where the time of one training step goes: XLA's profiler, op by op, grouped (issue #5).

For each grid point and method (``bptt``, ``autodiff``) it compiles the same
training step as the benchmark (forward, backward, Adam; float32; MSE of a linear
readout at every step), runs it under ``jax.profiler.trace`` and sums the time of
every XLA operation of the compiled step, grouped by what it is:

* ``loop products``: matrix products inside a loop (the dependent chain, and for
  ``autodiff`` also the per-step weight-gradient products);
* ``loop elementwise``: everything else inside a loop (gate math, writes of the
  per-step outputs, loop bookkeeping);
* ``big products``: matrix products outside the loops (input projection,
  readout, weight gradients as one product over all steps);
* ``other``: everything else outside the loops (transposed copies, buffer
  initialisation, reductions, the optimizer update).

Commands::

    python -m jaxrnn_lab.perf.profile_step --quick --out /tmp/profile   # seconds
    python -m jaxrnn_lab.perf.profile_step                              # docs/experiments/profile_step
    python -m jaxrnn_lab.perf.profile_step --points gru:200:64:256 --out /tmp/p   # other points

Op times are summed over the ops (XLA:CPU may run two at once on two cores, so the
sum can exceed the wall time); absolute times hold only for the machine that ran
it. Writes ``profile_step.json``, ``profile_step.md`` and ``profile_step.png``.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from jaxrnn_lab import harness as common
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxrnn
from jaxrnn_lab import bench
from jaxrnn.extend import CELLS

GROUPS = ("loop products", "loop elementwise", "big products", "other")


@dataclasses.dataclass(frozen=True)
class Settings:
    points: tuple = (("lstm", 100, 128, 512), ("gru", 1000, 16, 64),
                     ("elman", 200, 64, 256))  # (cell, T, B, H); input/output size H/4
    methods: tuple = ("bptt", "autodiff")  # gradient methods to profile
    steps: int = 3  # profiled steps per point and method (after two warm-up steps)
    seed: int = 0  # weights and data


FULL = Settings()
QUICK = Settings(points=(("lstm", 20, 4, 16),), steps=1)


def _loop_ops(hlo: str) -> set[str]:
    """Names of the instructions inside the bodies of the compiled ``while`` loops."""
    bodies = set(re.findall(r"while\(.*?body=(%[\w.\-]+)", hlo))
    ops = set()
    for comp in re.split(r"\n(?=%)", hlo):
        name = comp.split(" ", 1)[0]
        if name in bodies:
            ops.update(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = ", comp, flags=re.M))
    return ops


def _is_product(op: str, hlo: str) -> bool:
    """A matrix product: an HLO ``dot`` or a library (XNNPACK/YNN/oneDNN) dot fusion."""
    m = re.search(rf"^\s*(?:ROOT )?%{re.escape(op)} = [^\n]*", hlo, flags=re.M)
    line = m.group(0) if m else ""
    return " dot(" in line or "nn_fusion" in op or '"kind":"__ynn_fusion"' in line \
        or '"kind":"__xnn_fusion"' in line


def op_times(fn, args, steps: int) -> dict[str, float]:
    """Microseconds per step of every XLA op of ``fn(*args)`` (``fn`` is compiled)."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                args = fn(*args)
                jax.block_until_ready(args)
        path = glob.glob(f"{d}/**/*perfetto_trace.json.gz", recursive=True)[0]
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total = collections.defaultdict(float)
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") == "X" and op:
            total[op] += e.get("dur", 0.0) / steps
    return dict(total)


def profile_point(cell: str, T: int, B: int, H: int, method: str, settings: Settings) -> dict:
    D = O = max(1, H // 4)
    model = jaxrnn.RNN(cell=cell, input_size=D, hidden_size=H, output_size=O)
    rng = np.random.default_rng(settings.seed)
    params = bench.init_params(model, rng)
    batch = jaxrnn.Batch(jnp.asarray(rng.standard_normal((T, B, D), np.float32)),
                         jnp.asarray(rng.standard_normal((T, B, O), np.float32)))
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)
    step = jaxrnn.make_train_step(model, opt, loss="mse", method=method, donate=False)
    compiled = step.lower(params, opt_state, batch).compile()
    hlo = compiled.as_text()

    def run(p, s):
        p, s, _ = compiled(p, s, batch)
        return p, s

    state = (params, opt_state)
    for _ in range(2):
        state = run(*state)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(settings.steps):
        state = run(*state)
    jax.block_until_ready(state)
    wall_ms = (time.perf_counter() - t0) / settings.steps * 1e3

    times = op_times(run, state, settings.steps)
    loops = _loop_ops(hlo)
    groups = dict.fromkeys(GROUPS, 0.0)
    top = []
    for op, us in times.items():
        if op.startswith("while"):
            continue  # a loop's time is the sum of its body's ops, counted one by one
        inside, product = op in loops, _is_product(op, hlo)
        group = GROUPS[0 if inside and product else 1 if inside else 2 if product else 3]
        groups[group] += us / 1e3
        top.append((us / 1e3, op, group))
    top.sort(reverse=True)
    loop_products = sorted(op for op in loops if _is_product(op, hlo))
    return {"loop_products": loop_products, "cell": cell, "T": T, "B": B, "H": H, "method": method, "wall_ms": wall_ms,
            "ops_ms": sum(groups.values()), "groups_ms": groups,
            "top_ops": [{"op": op, "group": g, "ms": ms, "shape": _result_shape(op, hlo)}
                        for ms, op, g in top[:12]]}


def _result_shape(op: str, hlo: str) -> str:
    """The result type of instruction ``op`` in ``hlo``, e.g. ``f32[200,64,768]``, or ''."""
    m = re.search(rf"^\s*(?:ROOT )?%{re.escape(op)} = (\([^)]*\)|\S+) ", hlo, flags=re.M)
    return re.sub(r"\{[^}]*\}", "", m.group(1)) if m else ""


def markdown(rows: list[dict]) -> str:
    head = ("| cell | T | B | H | method | wall ms | sum of ops ms | "
            + " | ".join(GROUPS) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        g = r["groups_ms"]
        share = " | ".join(f"{g[k]:.1f} ({g[k] / r['ops_ms']:.0%})" for k in GROUPS)
        lines.append(f"| {r['cell']} | {r['T']} | {r['B']} | {r['H']} | {r['method']} "
                     f"| {r['wall_ms']:.1f} | {r['ops_ms']:.1f} | {share} |")
    lines += ["", "The largest ops of each step (ms per step, the op's result type):", ""]
    for r in rows:
        ops = ", ".join(f"`{o['op']}` {o.get('shape', '')} {o['ms']:.3g} ({o['group']})"
                        for o in r["top_ops"][:8])
        lines.append(f"* {r['cell']} ({r['T']}, {r['B']}, {r['H']}) {r['method']}: {ops}")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['cell']} T={r['T']} B={r['B']} H={r['H']}\n{r['method']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4.5))
    bottom = np.zeros(len(rows))
    for group, color in zip(GROUPS, ("tab:blue", "lightsteelblue", "tab:orange", "tab:gray")):
        share = np.array([r["groups_ms"][group] / r["ops_ms"] for r in rows])
        ax.bar(labels, share, bottom=bottom, label=group, color=color)
        bottom += share
    ax.set_ylabel("share of the step's op time")
    ax.set_title("One training step, op by op (XLA profiler)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=4, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_points(text: str) -> tuple:
    """``"gru:200:64:256,lstm:100:32:128"`` -> ``(("gru", 200, 64, 256), ...)``.

    Raises:
        common.UsageError: naming ``--points`` and the entry it cannot read.
    """
    points = []
    for entry in text.split(","):
        parts = entry.split(":")
        try:
            cell, T, B, H = parts[0], *map(int, parts[1:])
            if cell not in CELLS or min(T, B, H) < 1:
                raise ValueError
        except ValueError:
            raise common.UsageError(f"--points: {entry!r} is not cell:T:B:H with a cell of "
                                    f"{sorted(CELLS)} and positive sizes") from None
        points.append((cell, T, B, H))
    return tuple(points)


def run(settings: Settings, out: Path, progress: bool, points: str | None = None) -> dict:
    from tqdm.auto import tqdm

    if points is not None:
        settings = dataclasses.replace(settings, points=parse_points(points))

    jobs = [(p, m) for p in settings.points for m in settings.methods]
    rows = [profile_point(*p, m, settings)
            for p, m in tqdm(jobs, desc="profile", disable=not progress)]
    (out / "profile_step.md").write_text(markdown(rows))
    chart(rows, out / "profile_step.png")
    return {"rows": rows, "cpu": bench.cpu_model(), "xla_threads": bench.jax_threads()}


OPTIONS = (common.Option("--points", {"default": None, "help": (
    "comma-separated cell:T:B:H points to profile instead of the default ones, "
    "e.g. gru:200:64:256")}),)

if __name__ == "__main__":
    sys.exit(common.main("profile_step", __doc__, FULL, QUICK, run, options=OPTIONS))
