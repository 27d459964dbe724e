"""Character language model: Elman vs LSTM vs GRU at equal parameter count (issue #6).

Which recurrent cell models text best for a fixed budget of parameters? This
script trains a one-layer character language model (``jaxrnn.make_task("charlm")``:
one-hot characters in, a softmax over the next character out, loss ``"xent"``)
on the English documentation every Python installation ships
(``pydoc_data.topics``, ~465k characters; the last 10% held out) with each of
the three cells. The reference cell's hidden size is fixed (LSTM, 128 units);
the other cells get the hidden size whose parameter count, counted from the
parameter pytree (recurrent weights and biases plus the readout), is nearest
to the reference's, so all three have the same number of parameters to within
``param_tolerance``.

Every cell sees the same batches (same seed), the same initialisation scheme
(PyTorch's), Adam with the same learning rate on a cosine schedule, and
global-norm clipping. Every ``eval_every`` steps the held-out text is scored in
bits per character (``task.eval_batch()``: consecutive 64-character windows of
the held-out text, each started from a zero state); the unigram entropy of the
training text (the best a model without context can do) is the baseline. After
training, each model writes a sample (``jaxrnn.sample``) from the prompt
``"The "``.

    python experiments/charlm_cells.py --quick --out /tmp/cl   # seconds
    python experiments/charlm_cells.py     # full: docs/experiments/charlm_cells/ (~9 min, 2 cores)

Writes ``charlm_cells.json``, ``charlm_cells.png`` and ``samples.txt`` under ``--out``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import common  # noqa: E402
import jaxrnn  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Settings:
    cells: tuple[str, ...] = ("elman", "lstm", "gru")  # the cells compared (one layer each)
    reference_cell: str = "lstm"  # the cell whose hidden size is fixed
    reference_hidden: int = 128  # its hidden size; the others are matched to its parameter count
    param_tolerance: float = 0.03  # the matched counts must lie within this relative distance
    seq_len: int = 64  # T: characters per training window (and per held-out window)
    batch_size: int = 32  # windows per Adam step
    eval_size: int = 256  # held-out windows scored (256 x 64 = 16,384 characters)
    steps: int = 4000  # Adam steps per cell
    lr: float = 3e-3  # peak learning rate of Adam (the same for every cell)
    schedule: str = "cosine"  # "cosine": decay from lr to 0 over the steps; "constant"
    clip: float = 1.0  # global gradient-norm clipping (an optax chain)
    eval_every: int = 100  # steps between held-out evaluations (and at the end)
    seed: int = 0  # seed of the batches and the initialisation (the same for every cell)
    sample_length: int = 400  # characters sampled from each trained model
    temperature: float = 0.8  # sampling temperature
    prompt: str = "The "  # the samples' prompt


FULL = Settings()
QUICK = Settings(reference_hidden=16, seq_len=32, batch_size=8, eval_size=16, steps=25,
                 eval_every=10, lr=1e-2, sample_length=60)


def param_count(params) -> int:
    """The number of scalars in a parameter pytree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def model_for(cell: str, hidden: int, vocab: int) -> jaxrnn.RNN:
    return jaxrnn.RNN(cell=cell, input_size=vocab, hidden_size=hidden, output_size=vocab)


def count_for(cell: str, hidden: int, vocab: int) -> int:
    """The parameter count of a one-layer model, from its (abstract) parameter pytree."""
    model = model_for(cell, hidden, vocab)
    return param_count(jax.eval_shape(lambda: model.init(jax.random.key(0))))


def matched_hidden_sizes(s: Settings, vocab: int) -> dict[str, int]:
    """Each cell's hidden size: the reference's, or the one nearest its parameter count.

    The count grows monotonically with the hidden size, so a bisection finds the
    crossing and the nearer of its two neighbours is taken.
    """
    target = count_for(s.reference_cell, s.reference_hidden, vocab)
    out = {}
    for cell in s.cells:
        if cell == s.reference_cell:
            out[cell] = s.reference_hidden
            continue
        lo, hi = 1, 1
        while count_for(cell, hi, vocab) < target:
            hi *= 2
        while hi - lo > 1:  # invariant: count(lo) < target <= count(hi), or lo = hi = 1
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if count_for(cell, mid, vocab) < target else (lo, mid)
        out[cell] = min((lo, hi), key=lambda h: abs(count_for(cell, h, vocab) - target))
    return out


