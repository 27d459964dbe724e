"""Character language model: every built-in cell at equal parameter count, seeds and a learning-rate sweep.

Which recurrent cell models text best for a fixed budget of parameters? This
script trains a one-layer character language model (``tasks.make_task("charlm")``:
one-hot characters in, a softmax over the next character out, loss ``"xent"``)
on the English documentation every Python installation ships
(``pydoc_data.topics``, ~465k characters; the last 10% held out) with each
built-in cell: Elman (tanh), LSTM, GRU, IndRNN (tanh), the peephole LSTM and the
layer-normalised LSTM. The LSTM-family cells start with ``forget_bias=1``
(Jozefowicz et al. 2015). The reference cell's hidden size is fixed (LSTM, 128
units); every other cell gets the hidden size whose parameter count, counted from
the parameter pytree (recurrent weights, biases and the cell's own parameters such
as IndRNN's vector ``u`` or the layer-norm gains, plus the readout), is nearest to
the reference's, within ``param_tolerance``.

Fairness: each cell gets its own learning rate, chosen by a small sweep. The
design (``Settings``): every rate of ``lrs`` is trained with the first seed; the
rate with the lowest final bits per character on a *validation* slice of the
held-out text is the cell's chosen rate, and the other seeds are trained at that
rate only (5 runs per cell with 3 rates and 3 seeds). The seed sets the
initialisation and the order of the training batches. The *test* slice (the
first ``eval_size`` 64-character windows of the held-out text, the slice the
earlier version of this experiment scored) is never used for a choice; the
validation slice is the next ``val_size`` windows. The table reports, per cell,
the test bits per character at the chosen rate as mean, sample standard deviation
and range over the seeds, and the whole sweep.

Every run: Adam on a cosine schedule from its peak rate to 0 over ``steps``,
global-norm clipping, the same batches for a given seed. The peak rate lives in the
optimizer state (``optax.inject_hyperparams``), so one compiled train step serves
every rate and seed of a cell. Every ``eval_every`` steps both slices are scored
(each window from a zero state); the unigram entropy of the training text is the
no-context baseline. A sample (``jaxrnn.sample``, prompt ``"The "``) is written
from each cell's first-seed run at its chosen rate. ``--quick`` trains three of
the cells (LSTM, GRU, IndRNN: compiling is most of its time).

    python experiments/charlm_cells.py --quick --out /tmp/cl   # seconds
    python experiments/charlm_cells.py     # full: docs/experiments/charlm_cells/ (20 min, 2 shared cores)

Writes ``charlm_cells.json`` (every run: cell, seed, rate, curves, final and best
bits per character), ``charlm_cells.png`` and ``samples.txt`` under ``--out``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrnn_lab import harness as common
import jaxrnn
from jaxrnn_app import tasks
from jaxrnn import Batch


@dataclasses.dataclass(frozen=True)
class Settings:
    cells: tuple[str, ...] = ("elman", "lstm", "gru", "indrnn", "peephole_lstm",
                              "layernorm_lstm")  # the cells compared (one layer each)
    forget_bias: tuple[tuple[str, float], ...] = (
        ("lstm", 1.0), ("peephole_lstm", 1.0), ("layernorm_lstm", 1.0))  # per cell; others 0
    reference_cell: str = "lstm"  # the cell whose hidden size is fixed
    reference_hidden: int = 128  # its hidden size; the others are matched to its parameter count
    param_tolerance: float = 0.03  # the matched counts must lie within this relative distance
    seq_len: int = 64  # T: characters per training window (and per held-out window)
    batch_size: int = 32  # windows per Adam step
    eval_size: int = 256  # test windows: the first of the held-out text (256 x 64 = 16,384 chars)
    val_size: int = 256  # validation windows: the next ones (choose the rate on these only)
    steps: int = 1000  # Adam steps per run (chosen from the measured step times: see the README)
    lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)  # the peak learning rates swept per cell
    seeds: tuple[int, ...] = (0, 1, 2)  # the sweep runs seeds[0]; the rest run the chosen rate
    schedule: str = "cosine"  # "cosine": decay from the peak rate to 0 over the steps; "constant"
    clip: float = 1.0  # global gradient-norm clipping (an optax chain)
    eval_every: int = 100  # steps between held-out evaluations (and at the end)
    sample_length: int = 400  # characters sampled from each cell's chosen first-seed model
    temperature: float = 0.8  # sampling temperature
    prompt: str = "The "  # the samples' prompt


FULL = Settings()
QUICK = Settings(cells=("lstm", "gru", "indrnn"), reference_hidden=16, seq_len=32, batch_size=8, eval_size=16, val_size=16,
                 steps=25, lrs=(1e-2, 2e-2), seeds=(0, 1), eval_every=10, sample_length=60)


def param_count(params) -> int:
    """The number of scalars in a parameter pytree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def model_for(s: Settings, cell: str, hidden: int, vocab: int) -> jaxrnn.RNN:
    return jaxrnn.RNN(cell=cell, input_size=vocab, hidden_size=hidden, output_size=vocab,
                      forget_bias=dict(s.forget_bias).get(cell, 0.0))


