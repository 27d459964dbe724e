r"""Truncated BPTT cannot learn a dependency longer than its truncation (issue #6).

Reproduces the textbook limit of truncated backpropagation through time
(Williams & Peng 1990; Williams & Zipser 1995; Sutskever 2013, PhD thesis): an RNN
trained with BPTT(k, k) gets no gradient for dependencies longer than k steps.

The task is *delayed recall*: the inputs are random signs
:math:`x_t \in \{-1, +1\}` (uniform, independent) and the target at step t is
the input d steps earlier, :math:`y_t = x_{t-d}` for :math:`t \ge d` (0 before,
where there is nothing to recall). A network that does not remember predicts 0
and scores the chance level, held-out MSE :math:`E[x^2] = 1` on the scored steps
:math:`t \ge d`; a network that stores the last d inputs scores 0. An LSTM is
trained with truncated BPTT(k, k) (``jaxrnn.make_tbptt_step`` with k1 = k2 = k)
for several k, and with full BPTT (k = T), for two delays d.

What "k <= d cannot learn it" means exactly here. With k1 = k2 = k,
``jaxrnn.extend.truncation_windows`` cuts the sequence into chunks
:math:`[s, s + k)`, :math:`s = k \lfloor t / k \rfloor`; the loss of step t is
differentiated through steps s..t only, and the state entering the chunk is a
constant (its gradient is stopped). So the gradient of the loss at step t
reaches the input :math:`x_{t-d}` if and only if :math:`t - d \ge s`, i.e.
:math:`(t \bmod k) \ge d`. For k <= d this never happens: no update ever
depends on how :math:`x_{t-d}` was processed, so nothing teaches the network to
keep it. For k > d the steps with :math:`t \bmod k \ge d` (a fraction of about
(k - d)/k of them, ``gradient_reach`` in the results) do carry that gradient;
full BPTT reaches :math:`x_{t-d}` from every scored step. The claim is about
gradients only: the forward pass does carry the state across chunks, so a
k <= d network can still read whatever its state happens to hold of
:math:`x_{t-d}` (the in-window gradient rewards decoding and carrying the
incoming state, never storing the input). With d = 10 the k <= d runs stay at
chance; with d = 5 they end a few percent below it, which is that effect.

Every run sees the same training sequences (a batch per training step); note
that BPTT(k, k) makes T/k optimizer updates per batch, so the short truncations
get *more* updates, not fewer. Held-out loss: MSE on steps t >= d of a fixed
held-out batch, the whole sequence run from the zero state.

    python experiments/truncation_length.py --quick --out /tmp/trunc   # seconds (the tests)
    python experiments/truncation_length.py    # 16 runs (~3 min on 2 CPU cores)
                                               # -> docs/experiments/truncation_length/
"""

from __future__ import annotations

import dataclasses
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxrnn_lab import harness as common
import jaxrnn
from jaxrnn.extend import truncation_windows

CHANCE = 1.0  # held-out MSE of predicting 0: E[x^2] for random signs


@dataclasses.dataclass(frozen=True)
class Settings:
    delays: tuple[int, ...] = (5, 10)  # d: the target at step t is the input at t - d
    truncations: tuple[int, ...] = (2, 5, 6, 10, 11, 15, 20)  # k of BPTT(k, k); full BPTT is added
    seq_len: int = 40  # T, steps per training and held-out sequence (full BPTT is k = T)
    cell: str = "lstm"  # the recurrent cell
    hidden: int = 32  # hidden units
    batch: int = 32  # sequences per training batch
    steps: int = 1500  # training batches per run (each makes T/k optimizer updates)
    lr: float = 5e-3  # Adam's peak learning rate, cosine-decayed to 0 over a run's updates
    clip: float = 1.0  # global-norm gradient clipping
    eval_every: int = 50  # training batches between held-out evaluations
    eval_size: int = 512  # sequences in the held-out batch
    learned_below: float = 0.1  # "learned" = final held-out MSE below this (10% of chance)
    seed: int = 0  # data and initialisation seed (the same for every run)


FULL = Settings()
QUICK = Settings(delays=(4,), truncations=(2,), seq_len=12, steps=200, lr=1e-2,
                 eval_every=25, eval_size=256)


# --- the task -------------------------------------------------------------------

