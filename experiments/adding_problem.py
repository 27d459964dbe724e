"""The adding problem: Elman (tanh) vs LSTM vs GRU vs IndRNN as the sequence grows (issues #6, #11).

Reproduces the classic long-time-lag result of Hochreiter & Schmidhuber (1997,
"Long short-term memory", experiment 4) and Le, Jaitly & Hinton (2015, "A simple
way to initialize recurrent networks of rectified linear units", sec. 4.1): on the
adding problem a plain tanh RNN trained by BPTT does not get past the best constant
answer once the two marked numbers lie far back, while an LSTM learns the sum.
The GRU (Cho et al. 2014) is added alongside, and the IndRNN (Li et al. 2018,
"Independently recurrent neural network", ``cell="indrnn", nonlinearity="relu"``:
h_t = relu(W x_t + u * h_{t-1} + b), u a vector, the library's init u ~ U(0, 1)),
which Li et al. report solving the adding problem at T = 1000 and beyond. At the
long lengths T = 500 and 1000 only the LSTM and the IndRNN are run (``long_cells``).

Task (``tasks.make_task("adding")``): T steps of (value ~ U(0, 1), marker); two
markers, one in each half of the sequence; the target, asked at the last step
only, is the sum of the two marked values. Always answering 1 scores the
baseline MSE 1/6 = 0.167 (the variance of the target). A run counts as *solved*
when its final held-out MSE is below ``solved_fraction`` x baseline = 0.0167,
i.e. the model explains over 90% of the target's variance (R^2 > 0.9), far below
anything a model that ignores the markers can reach.

Every cell has the same hidden size, batch, optimizer (Adam, lr 0.01, global-norm
clipping at 1: the settings of ``jaxrnn train --task adding``, with 32 units and
batches of 32 to fit the time budget), PyTorch's initialisation (the IndRNN's
own for u), the same data stream and a fixed number of steps per length.

Budget of the long lengths: about 15 minutes of compute on the shared 2-core
machine. Measured training steps (B=32, H=32, T=1000, jit-compiled, CPU pressure
~45%): LSTM 57 ms, IndRNN 5 ms (T=500: about half). 5000 steps at each of T=500
and T=1000 then cost about 5000 x (57 + 28 + 5 + 2.5) ms = 8 min, plus evaluations.

The ``indrnn_li`` rows train the IndRNN as Li et al. (2018) do on this task
(their reference code, github.com/Sunnydreamrain/IndRNN_Theano_Lasagne,
``adding/adding.py``): two relu layers of 128 units, Adam at 2e-4, the recurrent
weights bounded by ``|u| <= 2^(1/T)`` (``jaxrnn.IndRNN(recurrent_max=...)`` for the
initial range, ``jaxrnn.extend.clip_recurrent`` at the end of the optax chain after
every update), input weights ~ N(0, 0.001^2), zero biases, the readout from the
last step; see ``li_setup`` for what differs (global-norm clipping instead of
their per-step clipping inside the gradient, jaxrnn's readout initialisation,
and far fewer steps: ``li_steps``, chosen from the measured step time).

    python experiments/adding_problem.py --quick --out /tmp/adding   # seconds (the tests)
    python experiments/adding_problem.py    # 23 runs -> docs/experiments/adding_problem/
    python experiments/adding_problem.py --only indrnn_li   # rerun the indrnn_li rows
                                            # only, keeping the other rows of the JSON
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxrnn_lab import harness as common
import jaxrnn
from jaxrnn_app import tasks
from jaxrnn_app.tasks import ADDING_BASELINE
from jaxrnn.extend import clip_recurrent


@dataclasses.dataclass(frozen=True)
class Settings:
    cells: tuple[str, ...] = ("elman", "lstm", "gru", "indrnn")  # the recurrent cells compared
    lengths: tuple[int, ...] = (20, 50, 100, 200, 500, 1000)  # T, steps per sequence (one panel each)
    steps: tuple[int, ...] = (3000, 3000, 4000, 5000, 5000, 5000)  # training steps at each length
    long_from: int = 500  # lengths >= this are run by long_cells only
    long_cells: tuple[str, ...] = ("lstm", "indrnn")  # the cells run at the long lengths
    nonlinearity: tuple[tuple[str, str], ...] = (("indrnn", "relu"),)  # per cell; others tanh
    hidden: int = 32  # hidden units, the same for every cell
    batch: int = 32  # sequences per training batch
    lr: float = 1e-2  # Adam's learning rate (constant)
    clip: float = 1.0  # global-norm gradient clipping
    eval_every: int = 100  # steps between held-out evaluations
    eval_size: int = 512  # sequences in the held-out batch
    solved_fraction: float = 0.1  # solved = final held-out MSE < this x baseline (R^2 > 0.9)
    seed: int = 0  # data and initialisation seed (the same for every run)
    # The "indrnn_li" rows: the IndRNN as Li et al. (2018) train it on this task (their
    # reference code, Sunnydreamrain/IndRNN_Theano_Lasagne adding/adding.py): 2 relu
    # layers of 128 units, Adam 2e-4, |u| <= 2^(1/T) kept by clipping after every update,
    # u of the first layer ~ U(0, 2^(1/T)) and of the last ~ U(2^(-1/T), 2^(1/T)),
    # input weights ~ N(0, 0.001^2), zero biases, the readout from the last step.
    li_lengths: tuple[int, ...] = (100, 500, 1000)  # T of the indrnn_li rows
    li_steps: tuple[int, ...] = (1000, 1000, 1000)  # their training steps (the time budget)
    li_hidden: int = 128  # units per layer
    li_layers: int = 2  # stacked IndRNN layers
    li_lr: float = 2e-4  # Adam's learning rate (constant: Li et al. divide it by 10
    #                      only after 20,000 steps)
    li_magnitude: float = 2.0  # |u| <= li_magnitude ** (1 / T) (their MAG)
    li_input_std: float = 1e-3  # standard deviation of the input weights
    li_clip: float = 10.0  # global-norm gradient clipping (their grad_clipping=10 clips
    #                        inside the gradient, per step, which jaxrnn does not do)


FULL = Settings()
QUICK = Settings(lengths=(10,), steps=(200,), hidden=16, eval_every=25, eval_size=256,
                 li_lengths=(10,), li_steps=(200,), li_hidden=16)
LI = "indrnn_li"  # the row name of the IndRNN as Li et al. train it


def rows(s: Settings) -> tuple[str, ...]:
    """The rows of the results: the cells at the shared settings, then ``LI``."""
    return s.cells + (LI,)


def plan(s: Settings, only: str | None = None) -> list[tuple[int, int, str]]:
    """The runs, as ``(T, steps, row)`` in order of T: every cell below ``long_from``,
    ``long_cells`` from there, and the ``LI`` row at ``li_lengths``; with ``only``,
    that row's runs alone."""
    if len(s.steps) != len(s.lengths):
        raise ValueError(f"steps {s.steps} must give one count per length {s.lengths}")
    if len(s.li_steps) != len(s.li_lengths) or not set(s.li_lengths) <= set(s.lengths):
        raise ValueError(f"li_steps {s.li_steps} must give one count per length of "
                         f"li_lengths {s.li_lengths}, each one of lengths {s.lengths}")
    runs = [(T, n, cell) for T, n in zip(s.lengths, s.steps) for cell in s.cells
            if T < s.long_from or cell in s.long_cells]
    runs += [(T, n, LI) for T, n in zip(s.li_lengths, s.li_steps)]
    runs.sort(key=lambda r: r[0])  # stable: the cells' order within a length
    return [r for r in runs if only is None or r[2] == only]


