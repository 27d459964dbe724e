"""The outputs: ratios of a point's times, the markdown table, the chart, the files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def time_ms(results: dict, name: str) -> float | None:
    """A method's time (ms): a contender's median, the floor's ``floor_ms``; None if not run."""
    r = results.get(name, {})
    if r.get("status") != "ok":
        return None
    return r.get("floor_ms") if name == "floor" else r.get("median_ms")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def ratios(results: dict) -> dict:
    """Speed-ups of ``bptt`` and the product floor's share of ``bptt`` and ``torch``.

    Returns:
        ``bptt_speedup_vs_{autodiff,torch,torch_1t,flax}`` = other's time / bptt's
        (> 1: bptt is faster); ``floor_over_bptt`` and ``floor_over_torch`` = the
        product floor / that step (1 would be a step doing nothing but its
        products with the fastest kernels); ``autodiff_over_floor`` = autodiff /
        the product floor. None where a side did not run.
    """
    bptt = time_ms(results, "bptt")
    floor = time_ms(results, "floor")
    out = {f"bptt_speedup_vs_{other}": _ratio(time_ms(results, other), bptt)
           for other in ("autodiff", "torch", "torch_1t", "flax")}
    out["floor_over_bptt"] = _ratio(floor, bptt)
    out["floor_over_torch"] = _ratio(floor, time_ms(results, "torch"))
    out["autodiff_over_floor"] = _ratio(time_ms(results, "autodiff"), floor)
    return out


# --- markdown -------------------------------------------------------------------