def train_cell(s: Settings, task, cell: str, hidden: int, progress: bool) -> dict:
    """Trains one cell; returns its curves, final numbers, sample and timings."""
    model = model_for(cell, hidden, task.vocab_size)
    params = model.init(jax.random.key(s.seed))
    lr = optax.cosine_decay_schedule(s.lr, s.steps) if s.schedule == "cosine" else s.lr
    optimizer = jaxrnn.make_optimizer("adam", lr, clip=s.clip)
    opt_state = optimizer.init(params)
    step = jaxrnn.make_train_step(model, optimizer, loss="xent")
    eval_batch = task.eval_batch()
    eval_loss = jax.jit(lambda p, b: model.loss(p, b.xs, b.targets, loss="xent"))

    def held_out_bpc(p) -> float:
        return jaxrnn.bits_per_char(float(eval_loss(p, eval_batch)))

    curve = [(0, held_out_bpc(params))]  # (step, held-out bits/char)
    train_curve = []  # (step, mean training bits/char since the previous evaluation)
    window = []
    t0 = time.perf_counter()
    compile_s, t_steady = None, None
    with tqdm(total=s.steps, desc=f"{cell} H={hidden}", disable=not progress,
              dynamic_ncols=True) as bar:
        for i in range(1, s.steps + 1):
            params, opt_state, metrics = step(params, opt_state, task.batch(i - 1))
            if i == 1:
                jax.block_until_ready(params)
                compile_s = time.perf_counter() - t0  # compile + the first step
                t_steady = time.perf_counter()
            window.append(metrics["loss"])
            if i % s.eval_every == 0 or i == s.steps:
                train_bpc = jaxrnn.bits_per_char(float(np.mean(jax.device_get(window))))
                if not math.isfinite(train_bpc):
                    raise FloatingPointError(f"{cell}: the training loss became {train_bpc} "
                                             f"by step {i}")
                train_curve.append((i, train_bpc))
                window = []
                curve.append((i, held_out_bpc(params)))
                bar.set_postfix(train_bpc=f"{train_bpc:.3f}", eval_bpc=f"{curve[-1][1]:.3f}",
                                refresh=False)
            bar.update(1)
    wall = time.perf_counter() - t0
    steady = time.perf_counter() - t_steady
    ids = jaxrnn.sample(model, params, task.encode(s.prompt), s.sample_length,
                        jax.random.key(s.seed + 1), temperature=s.temperature)
    return {
        "cell": cell, "hidden": hidden, "params": param_count(params),
        "final_eval_bpc": curve[-1][1], "best_eval_bpc": min(b for _, b in curve),
        "final_train_bpc": train_curve[-1][1],
        "eval_curve": curve, "train_curve": train_curve,
        "compile_s": compile_s, "train_wall_s": wall,
        # steps after the first (which compiles), including the evaluations' cost
        "steps_per_s": (s.steps - 1) / steady if s.steps > 1 and steady > 0 else None,
        "sample": s.prompt + task.decode(np.asarray(ids)),
    }


def plot(s: Settings, results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    colors = {"elman": "tab:red", "lstm": "tab:blue", "gru": "tab:green"}
    for r in results["cells"].values():
        color = colors.get(r["cell"])
        steps, bpc = zip(*r["eval_curve"])
        ax.plot(steps, bpc, "o-", ms=3, lw=1.5, color=color,
                label=f"{r['cell']} H={r['hidden']} ({r['params']:,} params): held-out "
                      f"{r['final_eval_bpc']:.3f}")
        steps, bpc = zip(*r["train_curve"])
        ax.plot(steps, bpc, lw=0.8, alpha=0.5, ls=":", color=color)
    h = results["unigram_entropy_bits"]
    ax.axhline(h, color="k", ls="--", lw=1, label=f"unigram entropy {h:.3f} (no context)")
    ax.plot([], [], "k:", lw=0.8, alpha=0.5, label="training bits/char (dotted)")
    # From the first evaluation after step 0 down (the start, near log2(V), is off the top).
    cells = results["cells"].values()
    top = max([h] + [r["eval_curve"][min(1, len(r["eval_curve"]) - 1)][1] for r in cells])
    low = min([h] + [r["best_eval_bpc"] for r in cells]
              + [b for r in cells for _, b in r["train_curve"]])
    ax.set_ylim(low - 0.1, top + 0.25)
    ax.set_xlabel("Adam step")
    ax.set_ylabel("bits per character")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    ax.set_title(f"Character LM on {results['text']} ({results['vocab_size']} characters), "
                 f"one layer, equal parameter counts\nheld-out bits/char; T={s.seq_len}, "
                 f"B={s.batch_size}, Adam {s.lr:g} ({s.schedule}), clip {s.clip:g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(s: Settings, out: Path, progress: bool) -> dict:
    task = jaxrnn.make_task("charlm", seq_len=s.seq_len, batch_size=s.batch_size,
                            eval_size=s.eval_size, seed=s.seed)
    hidden = matched_hidden_sizes(s, task.vocab_size)
    counts = {c: count_for(c, h, task.vocab_size) for c, h in hidden.items()}
    ref = counts[s.reference_cell]
    spread = max(abs(n / ref - 1) for n in counts.values())
    if spread > s.param_tolerance:
        raise ValueError(f"parameter counts {counts} differ by {spread:.1%} from the "
                         f"reference's, more than param_tolerance={s.param_tolerance:g}")
    eval_batch = task.eval_batch()
    results = {
        "text": task.source, "vocab_size": task.vocab_size,
        "train_chars": int(len(task.train_ids)), "held_out_chars": int(len(task.eval_ids)),
        "eval_chars_scored": int(eval_batch.targets.size),
        "unigram_entropy_bits": task.unigram_entropy_bits(),
        "hidden": hidden, "param_counts": counts,
        "max_param_deviation": spread,  # max |count / reference - 1|
        "cells": {},
    }
    for cell in s.cells:
        results["cells"][cell] = train_cell(s, task, cell, hidden[cell], progress)
    results["ranking"] = sorted(s.cells, key=lambda c: results["cells"][c]["final_eval_bpc"])
    plot(s, results, out / "charlm_cells.png")
    with open(out / "samples.txt", "w") as f:
        for r in results["cells"].values():
            f.write(f"=== {r['cell']} H={r['hidden']} ({r['params']:,} params), held-out "
                    f"{r['final_eval_bpc']:.3f} bits/char, temperature {s.temperature:g} ===\n")
            f.write(r["sample"] + "\n\n")
    return results


if __name__ == "__main__":
    sys.exit(common.main("charlm_cells", __doc__, FULL, QUICK, run))