def cells_at(s: Settings, T: int) -> list[str]:
    """The cells run at length ``T``."""
    return [cell for T_, _, cell in plan(s) if T_ == T]


def li_setup(s: Settings, task, seq_len: int):
    """``(model, optimizer, params)`` of the IndRNN as Li et al. (2018) train it.

    ``IndRNN("relu", recurrent_max=r)``, r = ``li_magnitude ** (1 / T)``, draws every
    layer's ``u`` in ``[0, r)``; the last layer's is redrawn in ``[1/r, r)`` and the
    input weights from N(0, ``li_input_std``^2), biases zero (their code); the readout
    keeps jaxrnn's initialisation. ``jaxrnn.extend.clip_recurrent(r)``, last in the
    optax chain, keeps ``|u| <= r`` after every update.
    """
    r = s.li_magnitude ** (1.0 / seq_len)
    model = jaxrnn.RNN(cell=jaxrnn.IndRNN("relu", recurrent_max=r), input_size=task.input_size,
                       hidden_size=s.li_hidden, output_size=task.output_size,
                       num_layers=s.li_layers)
    optimizer = optax.chain(jaxrnn.make_optimizer("adam", s.li_lr, clip=s.li_clip),
                            clip_recurrent(r))
    params = model.init(jax.random.key(s.seed))
    layers = []
    for l, (p,) in enumerate(params.layers):
        k_in, k_u = jax.random.split(jax.random.fold_in(jax.random.key(s.seed), 1000 + l))
        w_ih = s.li_input_std * jax.random.normal(k_in, p.w_ih.shape, p.w_ih.dtype)
        u = (jax.random.uniform(k_u, p.w_hh.shape, p.w_hh.dtype, 1.0 / r, r)
             if l == len(params.layers) - 1 else p.w_hh)  # the last layer: U(1/r, r)
        layers.append((p._replace(w_ih=w_ih, w_hh=u, b_ih=jnp.zeros_like(p.b_ih),
                                  b_hh=jnp.zeros_like(p.b_hh)),))
    return model, optimizer, params._replace(layers=tuple(layers))


