"""Gradient clipping against exploding gradients (Pascanu, Mikolov & Bengio 2013).

Pascanu et al. show that the loss surface of a recurrent network has "cliffs":
where the gradient explodes, one plain SGD step with a learning rate that is
otherwise fine throws the parameters far away and training diverges; rescaling
the gradient whenever its norm exceeds a threshold (clipping) keeps the step
bounded and lets training go on with the same learning rate. This script
trains a tanh Elman network whose recurrent matrix starts at spectral radius
1.5 (large enough for exploding gradients) on next-value prediction of noisy
sine waves (``tasks.make_task("sine")``), with plain SGD, for several seeds:

* without clipping at a large learning rate (0.1): most seeds diverge, the
  loss and the gradient norm go to infinity within tens of steps;
* with global-norm clipping at 1 (``optax.clip_by_global_norm`` in front of
  SGD, ``jaxrnn.make_optimizer(..., clip=1.0)``) and the same learning rate: every
  seed trains;
* without clipping at a 3x smaller learning rate (a control): how far the
  learning rate must come down for plain SGD to train.

Each run records its per-step training loss, gradient norm before clipping
and parameter-update norm; a run whose loss or gradient becomes NaN or
infinite is stopped there and its step recorded.

    python experiments/gradient_clipping.py --quick --out /tmp/gc   # seconds
    python experiments/gradient_clipping.py     # full: docs/experiments/gradient_clipping/

Writes ``gradient_clipping.json`` and ``gradient_clipping.png`` under ``--out``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from jaxrnn_lab import harness as common  # noqa: E402
import jaxrnn  # noqa: E402
from jaxrnn_app import tasks  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Settings:
    task: str = "sine"  # jaxrnn task: next-value prediction of noisy sine waves (loss every step)
    seq_len: int = 50  # T of the training sequences
    batch_size: int = 32  # sequences per SGD step
    hidden_size: int = 64  # H of the tanh Elman network
    radius: float = 1.5  # spectral radius W_hh is rescaled to at initialisation (> 1: explodes)
    optimizer: str = "sgd"  # optax optimizer, as in Pascanu et al. (plain SGD)
    lr: float = 0.1  # the large learning rate, with and without clipping
    clip: float = 1.0  # global-norm clipping threshold
    control_lr: float | None = 0.03  # a smaller learning rate without clipping (None: skip)
    steps: int = 800  # SGD steps per run (a diverged run stops earlier)
    seeds: int = 8  # runs per configuration (initialisation and data stream)
    final_window: int = 50  # the final loss is the mean of the last this many training losses
    smooth: int = 10  # running-mean window of the losses in the figure's right panel


FULL = Settings()
QUICK = Settings(steps=60, seeds=2, control_lr=None, final_window=10, smooth=5)


def configurations(s: Settings) -> list[dict]:
    """The training configurations compared: name, learning rate, clipping threshold."""
    out = [{"name": "no clipping", "lr": s.lr, "clip": None},
           {"name": f"clipping at {s.clip:g}", "lr": s.lr, "clip": s.clip}]
    if s.control_lr is not None:
        out.append({"name": "no clipping, small lr", "lr": s.control_lr, "clip": None})
    for c in out:
        c["label"] = f"{c['name']} (lr {c['lr']:g})"
    return out


def init_params(model: jaxrnn.RNN, seed: int, radius: float) -> jaxrnn.RNNParams:
    """PyTorch's initialisation, then W_hh rescaled to spectral radius ``radius``."""
    return common.with_spectral_radius(model.init(jax.random.key(seed)), radius)[0]


@jax.jit
def tree_distance(a, b):
    """||a - b|| over every leaf: the norm of a parameter update."""
    return optax.tree.norm(jax.tree.map(jnp.subtract, a, b))


def sig(x: float, digits: int = 4):
    """``x`` to ``digits`` significant digits (keeps the JSON small); None if not finite."""
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def make_step(s: Settings, model: jaxrnn.RNN, config: dict):
    """The configuration's optimizer and jit-compiled train step (compiled once, for all seeds)."""
    task = tasks.make_task(s.task)
    optimizer = jaxrnn.make_optimizer(s.optimizer, config["lr"], clip=config["clip"])
    # donate=False: the previous parameters are kept to measure the update's norm
    step = jaxrnn.make_train_step(model, optimizer, loss=task.loss,
                                  last_only=task.last_step_only, donate=False)
    return optimizer, step


