"""Memory-lean BPTT on a long sequence: peak memory and step time against plain BPTT (issue #5).

``RNN(..., bptt_segment=k)`` stores the carry only every ``k`` steps and recomputes
each segment in the backward pass. For each cell this compiles one training step
(forward, backward, Adam; float32; MSE of a linear readout at every step) with
plain ``bptt`` and with ``bptt_segment=k``, reads XLA's buffer assignment of both
(temp bytes: the activations and cotangents; deterministic for a given jaxlib),
and, for the cells in ``timed_cells``, times both steps interleaved (median).
It also checks that the two timed steps compute the same loss and gradient norm
(to float32 rounding; ``tests/test_lean.py`` checks the gradients themselves in float64).

Commands::

    python experiments/lean_bptt.py --quick --out /tmp/lean    # seconds
    python experiments/lean_bptt.py                            # docs/experiments/lean_bptt

Writes ``lean_bptt.json`` and ``lean_bptt.md``.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

from jaxrnn_lab import harness as common
import jax.numpy as jnp
import numpy as np
import optax

import jaxrnn
from jaxrnn_lab import bench


@dataclasses.dataclass(frozen=True)
class Settings:
    T: int = 10_000  # sequence length
    B: int = 64  # batch
    H: int = 256  # hidden units; input and output size H // 4
    segment: int = 100  # k: the carry is stored every k steps
    cells: tuple = ("lstm", "gru", "elman")  # memory for each
    timed_cells: tuple = ("lstm",)  # step time too (a plain LSTM step here takes ~40 s)
    repeats: int = 3  # timed steps per method, after one warm-up step
    seed: int = 0  # weights and data


FULL = Settings()
QUICK = Settings(T=200, B=4, H=16, segment=10, cells=("lstm", "elman"),
                 timed_cells=("lstm",), repeats=2)


def _steps(cell: str, s: Settings):
    D = O = max(1, s.H // 4)
    rng = np.random.default_rng(s.seed)
    batch = jaxrnn.Batch(jnp.asarray(rng.standard_normal((s.T, s.B, D), np.float32)),
                         jnp.asarray(rng.standard_normal((s.T, s.B, O), np.float32)))
    out = {}
    for name, seg in (("bptt", None), (f"bptt_segment={s.segment}", s.segment)):
        model = jaxrnn.RNN(cell=cell, input_size=D, hidden_size=s.H, output_size=O,
                           bptt_segment=seg)
        params = bench.init_params(model, np.random.default_rng(s.seed))
        opt = optax.adam(1e-3)
        opt_state = opt.init(params)
        step = jaxrnn.make_train_step(model, opt, loss="mse", method="bptt", donate=False)
        t0 = time.perf_counter()
        compiled = step.lower(params, opt_state, batch).compile()
        out[name] = {"compiled": compiled, "compile_s": time.perf_counter() - t0,
                     "args": (params, opt_state, batch),
                     "memory": bench.xla_memory(compiled)}
    return out


def run(settings: Settings, out: Path, progress: bool) -> dict:
    from tqdm.auto import tqdm

    rows = []
    for cell in tqdm(settings.cells, desc="cells", disable=not progress):
        steps = _steps(cell, settings)
        plain, lean = steps.values()
        row = {"cell": cell, "methods": {}}
        for name, st in steps.items():
            row["methods"][name] = {"temp_mib": st["memory"]["temp_size_in_bytes"] / 2**20,
                                    "peak_mib": st["memory"]["peak_bytes"] / 2**20,
                                    "compile_s": st["compile_s"]}
        row["temp_ratio"] = (lean["memory"]["temp_size_in_bytes"]
                             / plain["memory"]["temp_size_in_bytes"])
        if cell in settings.timed_cells:
            times = {name: [] for name in steps}
            results = {}
            for r in range(settings.repeats + 1):  # the first round is the warm-up
                for name, st in (list(steps.items())[::1 if r % 2 else -1]):
                    t0 = time.perf_counter()
                    _, _, metrics = st["compiled"](*st["args"])
                    metrics = {k: float(v) for k, v in metrics.items()}  # blocks
                    if r:
                        times[name].append(time.perf_counter() - t0)
                    results[name] = metrics
            for name in steps:
                row["methods"][name]["step_s"] = statistics.median(times[name])
                row["methods"][name]["loss"] = results[name]["loss"]
                row["methods"][name]["grad_norm"] = results[name]["grad_norm"]
            names = list(steps)
            a, b = (row["methods"][n] for n in names)
            row["same_loss_and_grad_norm"] = bool(  # float32: the same math, reordered sums
                abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
                and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(a["grad_norm"]))
            row["time_ratio"] = (row["methods"][names[1]]["step_s"]
                                 / row["methods"][names[0]]["step_s"])
        rows.append(row)

    lines = [f"T = {settings.T}, B = {settings.B}, H = {settings.H}, k = {settings.segment}, "
             f"float32, one training step (Adam); XLA temp memory from the compiled step's "
             f"buffer assignment; step time median of {settings.repeats}.", "",
             "| cell | plain bptt temp MiB | lean temp MiB | memory ratio | plain s | lean s "
             "| time ratio |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        plain, lean = row["methods"].values()
        t = (f"{plain['step_s']:.1f} | {lean['step_s']:.1f} | {row['time_ratio']:.2f}"
             if "time_ratio" in row else "- | - | -")
        lines.append(f"| {row['cell']} | {plain['temp_mib']:,.0f} | {lean['temp_mib']:,.0f} "
                     f"| {row['temp_ratio']:.3f} | {t} |")
    (out / "lean_bptt.md").write_text("\n".join(lines) + "\n")
    return {"rows": rows}


if __name__ == "__main__":
    sys.exit(common.main("lean_bptt", __doc__, FULL, QUICK, run))