def delayed_recall(rng: np.random.Generator, batch: int, seq_len: int, delay: int) -> jaxrnn.Batch:
    """A batch of the delayed-recall task: ``xs (T, B, 1)`` random signs, ``targets (T, B, 1)``
    with ``targets[t] = xs[t - delay]`` for ``t >= delay`` and 0 before."""
    signs = rng.choice(np.array([-1.0, 1.0], np.float32), size=(seq_len, batch))
    targets = np.zeros_like(signs)
    targets[delay:] = signs[:-delay]
    return jaxrnn.Batch(signs[:, :, None], targets[:, :, None])


def gradient_reach(seq_len: int, k: int, delay: int) -> float:
    """The fraction of the scored steps ``t >= delay`` whose loss gradient under BPTT(k, k)
    reaches the input ``x[t - delay]`` (read off ``truncation_windows``)."""
    hits = sum(1 for ws, _, s, e in truncation_windows(seq_len, k, k)
               for t in range(max(s, delay), e) if t - delay >= ws)
    return hits / (seq_len - delay)


# --- one run --------------------------------------------------------------------

def make_step(s: Settings, model: jaxrnn.RNN, k: int):
    """The BPTT(k, k) train step and its optimizer (the schedule spans a run's updates)."""
    updates = s.steps * len(truncation_windows(s.seq_len, k, k))
    optimizer = jaxrnn.make_optimizer("adam", optax.cosine_decay_schedule(s.lr, updates),
                                      clip=s.clip)
    return jaxrnn.make_tbptt_step(model, optimizer, k1=k, k2=k, loss="mse"), optimizer


def train_one(s: Settings, model: jaxrnn.RNN, k: int, delay: int, step, optimizer, evaluate,
              eval_batch) -> dict:
    """Trains one network with BPTT(k, k) on delay ``delay``; returns its curves and numbers."""
    updates_per_batch = len(truncation_windows(s.seq_len, k, k))
    params = model.init(jax.random.key(s.seed))

    def held_out(params):
        return float(evaluate(params, eval_batch.xs, eval_batch.targets, delay=delay))

    eval_steps, eval_loss, train_loss, running = [0], [held_out(params)], [], []

    def on_row(row):  # logged at the evaluations: the mean training loss since the last one
        train_loss.append(float(np.mean(jax.device_get(running))))
        running.clear()
        eval_steps.append(row["step"])
        eval_loss.append(row["eval_loss"])

    def batch(i):
        return delayed_recall(np.random.default_rng([s.seed, 0, i]), s.batch, s.seq_len, delay)

    t0 = time.perf_counter()
    res = jaxrnn.train_loop(step, params, optimizer.init(params), batch, s.steps,
                            log_every=s.eval_every, eval_every=s.eval_every,
                            evaluate=lambda p: {"eval_loss": held_out(p)}, on_row=on_row,
                            on_step=lambda i, m: running.append(m["loss"]), progress=False)
    if res.status == "nonfinite":  # diverged: the curve so far, then the broken state's score
        on_row({"step": res.step, "eval_loss": held_out(res.params)})
    wall = time.perf_counter() - t0
    final = eval_loss[-1]
    return {"k": k, "full_bptt": k == s.seq_len, "delay": delay,
            "gradient_reach": gradient_reach(s.seq_len, k, delay),
            "updates_per_batch": updates_per_batch, "final_loss": final,
            "best_loss": min(eval_loss), "learned": bool(final < s.learned_below),
            "eval_steps": eval_steps, "eval_loss": eval_loss, "train_loss": train_loss,
            "wall_s": wall}