def count_for(s: Settings, cell: str, hidden: int, vocab: int) -> int:
    """The parameter count of a one-layer model, from its (abstract) parameter pytree."""
    model = model_for(s, cell, hidden, vocab)
    return param_count(jax.eval_shape(lambda: model.init(jax.random.key(0))))


def matched_hidden_sizes(s: Settings, vocab: int) -> dict[str, int]:
    """Each cell's hidden size: the reference's, or the one nearest its parameter count.

    The count grows monotonically with the hidden size, so a bisection finds the
    crossing and the nearer of its two neighbours is taken.
    """
    target = count_for(s, s.reference_cell, s.reference_hidden, vocab)
    out = {}
    for cell in s.cells:
        if cell == s.reference_cell:
            out[cell] = s.reference_hidden
            continue
        lo, hi = 1, 1
        while count_for(s, cell, hi, vocab) < target:
            hi *= 2
        while hi - lo > 1:  # invariant: count(lo) < target <= count(hi), or lo = hi = 1
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if count_for(s, cell, mid, vocab) < target else (lo, mid)
        out[cell] = min((lo, hi), key=lambda h: abs(count_for(s, cell, h, vocab) - target))
    return out


def held_out_slices(s: Settings, task) -> dict[str, Batch]:
    """The test slice (``task.eval_batch()``: the first ``eval_size`` windows of the
    held-out text) and the validation slice (the next ``val_size`` windows).

    Returns:
        ``{"test": Batch, "val": Batch}``, ``xs (T, N, V)`` one-hot, ``targets (T, N)``.

    Raises:
        ValueError: the held-out text is too short for both slices.
    """
    T, ids = s.seq_len, task.eval_ids
    test = task.eval_batch()
    first = test.targets.shape[1]  # windows the test slice holds
    if (len(ids) - 1) // T < first + s.val_size:
        raise ValueError(f"eval_size={s.eval_size} + val_size={s.val_size} windows of "
                         f"{T + 1} characters do not fit the held-out text ({len(ids)})")
    win = ids[np.arange(T + 1)[:, None] + T * (first + np.arange(s.val_size))]  # (T+1, N)
    val = Batch(jax.nn.one_hot(jnp.asarray(win[:-1]), task.vocab_size, dtype=test.xs.dtype),
                jnp.asarray(win[1:], jnp.int32))
    return {"test": test, "val": val}


def optimizer_for(s: Settings) -> optax.GradientTransformation:
    """Clipped Adam on the schedule, its peak rate a hyperparameter in the state (``step_size``).

    The same as ``jaxrnn.make_optimizer("adam", schedule(lr), clip=s.clip)`` (optax's
    adam is ``scale_by_adam`` then ``-schedule(count)``), but with the peak rate read
    from the state, so one compiled step serves every rate: see ``with_lr``.
    """
    shape = optax.cosine_decay_schedule(1.0, s.steps) if s.schedule == "cosine" else (
        optax.constant_schedule(1.0))
    return optax.chain(optax.clip_by_global_norm(s.clip), optax.scale_by_adam(),
                       optax.scale_by_schedule(shape),
                       optax.inject_hyperparams(optax.scale)(step_size=-1.0))


def with_lr(opt_state, lr: float):
    """``opt_state`` with the peak learning rate set to ``lr`` (the scale ``-lr``)."""
    old = optax.tree_utils.tree_get(opt_state, "step_size")
    return optax.tree_utils.tree_set(opt_state, step_size=jnp.asarray(-lr, jnp.asarray(old).dtype))


