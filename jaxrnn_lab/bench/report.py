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


def _memory(results: dict, name: str, key: str) -> int | None:
    """A contender's ``memory[key]`` (bytes), or None if it did not run or has none."""
    r = results.get(name, {})
    return r.get("memory", {}).get(key) if r.get("status") == "ok" else None


def ratios(results: dict) -> dict:
    """Speed-ups of ``bptt``, the product floor's share of ``bptt`` and ``torch``, bf16 / f32.

    Returns:
        ``bptt_speedup_vs_{autodiff,torch,torch_1t,flax}`` = other's time / bptt's
        (> 1: bptt is faster); ``floor_over_bptt`` and ``floor_over_torch`` = the
        product floor / that step (1 would be a step doing nothing but its
        products with the fastest kernels); ``autodiff_over_floor`` = autodiff /
        the product floor; for ``m`` in bptt, autodiff, ``{m}_bf16_over_f32_time``,
        ``_peak`` and ``_temp`` = the bfloat16-compute step's median time, peak
        bytes and XLA temp bytes / the float32 step's (< 1: bf16 is faster or
        smaller). None where a side did not run.
    """
    bptt = time_ms(results, "bptt")
    floor = time_ms(results, "floor")
    out = {f"bptt_speedup_vs_{other}": _ratio(time_ms(results, other), bptt)
           for other in ("autodiff", "torch", "torch_1t", "flax")}
    out["floor_over_bptt"] = _ratio(floor, bptt)
    out["floor_over_torch"] = _ratio(floor, time_ms(results, "torch"))
    out["autodiff_over_floor"] = _ratio(time_ms(results, "autodiff"), floor)
    for m in ("bptt", "autodiff"):
        out[f"{m}_bf16_over_f32_time"] = _ratio(time_ms(results, f"{m}_bf16"),
                                                time_ms(results, m))
        for key, field in (("peak", "peak_bytes"), ("temp", "temp_size_in_bytes")):
            out[f"{m}_bf16_over_f32_{key}"] = _ratio(_memory(results, f"{m}_bf16", field),
                                                     _memory(results, m, field))
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


def _r2(x: float | None) -> str:
    """A ratio as a table cell, two decimals; "-" for None."""
    return "-" if x is None else f"{x:.2f}"


def _load_text(load) -> str:
    return "n/a" if not load else " / ".join(f"{x:.2f}" for x in load)


def _model_cells(p: dict) -> str:
    """The row's leading cells: ``| cell | T | B | H | L | bidir |``."""
    return (f"| {p['cell']} | {p['T']} | {p['B']} | {p['H']} | {p['num_layers']} "
            f"| {'yes' if p['bidirectional'] else 'no'} |")


def _ms(methods: dict, name: str, repeats: int) -> str:
    """A method's time as a table cell: its median (``*``: fewer than ``repeats`` runs),
    the floor's sum, or why it did not run."""
    m = methods.get(name, {"status": "-"})
    if m.get("status") != "ok":
        return m.get("status", "-")
    if name == "floor":
        return _fmt(m["floor_ms"])
    return _fmt(m["median_ms"]) + ("*" if m["repeats"] < repeats else "")


def _mb(methods: dict, name: str, key: str = "peak_bytes") -> str:
    """A contender's ``memory[key]`` in MB (2^20 bytes) as a table cell; "-" without one."""
    size = _memory(methods, name, key)
    return _fmt(None if size is None else size / 2**20)


def markdown(bench: dict) -> str:
    """The results as markdown: the main table, the product floor's parts, what was measured,
    bfloat16 against float32, the cell variants."""
    env = bench["environment"]
    v = env["versions"]
    s = bench["settings"]
    head = ("| cell | T | B | H | L | bidir | bptt ms | autodiff ms | bptt bf16 ms (/ f32) "
            "| torch ms "
            "| torch 1-thread ms | flax ms | bptt speed-up vs autodiff | vs torch (1-thread) "
            "| vs flax | product floor ms | floor/bptt | floor/torch | xla_chain ms "
            "| peak MB (bptt / autodiff / torch / flax) |")
    lines = ["# jaxrnn training-step benchmark", "", head, "|" + "---|" * (head.count("|") - 1)]
    for p in bench["results"]:
        m, r = p["methods"], p["ratios"]

        def ms(name):
            return _ms(m, name, s["repeats"])

        def speed(key):
            return "-" if r[key] is None else f"{r[key]:.2f}x"

        bf16 = ms("bptt_bf16")
        if r.get("bptt_bf16_over_f32_time") is not None:
            bf16 += f" ({_r2(r['bptt_bf16_over_f32_time'])})"
        peaks = " / ".join(_fmt(_peak_mb(m[n])) if m[n].get("status") == "ok" else "-"
                           for n in ("bptt", "autodiff", "torch", "flax"))
        lines.append(f"{_model_cells(p)} {ms('bptt')} | {ms('autodiff')} | {bf16} "
                     f"| {ms('torch')} "
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
        f"in every layer; input and output size H/4; float32 (`bf16`: bfloat16 compute, "
        f"below); loss: mean squared error of a "
        f"linear readout at every step; Adam (lr {s['lr']}) on every side; the same initial "
        f"weights and data on every side. Speed-up = other's time / bptt's time (> 1: bptt "
        f"is faster). `bptt bf16 ms (/ f32)`: bptt with bfloat16 compute and, in brackets, "
        f"its time / bptt's float32 time (< 1: faster in bfloat16; the section "
        f"*bfloat16 compute against float32* below has autodiff and the memory).",
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
        f"{_pressure_text(bench.get('cpu_pressure_end'))} at the end; load average "
        f"(`uptime`, 1/5/15 min): {_load_text(env.get('load_average_start'))} at the start, "
        f"{_load_text(bench.get('load_average_end'))} at the end."
        + (f" Command: `{bench['command']}`." if bench.get("command") else ""),
    ]
    lines += _bf16_section(bench)
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


