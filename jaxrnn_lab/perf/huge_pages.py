"""Page faults, not GEMM: the training step with and without huge pages for malloc (#10).

XLA:CPU allocates its temporary and output buffers with ``malloc`` on every call,
and glibc serves large blocks with fresh ``mmap`` pages, returned on ``free``. Where
the kernel hands out transparent huge pages only on request
(``/sys/kernel/mm/transparent_hugepage/enabled`` = ``madvise``, as here), every
4 KiB page of every large buffer is faulted in again at every step. numpy asks
for huge pages on its own arrays (``madvise(MADV_HUGEPAGE)``) and the benchmark's
floor writes into one buffer made beforehand, so part of what looked like XLA's
slower GEMM is the first touch of memory. glibc's tunable
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35; read at start-up) makes
``malloc`` ask for huge pages too. The third setting, ``KEEP_HEAP``, avoids the
faults instead of making them fewer: ``malloc`` then serves every block, on every
thread, from one heap it never gives back, so each page is faulted in once per
process rather than once per call.

This script runs the same worker in fresh processes, alternating the settings of
``envs`` (``rounds`` processes each, interleaved A B A B ...), and times in each:

* the input projection's product ``(T*B, D) x (D, G*H)`` in XLA (a new output per
  call), numpy into a buffer made beforehand (``out=``, as the floor times it) and
  numpy into a new array;
* one training step (loss, gradient, Adam) of ``jaxrnn`` bptt and autodiff and of
  PyTorch at the grid points, as ``jaxrnn bench`` builds them;

each with the minor page faults per call (``getrusage``), which is what the
setting changes. Times are medians over rounds; compare within a row.

Commands::

    python -m jaxrnn_lab.perf.huge_pages --quick --out /tmp/hp     # seconds
    python -m jaxrnn_lab.perf.huge_pages                          # docs/experiments/huge_pages
    python -m jaxrnn_lab.perf.huge_pages --rounds 2 --out /tmp/hp # two processes per setting

Writes ``huge_pages.json`` and ``huge_pages.md``.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path

from jaxrnn_lab import harness as common

from jaxrnn_lab.bench.environment import cpu_pressure, transparent_hugepages

# GLIBC_TUNABLES values; "" is the default. KEEP_HEAP serves every block from one
# heap that is never given back: one arena for all threads (XLA's buffers are
# malloc'ed on its own threads, whose arenas would mmap them anyway), no mmap below
# 1 GiB, no trimming below 1 GiB. The pages are then faulted in once per process.
KEEP_HEAP = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=1073741824:"
             "glibc.malloc.trim_threshold=1073741824")
ENVS = ("", "glibc.malloc.hugetlb=1", KEEP_HEAP)


@dataclasses.dataclass(frozen=True)
class Settings:
    envs: tuple = ENVS
    rounds: int = 3  # processes per setting, interleaved with the other settings'
    cells: tuple = ("lstm", "gru", "elman")
    points: tuple = ((100, 32, 128), (200, 64, 256), (100, 128, 512))  # (T, B, H); D = O = H/4
    steps: int = 5  # timed steps per contender and process (after 2 untimed ones)
    seed: int = 0


FULL = Settings()
QUICK = Settings(envs=ENVS[:2], rounds=1, cells=("lstm",), points=((5, 2, 8),), steps=2)

# The worker: one process, one GLIBC_TUNABLES setting; prints one JSON line.
WORKER = r"""
import json, os, resource, statistics, sys, time
import numpy as np, jax, jax.numpy as jnp
import jaxrnn
from jaxrnn_lab.bench import contenders
from jaxrnn_lab.bench.environment import jax_threads, torch_module
cells, points, steps, seed = json.loads(sys.argv[1])
torch = torch_module()
threads = jax_threads()
if torch is not None:
    torch.set_num_threads(threads)

def measure(f):
    # one call: its ms and its minor page faults
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    f()
    ms = (time.perf_counter() - t0) * 1e3
    return {"ms": ms, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}