@functools.lru_cache(maxsize=None)
def compiled_for(s: Settings, cell: str, hidden: int, vocab: int):
    """``(model, optimizer, step, bpc)`` of one cell, built (and compiled) once for all its runs."""
    model = model_for(s, cell, hidden, vocab)
    optimizer = optimizer_for(s)
    step = jaxrnn.make_train_step(model, optimizer, loss="xent")
    loss = jax.jit(lambda p, b: model.loss(p, b.xs, b.targets, loss="xent"))
    return model, optimizer, step, lambda p, b: tasks.bits_per_char(float(loss(p, b)))


def train_one(s: Settings, cell: str, hidden: int, lr: float, seed: int,
              progress: bool) -> tuple[dict, jaxrnn.RNNParams]:
    """Trains one cell at one peak rate and seed.

    The seed sets the initialisation and the training batches; the held-out
    slices are the same for every run. A run whose training loss becomes
    non-finite stops there, ``diverged`` true and its final numbers None.

    Returns:
        ``(result, params)``: the run's curves and final numbers (JSON-ready), and
        its trained parameters.
    """
    task = tasks.make_task("charlm", seq_len=s.seq_len, batch_size=s.batch_size,
                            eval_size=s.eval_size, seed=seed)
    model, optimizer, step, bpc = compiled_for(s, cell, hidden, task.vocab_size)
    slices = held_out_slices(s, task)
    params = model.init(jax.random.key(seed))
    opt_state = with_lr(optimizer.init(params), lr)

    def scores(p) -> dict[str, float]:
        return {name: bpc(p, b) for name, b in slices.items()}

    curve = [(0, scores(params))]  # (step, {"test": bits/char, "val": bits/char})
    train_curve = []  # (step, mean training bits/char since the previous evaluation)
    window = []  # the training losses since the previous evaluation (device arrays)

    def evaluate(p) -> dict:
        train_curve.append(tasks.bits_per_char(float(np.mean(jax.device_get(window)))))
        window.clear()
        return scores(p)

    t0 = time.perf_counter()
    # The loop's guard stops at the first evaluation after a non-finite loss, before
    # evaluating: the curve so far is kept and the run counts as diverged.
    res = jaxrnn.train_loop(step, params, opt_state, task.batch, s.steps,
                            log_every=s.eval_every, eval_every=s.eval_every,
                            evaluate=evaluate,
                            on_step=lambda i, m: window.append(m["loss"]),
                            progress=progress, desc=f"{cell} H={hidden} lr={lr:g} seed={seed}")
    params, diverged = res.params, res.status == "nonfinite"
    curve += [(row["step"], {"test": row["test"], "val": row["val"]}) for row in res.history]
    train_curve = [(row["step"], t) for row, t in zip(res.history, train_curve)]
    wall = time.perf_counter() - t0
    last = None if diverged else curve[-1][1]
    out = {
        "cell": cell, "hidden": hidden, "params": param_count(params), "lr": lr, "seed": seed,
        "diverged": diverged,
        "final_test_bpc": last and last["test"], "final_val_bpc": last and last["val"],
        "best_test_bpc": min(c["test"] for _, c in curve),
        "final_train_bpc": train_curve[-1][1] if train_curve and not diverged else None,
        "eval_steps": [st for st, _ in curve],
        "test_curve": [c["test"] for _, c in curve], "val_curve": [c["val"] for _, c in curve],
        "train_curve": train_curve, "wall_s": wall,  # wall: the first run of a cell compiles
    }
    return out, params


def sample_text(s: Settings, task, cell: str, hidden: int, params, seed: int) -> str:
    """``s.sample_length`` characters sampled from a trained model after ``s.prompt``."""
    model = compiled_for(s, cell, hidden, task.vocab_size)[0]
    ids = jaxrnn.sample(model, params, task.encode(s.prompt), s.sample_length,
                        jax.random.key(seed + 1), temperature=s.temperature)
    return s.prompt + task.decode(np.asarray(ids))