def _spread(values: list[float]) -> str:
    """``min-max (geometric mean g)`` of some ratios, two decimals."""
    g = math.exp(sum(math.log(x) for x in values) / len(values))
    return f"{min(values):.2f}-{max(values):.2f} (geometric mean {g:.2f})"


def _bf16_verdict(bench: dict, method: str) -> str:
    """One plain sentence: is ``method`` faster or slower, larger or smaller, in bfloat16?"""
    r = [p["ratios"] for p in bench["results"]
         if p["ratios"].get(f"{method}_bf16_over_f32_time") is not None]
    if not r:
        return f"`{method}`: not run in bfloat16."
    time = [x[f"{method}_bf16_over_f32_time"] for x in r]
    peak = [x[f"{method}_bf16_over_f32_peak"] for x in r if x[f"{method}_bf16_over_f32_peak"]]
    temp = [x[f"{method}_bf16_over_f32_temp"] for x in r if x[f"{method}_bf16_over_f32_temp"]]
    faster = sum(t < 1 for t in time)
    text = (f"`{method}` in bfloat16 was faster than in float32 at {faster} of {len(time)} "
            f"points and slower at {len(time) - faster}: bf16/f32 time {_spread(time)}")
    if peak:
        smaller = sum(x < 1 for x in peak)
        text += (f"; its peak memory was smaller at {smaller} of {len(peak)} points, bf16/f32 "
                 f"peak {_spread(peak)}, temp {_spread(temp)}")
    return text + "."


def _bf16_section(bench: dict) -> list[str]:
    """The markdown section of bfloat16 compute against float32 (none if it did not run)."""
    names = ("bptt", "autodiff", "bptt_bf16", "autodiff_bf16")
    if not any(p["methods"].get(n, {}).get("status") == "ok"
               for p in bench["results"] for n in names[2:]):
        return []
    s, env = bench["settings"], bench["environment"]
    head = ("| cell | T | B | H | L | bidir | bptt f32 ms | bptt bf16 ms | bptt bf16/f32 time "
            "| autodiff f32 ms | autodiff bf16 ms | autodiff bf16/f32 time "
            "| bptt peak MB (f32 / bf16) | bptt bf16/f32 peak (temp) "
            "| autodiff peak MB (f32 / bf16) | autodiff bf16/f32 peak (temp) |")
    lines = ["", "## bfloat16 compute against float32", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for p in bench["results"]:
        m, r = p["methods"], p["ratios"]
        row = [_model_cells(p)]
        for meth in ("bptt", "autodiff"):
            row.append(f" {_ms(m, meth, s['repeats'])} | {_ms(m, meth + '_bf16', s['repeats'])} "
                       f"| {_r2(r.get(f'{meth}_bf16_over_f32_time'))} |")
        for meth in ("bptt", "autodiff"):
            row.append(f" {_mb(m, meth)} / {_mb(m, meth + '_bf16')} "
                       f"| {_r2(r.get(f'{meth}_bf16_over_f32_peak'))} "
                       f"({_r2(r.get(f'{meth}_bf16_over_f32_temp'))}) |")
        lines.append("".join(row))
    flags = env.get("cpu_bf16_flags")
    flags = ("unknown" if flags is None else ", ".join(flags) if flags else "none")
    lines += [
        "",
        "`bf16`: the same jaxrnn training step built with `jaxrnn.RNN(..., "
        "compute_dtype=jnp.bfloat16)`, timed in the same rounds as the other contenders, "
        "from the same float32 weights and data: the parameters, Adam's state and the batch "
        "stay float32 (master weights); each recurrent step's matrix products and gate math "
        "run in bfloat16; the carry, the backward pass's cotangents and the weight-gradient "
        "products stay float32. bf16/f32 = the bfloat16 step's median time (peak bytes, "
        "XLA temp bytes) / the float32 step's: < 1 is faster (smaller) in bfloat16. Peak "
        "as above (XLA's buffer assignment: arguments + outputs - aliased + temp); the "
        "arguments are the same float32 buffers in both, so the difference is all in temp.",
        "",
        f"On this machine ({env['cpu']}, {env['threads']['jax_xla_cpu']} XLA threads; "
        f"bfloat16 CPU flags: {flags}; jax {env['versions']['jax']}, jaxlib "
        f"{env['versions']['jaxlib']}): {_bf16_verdict(bench, 'bptt')} "
        f"{_bf16_verdict(bench, 'autodiff')}",
    ]
    return lines


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
        "bptt_bf16": ("jaxrnn bptt, bf16 compute", "lightskyblue"),
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
    fig.suptitle(f"One training step (forward, backward, Adam), float32 (bf16: bfloat16 "
                 f"compute, float32 weights), {env['cpu']}, "
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