def run(s: Settings, out: Path, progress: bool) -> dict:
    """Trains every (delay, truncation) pair plus full BPTT; writes the two figures."""
    ks = sorted(set(s.truncations)) + [s.seq_len]
    if max(s.delays) >= s.seq_len or min(s.truncations) < 1 or max(s.truncations) > s.seq_len:
        raise ValueError("need delays < seq_len and truncations in [1, seq_len]")
    model = jaxrnn.RNN(cell=s.cell, input_size=1, hidden_size=s.hidden, output_size=1)
    eval_batches = {d: delayed_recall(np.random.default_rng([s.seed, 1]), s.eval_size,
                                      s.seq_len, d) for d in s.delays}

    @partial(jax.jit, static_argnames=("delay",))
    def evaluate(params, xs, targets, delay):
        ys, _ = model.apply(params, xs)
        return jnp.mean((ys[delay:] - targets[delay:]) ** 2)  # the scored steps t >= delay

    runs, steps = [], {}  # one step function per k, shared by the delays (compiled once)
    pairs = [(d, k) for d in s.delays for k in ks]
    with tqdm(pairs, desc="truncation runs", disable=not progress, dynamic_ncols=True) as bar:
        for d, k in bar:
            bar.set_postfix_str(f"d={d} k={'full' if k == s.seq_len else k}")
            if k not in steps:
                steps[k] = make_step(s, model, k)
            runs.append(train_one(s, model, k, d, *steps[k], evaluate, eval_batches[d]))
            bar.set_postfix_str(f"d={d} k={k}: {runs[-1]['final_loss']:.3g}")

    figures = [plot_final(s, runs, out / "truncation_length.png"),
               plot_curves(s, runs, out / "truncation_curves.png")]
    table = {f"d={d}": {("full" if r["full_bptt"] else str(r["k"])): r["final_loss"]
                        for r in runs if r["delay"] == d} for d in s.delays}
    for d, row in table.items():
        print(f"{d}: " + "  ".join(f"k={k}: {v:.3g}" for k, v in row.items()))
    return {"chance": CHANCE, "final_loss": table, "runs": runs,
            "figures": [p.name for p in figures]}


# --- figures --------------------------------------------------------------------

def plot_final(s: Settings, runs: list[dict], path: Path) -> Path:
    """Final held-out MSE against the truncation length, one line per delay."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, d in enumerate(s.delays):
        rs = [r for r in runs if r["delay"] == d]
        ax.plot([r["k"] for r in rs], [max(r["final_loss"], 1e-5) for r in rs], "o-",
                color=f"C{i}", label=f"delay d = {d}")
        ax.axvline(d, color=f"C{i}", ls=":", lw=1.2, label=f"k = d = {d}")
    ax.axhline(CHANCE, color="gray", ls="--", lw=1, label=f"chance (predict 0): {CHANCE:g}")
    ax.axhline(s.learned_below, color="gray", ls=":", lw=1,
               label=f'"learned" threshold {s.learned_below:g}')
    ax.set_xscale("log")
    ks = sorted({r["k"] for r in runs})
    ax.set_xticks(ks)
    # a label right after a close neighbour (10, 11) goes one line lower
    ax.set_xticklabels([f"full\n({k})" if k == s.seq_len else
                        ("\n" if i and k < 1.2 * ks[i - 1] else "") + str(k)
                        for i, k in enumerate(ks)])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_ylim(top=2)
    ax.set_xlabel("truncation length k of BPTT(k, k)")
    ax.set_ylabel(f"final held-out MSE (after {s.steps} batches)")
    ax.set_title(f"Delayed recall y_t = x_(t-d): {s.cell.upper()} {s.hidden}, T = {s.seq_len}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(s: Settings, runs: list[dict], path: Path) -> Path:
    """Held-out MSE against training batches, one panel per delay, one curve per k."""
    plt = common.pyplot()
    n = len(s.delays)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4), dpi=120, squeeze=False, sharey=True)
    ks = sorted({r["k"] for r in runs})
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(ks)))
    for ax, d in zip(axes[0], s.delays):
        for r in (r for r in runs if r["delay"] == d):
            name = "full BPTT" if r["full_bptt"] else f"k = {r['k']}"
            ax.plot(r["eval_steps"], np.maximum(np.asarray(r["eval_loss"], float), 1e-5),
                    color=colors[ks.index(r["k"])], lw=1.5,
                    ls="-" if r["k"] > d else "-.", label=name)
        ax.axhline(CHANCE, color="gray", ls="--", lw=1, label="chance")
        ax.set_yscale("log")
        ax.set_xlabel("training batch")
        ax.set_title(f"delay d = {d} (dash-dot: k <= d)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("held-out MSE")
    axes[0][-1].legend(fontsize=7, loc="lower left", ncol=2)
    fig.suptitle(f"Truncated BPTT(k, k) on delayed recall: {s.cell.upper()} {s.hidden}, "
                 f"T = {s.seq_len}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(common.main("truncation_length", __doc__, FULL, QUICK, run))