def train_one(s: Settings, cell: str, seq_len: int, steps: int) -> dict:
    """Trains one row (a cell at the shared settings, or ``LI``) at one length; returns
    its held-out curve and final numbers."""
    task = tasks.make_task("adding", seq_len=seq_len, batch_size=s.batch, seed=s.seed,
                            eval_size=s.eval_size)
    if cell == LI:
        model, optimizer, params = li_setup(s, task, seq_len)
    else:
        model = jaxrnn.RNN(cell=cell, nonlinearity=dict(s.nonlinearity).get(cell, "tanh"),
                           input_size=task.input_size, hidden_size=s.hidden,
                           output_size=task.output_size)
        optimizer = jaxrnn.make_optimizer("adam", s.lr, clip=s.clip)
        params = model.init(jax.random.key(s.seed))
    step = jaxrnn.make_train_step(model, optimizer, loss="mse", last_only=True)
    opt_state = optimizer.init(params)
    eval_batch = task.eval_batch()

    @jax.jit
    def evaluate(params, xs, targets):
        ys, _ = model.apply(params, xs)
        return jnp.mean((ys[-1] - targets[-1]) ** 2)  # the last step is the only one scored

    def held_out(p) -> float:
        return float(evaluate(p, eval_batch.xs, eval_batch.targets))

    eval_steps, eval_mse, train_loss = [0], [held_out(params)], []
    running = []  # the training losses since the previous evaluation (device arrays)

    def on_eval(p) -> dict:
        train_loss.append(float(np.mean(jax.device_get(running))))
        running.clear()
        return {"eval_mse": held_out(p)}

    t0 = time.perf_counter()
    # The loop's guard stops at the first evaluation after a non-finite loss: the
    # curve so far is kept and the final MSE is NaN.
    res = jaxrnn.train_loop(step, params, opt_state, task.batch, steps,
                            log_every=s.eval_every, eval_every=s.eval_every,
                            evaluate=on_eval,
                            on_step=lambda i, m: running.append(m["loss"]),
                            progress=False)
    eval_steps += [row["step"] for row in res.history]
    eval_mse += [row["eval_mse"] for row in res.history]
    diverged = res.status == "nonfinite" or not all(map(math.isfinite, eval_mse))
    wall = time.perf_counter() - t0
    threshold = s.solved_fraction * ADDING_BASELINE
    final = math.nan if diverged else eval_mse[-1]
    solved_at = next((st for st, v in zip(eval_steps, eval_mse) if v < threshold), None)
    return {"cell": cell, "seq_len": seq_len, "steps": steps, "final_mse": final,
            "best_mse": min(eval_mse), "solved": bool(final < threshold),
            "first_below_threshold_step": solved_at, "diverged": diverged,
            "eval_steps": eval_steps, "eval_mse": eval_mse, "train_loss": train_loss,
            "wall_s": wall}