def train(s: Settings, model: jaxrnn.RNN, optimizer, step, eval_loss, seed: int) -> dict:
    """One run; stops at the first non-finite loss, gradient or update norm (divergence)."""
    task = tasks.make_task(s.task, seq_len=s.seq_len, batch_size=s.batch_size, seed=seed)
    params = init_params(model, seed, s.radius)

    def step_and_update_norm(params, opt_state, batch):
        new_params, opt_state, metrics = step(params, opt_state, batch)
        return new_params, opt_state, {**metrics,
                                       "update_norm": tree_distance(new_params, params)}

    ev = task.eval_batch()  # held-out, scored once at the end of a run that did not diverge
    res = jaxrnn.train_loop(step_and_update_norm, params, optimizer.init(params), task.batch,
                            s.steps, log_every=1, eval_every=s.steps,
                            evaluate=lambda p: {"eval_loss": eval_loss(p, ev.xs, ev.targets)},
                            finite=("loss", "grad_norm", "update_norm"), progress=False)
    rows = res.history
    if res.status == "nonfinite":  # the step that diverged is recorded too
        rows = rows + [{k: float(res.metrics[k]) for k in ("loss", "grad_norm", "update_norm")}]
    losses = [r["loss"] for r in rows]
    grad_norms = [r["grad_norm"] for r in rows]
    update_norms = [r["update_norm"] for r in rows]
    diverged_at = res.first_bad  # steps are counted from 1
    finite = [g for g in grad_norms if math.isfinite(g)]
    finite_updates = [u for u in update_norms if math.isfinite(u)]
    run = {"seed": seed, "diverged_at": diverged_at, "steps_run": len(losses),
           "initial_loss": losses[0],
           "max_grad_norm": max(finite) if finite else None,  # before clipping
           "median_grad_norm": float(np.median(finite)) if finite else None,
           "max_update_norm": max(finite_updates) if finite_updates else None,
           "final_loss": None, "eval_loss": None}
    if diverged_at is None:
        run["final_loss"] = float(np.mean(losses[-s.final_window:]))
        run["eval_loss"] = rows[-1]["eval_loss"]  # held-out batch
    run["loss"] = [sig(v) for v in losses]  # per step (None where not finite)
    run["grad_norm"] = [sig(v) for v in grad_norms]  # per step, before clipping
    return run


def summarize(config: dict, runs: list[dict]) -> dict:
    ok = [r for r in runs if r["diverged_at"] is None]
    finals = [r["final_loss"] for r in ok]
    return {
        "diverged": len(runs) - len(ok), "n_runs": len(runs),
        "diverged_at": [r["diverged_at"] for r in runs if r["diverged_at"] is not None],
        "median_final_loss": float(np.median(finals)) if finals else None,  # non-diverged runs
        "max_final_loss": max(finals) if finals else None,
        "median_eval_loss": float(np.median([r["eval_loss"] for r in ok])) if ok else None,
        "max_grad_norm": max(r["max_grad_norm"] for r in runs if r["max_grad_norm"] is not None),
        "max_update_norm": max(r["max_update_norm"] for r in runs
                               if r["max_update_norm"] is not None),
        # what clipping guarantees for SGD: every update is at most lr * clip long
        "update_bound": config["lr"] * config["clip"] if config["clip"] else None,
    }


def smooth(v: np.ndarray, window: int) -> np.ndarray:
    """The running mean of the last ``window`` values (fewer at the start)."""
    c = np.cumsum(np.insert(v, 0, 0.0))
    k = np.arange(1, len(v) + 1)
    return (c[k] - c[np.maximum(k - window, 0)]) / np.minimum(k, window)