def summarize(s: Settings, runs: list[dict], cell: str) -> dict:
    """One cell's chosen rate (lowest final validation bpc of the first-seed sweep) and
    the test bpc over the seeds at that rate: mean, sample standard deviation, range."""
    sweep = {r["lr"]: r for r in runs if r["cell"] == cell and r["seed"] == s.seeds[0]}
    ok = [lr for lr in s.lrs if not sweep[lr]["diverged"]]
    if not ok:
        raise FloatingPointError(f"{cell}: every rate of the sweep {s.lrs} diverged")
    chosen = min(ok, key=lambda lr: sweep[lr]["final_val_bpc"])
    at = sorted((r for r in runs if r["cell"] == cell and r["lr"] == chosen),
                key=lambda r: r["seed"])
    test = [r["final_test_bpc"] for r in at if not r["diverged"]]  # diverged seeds left out
    return {"chosen_lr": chosen, "seeds": [r["seed"] for r in at],
            "diverged_seeds": [r["seed"] for r in at if r["diverged"]], "test_bpc": test,
            "mean": float(np.mean(test)),
            "std": float(np.std(test, ddof=1)) if len(test) > 1 else 0.0,
            "min": min(test), "max": max(test),
            "sweep": {str(lr): {"val": sweep[lr]["final_val_bpc"],
                                "test": sweep[lr]["final_test_bpc"],
                                "diverged": sweep[lr]["diverged"]} for lr in s.lrs}}


COLORS = {"elman": "tab:red", "lstm": "tab:blue", "gru": "tab:green", "indrnn": "tab:orange",
          "peephole_lstm": "tab:purple", "layernorm_lstm": "tab:brown"}