def previous_runs(s: Settings, out: Path, only: str) -> tuple[list[dict], dict]:
    """The runs of ``OUT/adding_problem.json`` that a rerun of row ``only`` keeps.

    Returns:
        ``(runs, sources)``: the earlier runs of every other row (each marked
        ``"source": "previous"``) and a note per row on where it comes from.

    Raises:
        common.UsageError: no earlier results there, or results made with other
            settings for the kept rows (every field not starting with ``li_``).
    """
    path = out / "adding_problem.json"
    try:
        record = json.loads(path.read_text())
        kept = [r for r in record["results"]["runs"] if r["cell"] != only]
        then = record["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise common.UsageError(f"--only {only} merges with the results in {path}, which "
                                f"cannot be read ({type(e).__name__}: {e})") from None
    now = common.to_jsonable(s)
    differ = sorted(k for k in now if not k.startswith("li_") and then.get(k) != now[k])
    if differ:
        raise common.UsageError(f"--only {only}: {path} was made with other settings for "
                                f"the rows it keeps ({', '.join(differ)} differ)")
    rows_kept = sorted({r["cell"] for r in kept}, key=list(rows(s)).index)
    earlier = record["results"].get("row_sources", {})  # a row kept twice keeps its first note
    note = (f"kept from the earlier run in {path.name} (its wall_s "
            f"{record.get('wall_s', float('nan')):.0f}, quick={record.get('quick')})")
    sources = {row: earlier[row] if earlier.get(row, "this run") != "this run" else note
               for row in rows_kept}
    return [dict(r, source="previous") for r in kept], sources


def run(s: Settings, out: Path, progress: bool, only: str | None = None) -> dict:
    """Trains every row at its lengths (or only row ``only``, keeping the other rows'
    earlier results from ``OUT``); writes the curves and the summary figure."""
    kept, sources = previous_runs(s, out, only) if only else ([], {})
    runs = []
    with tqdm(plan(s, only), desc="adding runs", disable=not progress,
              dynamic_ncols=True) as bar:
        for T, n, cell in bar:
            bar.set_postfix_str(f"{cell} T={T}")
            runs.append(dict(train_one(s, cell, T, n), source="this run"))
            bar.set_postfix_str(f"{cell} T={T}: {runs[-1]['final_mse']:.3g}")
    sources.update({row: "this run" for row in dict.fromkeys(r["cell"] for r in runs)})
    runs = sorted(kept + runs, key=lambda r: (r["seq_len"], list(rows(s)).index(r["cell"])))

    threshold = s.solved_fraction * ADDING_BASELINE
    final = {c: {str(r["seq_len"]): r["final_mse"] for r in runs if r["cell"] == c}
             for c in rows(s)}
    solved = {c: {str(r["seq_len"]): r["solved"] for r in runs if r["cell"] == c}
              for c in rows(s)}
    print("final held-out MSE (* = solved, below %.4f; - = not run):" % threshold)
    for c in rows(s):
        print(f"  {c:9s} " + "  ".join(
            f"T={T}: {final[c][str(T)]:.4f}{'*' if solved[c][str(T)] else ' '}"
            if str(T) in final[c] else f"T={T}: {'-':7s}" for T in s.lengths))
    figures = [plot_curves(s, runs, out / "adding_problem_curves.png"),
               plot_summary(s, runs, out / "adding_problem_summary.png")]
    return {"baseline": ADDING_BASELINE, "solved_threshold": threshold, "final_mse": final,
            "solved": solved, "row_sources": sources, "runs": runs,
            "figures": [p.name for p in figures]}