def _fmt(x, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits (at least all of its integer part); "-" for None."""
    if x is None:
        return "-"
    if x == 0 or not math.isfinite(x):
        return f"{x}"
    return f"{x:.{max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))}f}"


def _peak_mb(result: dict) -> float | None:
    peak = result.get("memory", {}).get("peak_bytes")
    return None if peak is None else peak / 2**20


def _pressure_text(p: dict | None) -> str:
    return "n/a" if not p else f"{p['avg60']:.0f}%"


def _model_cells(p: dict) -> str:
    """The row's leading cells: ``| cell | T | B | H | L | bidir |``."""
    return (f"| {p['cell']} | {p['T']} | {p['B']} | {p['H']} | {p['num_layers']} "
            f"| {'yes' if p['bidirectional'] else 'no'} |")


def markdown(bench: dict) -> str:
    """The results as markdown: the main table, the product floor's parts, what was measured."""
    env = bench["environment"]
    v = env["versions"]
    s = bench["settings"]
    head = ("| cell | T | B | H | L | bidir | bptt ms | autodiff ms | torch ms "
            "| torch 1-thread ms | flax ms | bptt speed-up vs autodiff | vs torch (1-thread) "
            "| vs flax | product floor ms | floor/bptt | floor/torch | xla_chain ms "
            "| peak MB (bptt / autodiff / torch / flax) |")
    lines = ["# jaxrnn training-step benchmark", "", head, "|" + "---|" * (head.count("|") - 1)]
    for p in bench["results"]:
        m, r = p["methods"], p["ratios"]

        def ms(name):
            if m[name].get("status") != "ok":
                return m[name].get("status", "-")
            if name == "floor":
                return _fmt(m[name]["floor_ms"])
            fewer = "*" if m[name]["repeats"] < s["repeats"] else ""
            return _fmt(m[name]["median_ms"]) + fewer

        def speed(key):
            return "-" if r[key] is None else f"{r[key]:.2f}x"

        peaks = " / ".join(_fmt(_peak_mb(m[n])) if m[n].get("status") == "ok" else "-"
                           for n in ("bptt", "autodiff", "torch", "flax"))
        lines.append(f"{_model_cells(p)} {ms('bptt')} | {ms('autodiff')} | {ms('torch')} "
                     f"| {ms('torch_1t')} | {ms('flax')} "
                     f"| {speed('bptt_speedup_vs_autodiff')} | {speed('bptt_speedup_vs_torch')} "
                     f"({speed('bptt_speedup_vs_torch_1t')}) "
                     f"| {speed('bptt_speedup_vs_flax')} | {ms('floor')} "
                     f"| {_fmt(r['floor_over_bptt'], 2)} | {_fmt(r['floor_over_torch'], 2)} "
                     f"| {ms('xla_chain')} | {peaks} |")

    kernels = bench.get("floor_kernels", ["xla", "numpy", "torch"])
    head2 = ("| cell | T | B | H | L | bidir | product floor ms | dependent chains ms "
             f"| big products ms | products won ({' / '.join(kernels)}) |")
    lines += ["", "## The product floor, by part", "", head2,
              "|" + "---|" * (head2.count("|") - 1)]
    for p in bench["results"]:
        f = p["methods"]["floor"]
        if f.get("status") != "ok":
            continue
        wins = " / ".join(str(f["wins"].get(k, 0)) for k in kernels)
        lines.append(f"{_model_cells(p)} {_fmt(f['floor_ms'])} | {_fmt(f['chains_ms'])} "
                     f"| {_fmt(f['big_products_ms'])} | {wins} |")

    lines += [
        "",
        f"Median of {s['repeats']} interleaved steps after {s['warmup']} warm-up step(s) "
        f"(* fewer, at least 3, where {s['repeats']} would have taken over {s['budget_s']:g} s; "
        f"benchmark.json has every count and every time); L layers, bidir: both directions "
        f"in every layer; input and output size H/4; float32; loss: mean squared error of a "
        f"linear readout at every step; Adam (lr {s['lr']}) on every side; the same initial "
        f"weights and data on every side. Speed-up = other's time / bptt's time (> 1: bptt "
        f"is faster).",
        "",
        f"`product floor` = the time of the step's matrix products alone, no elementwise "
        f"work: per layer and direction the T dependent (B,H)x(H,G*H) forward and T "
        f"dependent (B,G*H)x(G*H,H) backward products (each timed as a chain of T calls), "
        f"the input projection, dW_ih, dW_hh and (above the first layer) the input "
        f"gradient, each one product over all T*B rows, plus the readout, its input "
        f"gradient and dW_hy. Each product is timed on its own with every kernel at hand "
        f"({', '.join(kernels)}; torch on {env['threads']['jax_xla_cpu']} threads), "
        f"{s.get('floor_repeats', '?')} interleaved runs, and counted at the fastest "
        f"kernel's median; benchmark.json (`methods.floor.products`) has every product's "
        f"shape, kernel times and winner. `floor/bptt` and `floor/torch` = the product "
        f"floor / that step's time (1: the step would do nothing but its products, with "
        f"the fastest kernels). `xla_chain` is one XLA program doing those products with "
        f"cheap elementwise links of its own; it is a contender, not a bound.",
        "",
        f"`torch` runs on as many threads as XLA:CPU ({env['threads']['jax_xla_cpu']}); "
        f"`torch 1-thread` is the same PyTorch step on one thread, shown because PyTorch's "
        f"OpenMP threads stall at every small op's barrier when the cores are shared with "
        f"other work.",
        "",
        "Peak memory: JAX columns are XLA's buffer assignment of the compiled step "
        "(argument + output - alias + temp bytes, parameters, Adam state and batch included); "
        "torch is the peak of live tensor bytes in one profiled step (torch.profiler memory "
        "timeline; excludes memory MKL/oneDNN allocate outside PyTorch's allocator and the "
        "allocator's slack). Both count buffers, not process RSS; compare them as such.",
        "",
        f"CPU: {env['cpu']} ({env['cores']} cores); threads: XLA {env['threads']['jax_xla_cpu']}, "
        f"torch intra-op {env['threads']['torch_intra_op']}. Versions: jax {v['jax']}, "
        f"jaxlib {v['jaxlib']}, optax {v['optax']}, torch {v['torch']}, flax {v['flax']}, "
        f"numpy {v['numpy']} ({v.get('numpy_blas', 'unknown')}), python {v['python']}. "
        f"Flax LSTM cell: OptimizedLSTMCell. "
        f"Memory pages: transparent huge pages `{env.get('transparent_hugepages')}`, "
        f"GLIBC_TUNABLES `{env.get('glibc_tunables') or '(unset)'}` "
        f"(see jaxrnn_lab/perf/huge_pages.py). "
        f"CPU pressure (share of time some task waited for a core, /proc/pressure/cpu avg60): "
        f"{_pressure_text(env.get('cpu_pressure_start'))} at the start, "
        f"{_pressure_text(bench.get('cpu_pressure_end'))} at the end.",
    ]
    variants = bench.get("variants") or []
    if variants:
        lines += ["", "## Cell variants: bptt against autodiff", "",
                  "Cells without a PyTorch counterpart in this form (and the LSTM with a "
                  "projection), one layer, input and output size H/4, `model.init`'s "
                  "parameters, timed as above (round-robin, median):", "",
                  "| variant | options | T | B | H | bptt ms | autodiff ms "
                  "| bptt speed-up vs autodiff | peak MB (bptt / autodiff) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for v in variants:
            m = v["methods"]
            opts = ", ".join(f"{k}={val!r}" for k, val in v["options"].items())
            lines.append(f"| {v['variant']} | `{opts}` | {v['T']} | {v['B']} | {v['H']} "
                         f"| {_fmt(m['bptt']['median_ms'])} | {_fmt(m['autodiff']['median_ms'])} "
                         f"| {v['bptt_speedup_vs_autodiff']:.2f}x "
                         f"| {_fmt(_peak_mb(m['bptt']))} / {_fmt(_peak_mb(m['autodiff']))} |")
    return "\n".join(lines) + "\n"


# --- chart ----------------------------------------------------------------------

def _point_label(p: dict) -> str:
    layers = f"{p['num_layers']}L" + (" bidir" if p["bidirectional"] else "")
    return f"T={p['T']} B={p['B']}\nH={p['H']} {layers}"


def chart(bench: dict, path: Path) -> None:
    """Grouped bars: ms per step of every step contender that ran and the product floor,
    by cell, written to ``path``."""
    import matplotlib.pyplot as plt

    fig = figure(bench)
    fig.savefig(path)
    plt.close(fig)


def figure(bench: dict):
    """``chart``'s matplotlib figure (Agg). Its bars and legend hold only the contenders
    that ran at some point (``status`` "ok"), not those "not installed" or failed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys(p["cell"] for p in bench["results"]))
    threads = bench["environment"]["threads"]["jax_xla_cpu"]
    style = {  # name: (label, color)
        "bptt": ("jaxrnn bptt", "tab:blue"), "autodiff": ("jaxrnn autodiff", "tab:orange"),
        "torch": (f"torch ({threads} threads)", "tab:red"),
        "torch_1t": ("torch (1 thread)", "lightcoral"), "flax": ("flax", "tab:green"),
        "floor": ("product floor", "0.6")}
    names = [n for n in style
             if any(time_ms(p["methods"], n) is not None for p in bench["results"])]
    width = 0.84 / max(len(names), 1)
    fig, axes = plt.subplots(1, len(cells), figsize=(4.8 * len(cells) + 0.6, 4.8), dpi=120,
                             squeeze=False, sharey=True)
    for ax, cell in zip(axes[0], cells):
        pts = [p for p in bench["results"] if p["cell"] == cell]
        for i, name in enumerate(names):
            x = np.arange(len(pts)) + (i - (len(names) - 1) / 2) * width
            label, color = style[name]
            med = np.array([time_ms(p["methods"], name) or np.nan for p in pts], float)
            ax.bar(x, med, width, label=label, color=color, edgecolor="white", linewidth=0.5,
                   hatch="//" if name == "floor" else None)
            if name == "floor":  # a sum of medians: no quartiles
                continue
            ok = [p["methods"].get(name, {}).get("status") == "ok" for p in pts]
            q1, q3 = (np.array([p["methods"][name][k] if o else np.nan
                                for p, o in zip(pts, ok)]) for k in ("q1_ms", "q3_ms"))
            ax.errorbar(x, med, yerr=[med - q1, q3 - med], fmt="none", ecolor="black",
                        elinewidth=0.7, capsize=1.5)  # the interquartile range
        ax.set_xticks(np.arange(len(pts)))
        ax.set_xticklabels([_point_label(p) for p in pts], fontsize=7)
        ax.set_yscale("log")
        ax.set_title(cell)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("ms per training step (median; bars: quartiles)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(len(names), 1), fontsize=8,
               frameon=False)
    env = bench["environment"]
    fig.suptitle(f"One training step (forward, backward, Adam), float32, {env['cpu']}, "
                 f"{threads} threads; product floor: the step's matrix products alone; "
                 f"log scale", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def write_outputs(bench: dict, out: str | Path) -> dict[str, Path]:
    """Writes ``benchmark.json``, ``benchmark.md`` and ``benchmark.png`` into ``out``.

    Returns:
        ``{"json", "md", "png"}``: the three paths.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "benchmark.json", "md": out / "benchmark.md",
             "png": out / "benchmark.png"}
    paths["json"].write_text(json.dumps(bench, indent=1) + "\n")
    paths["md"].write_text(markdown(bench))
    chart(bench, paths["png"])
    return paths