def plot(s: Settings, results: dict, path: Path) -> None:
    """Left: the mean test curve per cell at its chosen rate, a band from the lowest to
    the highest seed. Right: the sweep's final validation bpc against the rate."""
    plt = common.pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.8), dpi=120,
                                  gridspec_kw={"width_ratios": [2.3, 1]})
    runs, summary = results["runs"], results["summary"]
    lows, tops = [], []
    for cell in s.cells:
        sm = summary[cell]
        at = [r for r in runs if r["cell"] == cell and r["lr"] == sm["chosen_lr"]
              and not r["diverged"]]
        steps = at[0]["eval_steps"]
        curves = np.array([r["test_curve"] for r in at])  # (seeds, evaluations)
        mean = curves.mean(axis=0)
        color = COLORS.get(cell)
        ax.plot(steps, mean, "o-", ms=3, lw=1.5, color=color,
                label=f"{cell} H={at[0]['hidden']}, lr {sm['chosen_lr']:g}: "
                      f"{sm['mean']:.3f} ± {sm['std']:.3f}")
        ax.fill_between(steps, curves.min(axis=0), curves.max(axis=0), color=color, alpha=0.2)
        lows.append(curves.min())
        tops.append(mean[min(1, len(mean) - 1)])
        xs = [lr for lr in s.lrs if not sm["sweep"][str(lr)]["diverged"]]
        ax2.plot(xs, [sm["sweep"][str(lr)]["val"] for lr in xs], "o-", color=color, ms=4,
                 label=cell)
        ax2.plot([sm["chosen_lr"]], [sm["sweep"][str(sm["chosen_lr"])]["val"]], "*",
                 color=color, ms=11)
    h = results["unigram_entropy_bits"]
    ax.axhline(h, color="k", ls="--", lw=1, label=f"unigram entropy {h:.3f} (no context)")
    # From the first evaluation after step 0 down (the start, near log2(V), is off the top).
    ax.set_ylim(min(lows + [h]) - 0.1, max(tops + [h]) + 0.25)
    ax.set_xlabel("Adam step")
    ax.set_ylabel("test bits per character")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper right")
    ax.set_title(f"mean over seeds {list(s.seeds)} at each cell's chosen rate "
                 f"(band: min to max)", fontsize=9)
    ax2.set_xscale("log")
    ax2.set_xticks(list(s.lrs))
    ax2.set_xticklabels([f"{lr:g}" for lr in s.lrs])
    ax2.minorticks_off()
    ax2.set_xlabel("peak learning rate")
    ax2.set_ylabel(f"final validation bits/char (seed {s.seeds[0]})")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=7)
    ax2.set_title("learning-rate sweep (* = chosen)", fontsize=9)
    fig.suptitle(f"Character LM on {results['text']} ({results['vocab_size']} characters), one "
                 f"layer, ~{results['param_counts'][s.reference_cell]:,} parameters each; "
                 f"T={s.seq_len}, B={s.batch_size}, {s.steps} Adam steps ({s.schedule}), "
                 f"clip {s.clip:g}", fontsize=9.5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _report(r: dict, out: Path, runs: list[dict]) -> None:
    """One line per finished run, and every run so far in ``OUT/charlm_cells.partial.json``
    (removed once the full results are written), so an interrupted run keeps its numbers."""
    common.write_json(out / "charlm_cells.partial.json", runs)
    print(f"{r['cell']} H={r['hidden']} lr={r['lr']:g} seed={r['seed']}: "
          + ("diverged" if r["diverged"] else
             f"test {r['final_test_bpc']:.4f} val {r['final_val_bpc']:.4f}")
          + f" ({r['wall_s']:.0f} s)", flush=True)


def run(s: Settings, out: Path, progress: bool) -> dict:
    task = tasks.make_task("charlm", seq_len=s.seq_len, batch_size=s.batch_size,
                            eval_size=s.eval_size, seed=s.seeds[0])
    hidden = matched_hidden_sizes(s, task.vocab_size)
    counts = {c: count_for(s, c, h, task.vocab_size) for c, h in hidden.items()}
    ref = counts[s.reference_cell]
    spread = max(abs(n / ref - 1) for n in counts.values())
    if spread > s.param_tolerance:
        raise ValueError(f"parameter counts {counts} differ by {spread:.1%} from the "
                         f"reference's, more than param_tolerance={s.param_tolerance:g}")
    slices = held_out_slices(s, task)
    results = {
        "text": task.source, "vocab_size": task.vocab_size,
        "train_chars": int(len(task.train_ids)), "held_out_chars": int(len(task.eval_ids)),
        "test_chars_scored": int(slices["test"].targets.size),
        "val_chars_scored": int(slices["val"].targets.size),
        "unigram_entropy_bits": task.unigram_entropy_bits(),
        "hidden": hidden, "param_counts": counts,
        "max_param_deviation": spread,  # max |count / reference - 1|
        "design": "every rate of lrs with seeds[0]; the other seeds at the rate with the "
                  "lowest final validation bpc; scored on the test slice",
        "runs": [], "summary": {},
    }
    runs = results["runs"]
    for cell in s.cells:
        t0 = time.perf_counter()
        trained = {}  # the sweep's parameters, by rate (one is sampled)
        for lr in s.lrs:
            r, trained[lr] = train_one(s, cell, hidden[cell], lr, s.seeds[0], progress)
            runs.append(r)
            _report(r, out, runs)
        chosen = summarize(s, runs, cell)["chosen_lr"]  # from the first seed's sweep
        runs[-len(s.lrs) + s.lrs.index(chosen)]["sample"] = sample_text(
            s, task, cell, hidden[cell], trained[chosen], s.seeds[0])
        del trained
        for seed in s.seeds[1:]:
            runs.append(train_one(s, cell, hidden[cell], chosen, seed, progress)[0])
            _report(runs[-1], out, runs)
        results["summary"][cell] = summarize(s, runs, cell)
        results["summary"][cell]["wall_s"] = time.perf_counter() - t0
    results["ranking"] = sorted(s.cells, key=lambda c: results["summary"][c]["mean"])
    (out / "charlm_cells.partial.json").unlink()
    plot(s, results, out / "charlm_cells.png")
    with open(out / "samples.txt", "w") as f:
        for cell in s.cells:
            sm = results["summary"][cell]
            r = next(r for r in runs if r["cell"] == cell and r["seed"] == s.seeds[0]
                     and r["lr"] == sm["chosen_lr"])
            f.write(f"=== {cell} H={r['hidden']} ({r['params']:,} params), lr {r['lr']:g}, "
                    f"seed {r['seed']}, test {r['final_test_bpc']:.3f} bits/char, "
                    f"temperature {s.temperature:g} ===\n")
            f.write(r["sample"] + "\n\n")
    print("test bits/char at each cell's chosen rate (mean ± sd over seeds; sweep val bpc):")
    for cell in results["ranking"]:
        sm = results["summary"][cell]
        sweep = "  ".join(f"{lr}: {v['val'] if v['val'] is None else round(v['val'], 3)}"
                          for lr, v in sm["sweep"].items())
        print(f"  {cell:15s} lr {sm['chosen_lr']:<6g} {sm['mean']:.3f} ± {sm['std']:.3f}  "
              f"[{sweep}]")
    return results


if __name__ == "__main__":
    sys.exit(common.main("charlm_cells", __doc__, FULL, QUICK, run))