# --- figures --------------------------------------------------------------------

def _label(s: Settings, row: str) -> str:
    if row != LI:
        return row
    return (f"{LI}: {s.li_layers}x{s.li_hidden} relu, Adam {s.li_lr:g}, "
            f"|u| <= {s.li_magnitude:g}^(1/T)")


def _threshold_lines(ax, s: Settings):
    ax.axhline(ADDING_BASELINE, color="gray", ls="--", lw=1,
               label=f"baseline (answer 1): {ADDING_BASELINE:.3f}")
    ax.axhline(s.solved_fraction * ADDING_BASELINE, color="gray", ls=":", lw=1,
               label=f"solved: < {s.solved_fraction * ADDING_BASELINE:.4f}")


def plot_curves(s: Settings, runs: list[dict], path: Path) -> Path:
    """Held-out MSE against training step: one panel per length, one curve per cell."""
    plt = common.pyplot()
    n = len(s.lengths)
    fig, axes = plt.subplots(1, n, figsize=(max(4.2 * n, 6.5), 4.2), dpi=120, squeeze=False,
                             sharey=True)
    for ax, T in zip(axes[0], s.lengths):
        for i, cell in enumerate(rows(s)):
            r = next((r for r in runs if r["cell"] == cell and r["seq_len"] == T), None)
            if r is None:
                continue  # not run at this length
            ax.plot(r["eval_steps"], r["eval_mse"], color=f"C{i}", lw=1.5,
                    label=_label(s, cell) + (" (diverged)" if r["diverged"] else ""))
        _threshold_lines(ax, s)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_title(f"T = {T}")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("held-out MSE (last step)")
    handles, labels = {}, {}
    for ax in axes[0]:  # every row that was run somewhere, once
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center",
               ncol=min(len(handles), 4), fontsize=8)
    fig.suptitle(f"Adding problem: held-out MSE during training ({s.hidden} units, "
                 f"batch {s.batch}, Adam {s.lr:g})", fontsize=11)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_summary(s: Settings, runs: list[dict], path: Path) -> Path:
    """Final held-out MSE against the sequence length, one line per cell."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120)
    for i, cell in enumerate(rows(s)):
        rs = [r for r in runs if r["cell"] == cell]
        ax.plot([r["seq_len"] for r in rs], [r["final_mse"] for r in rs], "o-",
                color=f"C{i}", label=_label(s, cell))
    _threshold_lines(ax, s)
    ax.set_xscale("log")
    ax.set_xticks(list(s.lengths))
    ax.set_xticklabels([str(T) for T in s.lengths])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("final held-out MSE")
    ax.set_title("Adding problem: final held-out MSE by cell and length\n"
                 f"(steps per length: {', '.join(map(str, s.steps))}; {LI}: "
                 f"{', '.join(map(str, s.li_steps))})", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


OPTIONS = (common.Option("--only", {"choices": [LI], "default": None, "help": (
    f"rerun only this row and keep every other row from the JSON already in --out "
    f"(made with the same settings); the JSON's row_sources says which run made which row")}),)


def main(argv: list[str] | None = None) -> int:
    """The command line (``common.main`` with ``--only``); returns the exit status."""
    return common.main("adding_problem", __doc__, FULL, QUICK, run, argv, options=OPTIONS)


if __name__ == "__main__":
    sys.exit(main())