rows = []
for cell in cells:
    for T, B, H in points:
        D = O = max(1, H // 4)
        model = jaxrnn.RNN(cell=cell, input_size=D, hidden_size=H, output_size=O)
        G = model.cell_fn.num_gates
        rng = np.random.default_rng(seed)
        params = contenders.init_params(model, rng)
        xs = rng.standard_normal((T, B, D)).astype(np.float32)
        ys = rng.standard_normal((T, B, O)).astype(np.float32)
        batch = jaxrnn.Batch(jnp.asarray(xs), jnp.asarray(ys))
        run = {m: contenders.jaxrnn_contender(model, params, batch, m, 1e-3).run
               for m in ("bptt", "autodiff")}
        if torch is not None:
            run["torch"] = contenders.torch_contender(model, params, xs, ys, 1e-3, threads,
                                                      False).run
        # the input projection's product, three ways
        x2 = xs.reshape(T * B, D)
        w = rng.standard_normal((D, G * H)).astype(np.float32)
        xj, wj = jnp.asarray(x2), jnp.asarray(w)
        xla = jax.jit(lambda x, w: x @ w)
        out = np.empty((T * B, G * H), np.float32)
        run["xla_product"] = lambda: xla(xj, wj).block_until_ready()
        run["numpy_out"] = lambda: np.matmul(x2, w, out=out)
        run["numpy_new"] = lambda: np.matmul(x2, w)
        for f in run.values():  # compile, first touch
            f(); f()
        got = {name: [] for name in run}
        for r in range(steps):  # round-robin: every contender once per round
            for name, f in run.items():
                got[name].append(measure(f))
        rows.append({"cell": cell, "T": T, "B": B, "H": H, "GH": G * H,
                     "ms": {n: statistics.median(m["ms"] for m in v) for n, v in got.items()},
                     "faults": {n: statistics.median(m["faults"] for m in v)
                                for n, v in got.items()}})
print("RESULT " + json.dumps(rows))
"""

COLUMNS = ("bptt", "autodiff", "torch", "xla_product", "numpy_out", "numpy_new")


def merge(runs: list[dict]) -> list[dict]:
    """One row per (cell, point): each contender's median over the processes' medians."""
    ok = [r["rows"] for r in runs if r["status"] == "ok"]
    merged = []
    for rows in zip(*ok):
        first = rows[0]
        merged.append({**{k: first[k] for k in ("cell", "T", "B", "H", "GH")},
                       "processes": len(rows),
                       "ms": {n: statistics.median(r["ms"][n] for r in rows) for n in first["ms"]},
                       "faults": {n: statistics.median(r["faults"][n] for r in rows)
                                  for n in first["faults"]}})
    return merged


def label(env: str) -> str:
    return f"`{env}`" if env else "(default)"


def markdown(by_env: dict[str, list[dict]], failures: list[str], thp: str | None) -> str:
    """A row per (cell, point, setting): ms and page faults per call; the speed-up under each setting."""
    head = ("| cell (T, B, H) | GLIBC_TUNABLES | " + " | ".join(f"{c} ms" for c in COLUMNS)
            + " | bptt faults | torch faults | bptt / autodiff speed-up | torch / bptt |")
    lines = [f"Transparent huge pages: `{thp}`.", "", head, "|" + "---|" * (head.count("|") - 1)]
    default = by_env.get("", [])
    for env, rows in by_env.items():
        for row in rows:
            ms, faults = row["ms"], row["faults"]
            cells = [f"{ms[c]:.3g}" if c in ms else "-" for c in COLUMNS]
            lines.append(
                f"| {row['cell']} ({row['T']}, {row['B']}, {row['H']}) | {label(env)} | "
                + " | ".join(cells)
                + f" | {faults['bptt']:.0f} | {faults.get('torch', float('nan')):.0f}"
                + f" | {ms['autodiff'] / ms['bptt']:.2f}"
                + (f" | {ms['torch'] / ms['bptt']:.2f} |" if "torch" in ms else " | - |"))
    if default:
        lines += ["", "bptt's time under each setting over its time with the default:", ""]
        for env, rows in by_env.items():
            if env:
                ratios = [f"{r['cell']} ({r['T']}, {r['B']}, {r['H']}) "
                          f"{r['ms']['bptt'] / d['ms']['bptt']:.2f}"
                          for r, d in zip(rows, default)]
                lines.append(f"- `{env}`: " + ", ".join(ratios))
    lines += [f"- failed: {f}" for f in failures]
    return "\n".join(lines) + "\n"


def run(settings: Settings, out: Path, progress: bool, rounds: int | None = None) -> dict:
    from tqdm.auto import tqdm

    if rounds is not None:
        if rounds < 1:
            raise common.UsageError(f"--rounds must be at least 1, got {rounds}")
        settings = dataclasses.replace(settings, rounds=rounds)

    arg = [settings.cells, settings.points, settings.steps, settings.seed]
    order = [env for _ in range(settings.rounds) for env in settings.envs]  # A B A B ...
    runs: dict[str, list[dict]] = {env: [] for env in settings.envs}
    for env in tqdm(order, desc="processes", disable=not progress):
        runs[env].append(common.run_worker(WORKER, arg, {"GLIBC_TUNABLES": env}))
    failures = [f"{label(env)}: {r['status']}" for env, rs in runs.items() for r in rs
                if r["status"] != "ok"]
    by_env = {env: merge(rs) for env, rs in runs.items()}
    thp = transparent_hugepages()
    (out / "huge_pages.md").write_text(markdown(by_env, failures, thp))
    return {"transparent_hugepages": thp, "by_env": by_env, "processes": runs,
            "cpu_pressure": cpu_pressure()}


OPTIONS = (common.Option("--rounds", {"type": int, "default": None, "help": (
    "processes per setting (default: 3; 1 with --quick)")}),)

if __name__ == "__main__":
    sys.exit(common.main("huge_pages", __doc__, FULL, QUICK, run, options=OPTIONS))