def plot(s: Settings, results: list[dict], path: Path) -> None:
    fig, (ax_loss, ax_grad, ax_ok) = plt.subplots(1, 3, figsize=(18, 4.8))
    colors = {"no clipping": "tab:red", f"clipping at {s.clip:g}": "tab:blue",
              "no clipping, small lr": "tab:gray"}
    marked = False  # the divergence marker is labelled once
    for r in results:
        color = colors.get(r["name"], None)
        label_all = f"{r['label']}: {r['diverged']}/{r['n_runs']} diverged"
        for j, run in enumerate(r["runs"]):
            label = label_all if j == 0 else None
            for ax, key in ((ax_loss, "loss"), (ax_grad, "grad_norm")):
                v = np.array([np.nan if x is None else x for x in run[key]], dtype=float)
                steps = np.arange(1, len(v) + 1)
                ax.plot(steps, v, color=color, lw=0.7, alpha=0.7, label=label)
                if run["diverged_at"] is not None:  # mark the last finite value
                    finite = np.flatnonzero(np.isfinite(v))
                    if finite.size:
                        k = finite[-1]
                        first = key == "loss" and not marked
                        ax.plot(steps[k], v[k], "x", color=color, ms=8, mew=2,
                                label="diverged (next step NaN/inf)" if first else None)
                        marked = marked or first
        # the runs that did not diverge: median over seeds of the smoothed loss
        ok = [smooth(np.array(run["loss"], dtype=float), s.smooth)
              for run in r["runs"] if run["diverged_at"] is None]
        if ok:
            ok = np.array(ok)
            steps = np.arange(1, ok.shape[1] + 1)
            ax_ok.plot(steps, np.median(ok, axis=0), color=color,
                       label=f"{r['label']}: median of {len(ok)} runs")
            ax_ok.fill_between(steps, ok.min(axis=0), ok.max(axis=0), color=color, alpha=0.2,
                               lw=0)
    ax_grad.axhline(s.clip, color="k", ls="--", lw=1, label=f"clipping threshold {s.clip:g}")
    for ax in (ax_loss, ax_grad, ax_ok):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("SGD step (log scale)")
        ax.grid(True, which="major", alpha=0.3)
    ax_loss.axhline(0.5, color="k", ls=":", lw=1, label="predict 0 (loss 0.5)")
    ax_loss.set_ylabel("training loss (MSE)")
    ax_loss.set_title("training loss")
    ax_grad.set_ylabel("global gradient norm, before clipping")
    ax_grad.set_title("gradient norm")
    ax_ok.axhline(0.5, color="k", ls=":", lw=1, label="predict 0 (loss 0.5)")
    ax_ok.set_ylabel(f"training loss, running mean of {s.smooth} steps")
    ax_ok.set_title("runs that did not diverge (median, min-max band)")
    ax_loss.legend(fontsize=8, loc="center right")
    ax_grad.legend(fontsize=8, loc="center right")
    ax_ok.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Gradient clipping (Pascanu et al. 2013): tanh Elman H={s.hidden_size}, "
                 f"W_hh spectral radius {s.radius:g} at init, {s.task} task T={s.seq_len}, "
                 f"{s.optimizer.upper()}, {s.seeds} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(s: Settings, out: Path, progress: bool) -> dict:
    task = tasks.make_task(s.task)
    model = jaxrnn.RNN(cell="elman", input_size=task.input_size, hidden_size=s.hidden_size,
                       output_size=task.output_size)
    eval_loss = jax.jit(lambda p, xs, targets: model.loss(p, xs, targets, loss=task.loss))
    results = []
    with tqdm(total=len(configurations(s)) * s.seeds, desc="runs", disable=not progress) as bar:
        for config in configurations(s):
            optimizer, step = make_step(s, model, config)
            runs = []
            for seed in range(s.seeds):
                runs.append(train(s, model, optimizer, step, eval_loss, seed))
                bar.update()
            results.append({**config, **summarize(config, runs), "runs": runs})
    plot(s, results, out / "gradient_clipping.png")
    return {"summary": {r["label"]: {k: v for k, v in r.items() if k not in ("runs", "label")}
                        for r in results},
            "configurations": results, "figure": "gradient_clipping.png"}


if __name__ == "__main__":
    sys.exit(common.main("gradient_clipping", __doc__, FULL, QUICK, run))
