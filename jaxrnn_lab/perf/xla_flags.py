"""Do XLA:CPU's flags speed up the training step? A sweep, each setting in a fresh process (issue #5).

``XLA_FLAGS`` is read once, when jaxlib starts, so every setting runs in its own
Python process. Each process times one training step of ``bptt`` and ``autodiff``
and the ``xla_chain`` program (the benchmark's contenders: ``jaxrnn/bench/``),
interleaved round-robin, median of the repeats, at a few grid points.

Commands::

    python -m jaxrnn_lab.perf.xla_flags --quick --out /tmp/flags     # seconds
    python -m jaxrnn_lab.perf.xla_flags                              # docs/experiments/xla_flags

Writes ``xla_flags.json`` and ``xla_flags.md``. Compare rows within one run only.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from jaxrnn_lab import harness as common

# Every flag here is one the jaxlib in use accepts (an unknown flag aborts jaxlib).
FLAG_SETS = (
    "",  # the defaults
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_experimental_xnn_fusion_type=dot",
    "--xla_cpu_experimental_ynn_fusion_type=dot",
    "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise "
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
)


@dataclasses.dataclass(frozen=True)
class Settings:
    flag_sets: tuple = FLAG_SETS  # XLA_FLAGS values, one process each
    points: tuple = (("lstm", 100, 32, 128), ("gru", 1000, 16, 64), ("elman", 200, 64, 256),
                     ("gru", 100, 32, 128))  # (cell, T, B, H); input/output size H/4
    budget_s: float = 3.0  # timed seconds per contender and point (at least `min_repeats`)
    min_repeats: int = 5  # timed steps per contender, at least
    seed: int = 0  # weights and data


FULL = Settings()
QUICK = Settings(flag_sets=FLAG_SETS[:2], points=(("lstm", 10, 4, 16),), budget_s=0.2,
                 min_repeats=3)

# The worker: runs in a fresh process with XLA_FLAGS set; prints one JSON line.
WORKER = r"""
import json, statistics, sys, time
import jax.numpy as jnp, numpy as np
import jaxrnn
from jaxrnn_lab import bench
points, budget_s, min_repeats, seed = json.loads(sys.argv[1])
rows = []
for cell, T, B, H in points:
    D = O = max(1, H // 4)
    model = jaxrnn.RNN(cell=cell, input_size=D, hidden_size=H, output_size=O)
    rng = np.random.default_rng(seed)
    params = bench.init_params(model, rng)
    batch = jaxrnn.Batch(jnp.asarray(rng.standard_normal((T, B, D), np.float32)),
                         jnp.asarray(rng.standard_normal((T, B, O), np.float32)))
    cs = [bench.jaxrnn_contender(model, params, batch, m, 1e-3) for m in ("bptt", "autodiff")]
    cs.append(bench.xla_chain_contender(model, params, batch))
    for c in cs:  # warm up
        c.run()
    t0 = time.perf_counter()
    cs[0].run()
    n = max(min_repeats, int(budget_s / max(time.perf_counter() - t0, 1e-6)))
    times = bench.time_round_robin(cs, {c.name: n for c in cs})
    rows.append({"cell": cell, "T": T, "B": B, "H": H, "repeats": n,
                 **{f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()}})
print("RESULT " + json.dumps(rows))
"""


def sweep_one(flags: str, settings: Settings) -> dict:
    arg = [settings.points, settings.budget_s, settings.min_repeats, settings.seed]
    return common.run_with_xla_flags(WORKER, arg, flags)


def markdown(results: list[dict]) -> str:
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return "no setting ran\n"
    points = [f"{p['cell']} ({p['T']}, {p['B']}, {p['H']})" for p in ok[0]["rows"]]
    head = "| XLA_FLAGS | " + " | ".join(f"{p}: bptt ms (autodiff/bptt)" for p in points) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        name = f"`{r['flags']}`" if r["flags"] else "(defaults)"
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['status']} |")
            continue
        cells = [f"{p['bptt_ms']:.1f} ({p['autodiff_ms'] / p['bptt_ms']:.2f})" for p in r["rows"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(settings: Settings, out: Path, progress: bool) -> dict:
    from tqdm.auto import tqdm

    results = [sweep_one(f, settings)
               for f in tqdm(settings.flag_sets, desc="XLA_FLAGS", disable=not progress)]
    (out / "xla_flags.md").write_text(markdown(results))
    return {"sweep": results}


if __name__ == "__main__":
    sys.exit(common.main("xla_flags", __doc__, FULL, QUICK, run))
