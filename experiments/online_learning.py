r"""Online learning of the lag task: Marschall, Cho & Savin 2020 at this machine's scale (issue #23).

Marschall, Cho & Savin (2020, JMLR 21(135), "A unified framework of online
learning algorithms for training recurrent neural networks") train a small RNN
*online*, batch 1, one parameter update per time step, on an endless stream
(their code: github.com/omarschall/vanilla-rtrl, ``gen_data/Add_Task.py``):

.. math::
    x_t \sim \mathrm{Bernoulli}(1/2), \qquad
    y_t = 0.5 + 0.5\, x_{t-t_1} - 0.25\, x_{t-t_2}

(``jaxrnn_app.tasks.LagTask``), and compare the gradient estimators on it. Here
every estimator both sides have is trained the same way on the same streams:
exact RTRL, UORO, KF-RTRL, RFLO and truncated BPTT, with SnAp-1 and e-prop added
beside them. The network is the leaky RNN of their code,
:math:`a_t = (1-\alpha) a_{t-1} + \alpha \tanh(W x_t + U a_{t-1} + b)`
(``jaxrnn.Leaky``) with a linear readout, initialised as their main script
(``W_in ~ N(0, 1/n_in)``, ``W_rec`` a random orthogonal matrix, ``W_out ~ N(0,
1/n_h)``, zero biases), trained by plain SGD on their per-step loss
:math:`\tfrac12 (\hat y_t - y_t)^2` (``"half_sse"``; their ``mean_squared_error``).

What is measured, per method and seed:

* the loss curve: the MSE :math:`(\hat y_t - y_t)^2` of the online predictions,
  averaged over each ``chunk`` of steps (each prediction is made *before* the
  update that uses it), against the three exact levels of the task (computed by
  enumerating the four cases of :math:`(x_{t-t_1}, x_{t-t_2})`): the best
  constant, 5/64; the best prediction that ignores :math:`x_{t-t_2}`, 1/64; the
  best that uses both lags, 0;
* which level each run reaches and when: "learned the t1 lag" when the smoothed
  MSE falls below ``t1_level`` (2/64: three quarters of what :math:`x_{t-t_1}`
  explains is explained), "learned both" below ``both_level`` (0.5/64: only a
  network that uses :math:`x_{t-t_2}` can get there), at the first step it does;
* along training (``checkpoints`` points, the run's own parameters there), the
  alignment of the method's gradient with the exact one on fixed held-out windows
  of the stream (``align_len`` steps from the zero state): step by step, the
  cosine of :math:`(\partial\ell_t/\partial h_t)^\top \hat P_t` with exact RTRL's
  (``jaxrnn.estimators.step_alignment``, the per-step comparison of Marschall et
  al.), averaged over the steps after ``align_burn``; and for the whole window,
  ``estimator_alignment`` over ``align_draws`` draws: one draw's cosine with
  BPTT's gradient, the cosine of the draws' mean, and the relative variance.
  Truncated BPTT is not an estimator object of the library: its per-step
  gradient (the loss at t back to the last window boundary) and window gradient
  are computed here with ``jax.grad`` through ``model.apply``.

Truncated BPTT is theirs (``Efficient_BPTT``, "E-BPTT"): every ``tbptt_k`` steps
one update with the gradient of the sum of the last k losses, backpropagated
within those k steps only; the network runs on across the boundary (its state is
carried, as a constant: ``jax.lax.stop_gradient``), so it is not
``jaxrnn.make_tbptt_step``, which starts every batch from a zero state.

    python experiments/online_learning.py --quick --out /tmp/online   # seconds (the tests)
    python experiments/online_learning.py       # 45 runs (4.5 min on 2 shared cores, load 2.5-4)
                                                # -> docs/experiments/online_learning/
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxrnn_lab import harness as common
import jaxrnn
from jaxrnn_app.tasks import LAG_BASELINE, LAG_T1_ONLY, LagTask

LABELS = {"rtrl": "RTRL", "uoro": "UORO", "kf_rtrl": "KF-RTRL", "rflo": "RFLO",
          "tbptt": "truncated BPTT", "snap1": "SnAp-1", "eprop": "e-prop",
          "readout": "readout only"}


@dataclasses.dataclass(frozen=True)
class Settings:
    # the runs per seed: a method (LABELS) at the common rate `lr`, or "method@rate" at its own
    # ("readout": the control with no recurrent learning, their Only_Output_Weights)
    methods: tuple[str, ...] = ("rtrl", "kf_rtrl", "uoro", "rflo", "tbptt", "snap1", "eprop",
                                "uoro@0.003", "readout")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # each: its own stream and initialisation (shared by the methods)
    hidden: int = 32  # n_h, as their main script
    alpha: float = 1.0  # the leak alpha of the cell (their main script: 1)
    t1: int = 5  # the lags of y_t = 0.5 + 0.5 x_{t-t1} - 0.25 x_{t-t2} (their Add_Task(5, 9))
    t2: int = 9
    lr: float = 0.03  # plain SGD, one update per step (their Stochastic_Gradient_Descent(lr=0.03))
    steps: int = 50000  # stream steps per run (their main script: N_train = 30000)
    tbptt_k: int = 10  # truncated BPTT: an update every k steps, backpropagated k steps
    rflo_feedback: str = "symmetric"  # RFLO's learning signal: their code's default (W_out)
    chunk: int = 250  # steps per jitted call; the loss curve's points are chunk means
    smooth: int = 1000  # steps of the moving average the levels are read from
    final: int = 5000  # the final MSE: the mean over the run's last `final` steps
    t1_level: float = 2 / 64  # "learned the t1 lag": smoothed MSE below this
    both_level: float = 0.5 / 64  # "learned both lags": smoothed MSE below this
    checkpoints: int = 6  # alignment measured at this many evenly spaced points (first: step 0)
    align_len: int = 60  # steps per held-out alignment window (from the zero state)
    align_burn: int = 20  # per-step alignment averaged over the steps after these
    align_windows: int = 4  # held-out windows per checkpoint (one example each, batch 1)
    align_draws: int = 16  # draws of the stochastic estimators' window gradient (0: no window measure)


FULL = Settings()
QUICK = Settings(methods=FULL.methods[:7], seeds=(0,), hidden=16, steps=1000, lr=0.05, chunk=100,
                 smooth=200, final=200, checkpoints=2, align_len=30, align_burn=10,
                 align_windows=1, align_draws=0)


def parse(entry: str, s: Settings) -> tuple[str, float]:
    """``"uoro@0.003"`` -> ``("uoro", 0.003)``; ``"uoro"`` -> ``("uoro", s.lr)``."""
    method, _, rate = entry.partition("@")
    if method not in LABELS:
        raise common.UsageError(f"unknown method {method!r} in {entry!r}; known: {sorted(LABELS)}")
    try:
        return method, float(rate) if rate else s.lr
    except ValueError:
        raise common.UsageError(f"bad learning rate in {entry!r}") from None


def label(entry: str, s: Settings) -> str:
    method, lr = parse(entry, s)
    return LABELS[method] + (f" (lr {lr:g})" if "@" in entry else "")


# --- the task's levels ----------------------------------------------------------------

def lag_levels() -> dict[str, float]:
    """The MSE of the best predictions, by enumerating the four equally likely cases.

    ``constant``: E[y] for every step; ``t1_only``: E[y | x_{t-t1}] (ignores
    x_{t-t2}); ``both``: y itself. Checked against the task module's constants.
    """
    cases = [(a, b, 0.5 + 0.5 * a - 0.25 * b) for a in (0, 1) for b in (0, 1)]  # (x_t1, x_t2, y)
    ys = np.array([y for _, _, y in cases])
    constant = float(np.mean((ys - ys.mean()) ** 2))
    t1_only = float(np.mean([(y - np.mean([y2 for a2, _, y2 in cases if a2 == a])) ** 2
                             for a, _, y in cases]))
    if not (np.isclose(constant, LAG_BASELINE) and np.isclose(t1_only, LAG_T1_ONLY)):
        raise AssertionError("the enumerated levels disagree with jaxrnn_app.tasks")
    return {"constant": constant, "t1_only": t1_only, "both": 0.0}


# --- the network, as their main script initialises it ----------------------------------

def make_model(s: Settings) -> jaxrnn.RNN:
    return jaxrnn.RNN(cell=jaxrnn.Leaky(alpha=s.alpha, nonlinearity="tanh"), input_size=2,
                      hidden_size=s.hidden, output_size=1)


def marschall_init(model: jaxrnn.RNN, seed: int) -> jaxrnn.RNNParams:
    """``W_in ~ N(0, 1/n_in)``, ``W_rec`` orthogonal (QR of a Gaussian), ``W_out ~ N(0, 1/n_h)``,
    zero biases: vanilla-rtrl's main script (their single bias is our ``b_ih``; ``b_hh`` = 0)."""
    params = model.init(jax.random.key(seed))
    rng = np.random.default_rng([seed, 7])
    H, D = model.hidden_size, model.input_size
    q, r = np.linalg.qr(rng.normal(size=(H, H)))
    cell = params.layers[0][0]._replace(
        w_ih=jnp.asarray(rng.normal(0, np.sqrt(1 / D), (H, D)), jnp.float32),
        w_hh=jnp.asarray(q * np.sign(np.diag(r)), jnp.float32),
        b_ih=jnp.zeros(H, jnp.float32), b_hh=jnp.zeros(H, jnp.float32))
    readout = params.readout._replace(
        weight=jnp.asarray(rng.normal(0, np.sqrt(1 / H), (1, H)), jnp.float32),
        bias=jnp.zeros(1, jnp.float32))
    return params._replace(layers=((cell,),), readout=readout)


def estimator(s: Settings, method: str):
    """What ``make_online_step`` and the alignment measures get for ``method``
    (``"readout"`` runs RFLO's cheap trace; its recurrent gradient is then discarded)."""
    if method in ("rflo", "readout"):
        return jaxrnn.estimators.RFLO(feedback=s.rflo_feedback)
    return method


# --- truncated BPTT on a stream (their E-BPTT) -----------------------------------------

def make_tbptt_chunk(model: jaxrnn.RNN, optimizer, k: int):
    """One jitted call over a chunk of the stream: an update every ``k`` steps with the
    gradient of the window's summed ``half_sse``, backpropagated within the window; the
    state entering each window is a constant (carried, never differentiated)."""

    def window(carry, inputs):
        params, opt_state, state = carry
        xs, ys = inputs

        def loss(p):
            out, last = model.apply(p, xs, state)
            return 0.5 * jnp.sum((out - ys) ** 2), last

        (value, last), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, jax.lax.stop_gradient(last)), value

    @jax.jit
    def run(params, opt_state, state, xs, ys):
        T = xs.shape[0]
        cut = lambda a: a.reshape((T // k, k) + a.shape[1:])  # noqa: E731
        (params, opt_state, state), values = jax.lax.scan(
            window, (params, opt_state, state), (cut(xs), cut(ys)))
        return params, opt_state, state, jnp.sum(values) / T

    return run


def truncated_outputs(model: jaxrnn.RNN, params, xs, k: int):
    """The outputs over ``xs`` with the state a constant at every k-step boundary."""
    outs, state = [], None
    for start in range(0, xs.shape[0], k):
        out, state = model.apply(params, xs[start:start + k], state)
        state = jax.lax.stop_gradient(state)
        outs.append(out)
    return jnp.concatenate(outs)


@partial(jax.jit, static_argnums=(0, 4))
def step_gradients(model: jaxrnn.RNN, params, xs, ys, k: int):
    """The recurrent layer's gradient of each step's loss, ``(exact, truncated)``, (T, n)
    each: exact through the whole window (BPTT from its start), truncated every ``k``."""

    def per_step(k):
        def step_loss(p, t):
            out = truncated_outputs(model, p, xs, k)
            return 0.5 * jnp.sum((out[t] - ys[t]) ** 2)

        grads = jax.vmap(lambda t: jax.grad(step_loss)(params, t))(jnp.arange(xs.shape[0]))
        return jnp.concatenate([g.reshape(g.shape[0], -1)
                                for g in jax.tree.leaves(grads.layers)], axis=1)

    return per_step(xs.shape[0]), per_step(k)


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# --- alignment at one checkpoint ---------------------------------------------------------

def measure_alignment(s: Settings, model, params, method: str, windows, key) -> dict:
    """The method's gradient against the exact one on the held-out windows (batch 1 each)."""
    step_cos, step_err, win_cos, mean_cos, rel_var = [], [], [], [], []
    if method == "readout":  # no recurrent gradient to align
        windows = []
    burn = slice(s.align_burn, None)
    for i, (xs, ys) in enumerate(windows):
        k = jax.random.fold_in(key, i)
        if method == "tbptt":
            exact, trunc = (np.asarray(g, np.float64)
                            for g in step_gradients(model, params, xs, ys, s.tbptt_k))
            with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # NaN where the exact term is 0
                step_cos.append(np.nanmean(cosine(trunc, exact)[burn]))
                step_err.append(np.nanmedian((np.linalg.norm(trunc - exact, axis=1)
                                              / np.linalg.norm(exact, axis=1))[burn]))
            if s.align_draws:  # deterministic: one "draw", no variance
                c = float(cosine(trunc.sum(0), exact.sum(0)))
                win_cos.append(c), mean_cos.append(c), rel_var.append(0.0)
            continue
        est = estimator(s, method)
        a = jaxrnn.estimators.step_alignment(model, params, xs, ys, est, "half_sse", key=k)
        step_cos.append(float(jnp.nanmean(a.cosine[burn])))
        step_err.append(float(jnp.nanmedian(a.rel_error[burn])))
        if not s.align_draws:
            continue
        stochastic = method in ("uoro", "kf_rtrl")
        d = jaxrnn.estimators.estimator_alignment(model, params, xs, ys, est, "half_sse",
                                                  key=k, draws=s.align_draws if stochastic else 1)
        win_cos.append(float(jnp.mean(d.draws.cosine)))
        mean_cos.append(float(d.mean.cosine))
        rel_var.append(float(d.rel_variance))
    mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731  (None: not measured)
    return {"step_cosine": mean(step_cos), "step_rel_error": mean(step_err),
            "window_cosine": mean(win_cos), "mean_cosine": mean(mean_cos),
            "rel_variance": mean(rel_var)}


# --- one run -------------------------------------------------------------------------------

def make_step(s: Settings, model, entry: str):
    """``(kind, step function, optimizer)`` of one entry, shared by the seeds (compiled once)."""
    method, lr = parse(entry, s)
    optimizer = optax.sgd(lr)
    if method == "readout":  # the recurrent layers' updates set to zero: only W_out, b_out learn
        frozen = lambda p: p._replace(layers=jax.tree.map(lambda _: True, p.layers),  # noqa: E731
                                      readout=jax.tree.map(lambda _: False, p.readout))
        optimizer = optax.chain(optax.masked(optax.set_to_zero(), frozen), optimizer)
    if method == "tbptt":
        return "tbptt", make_tbptt_chunk(model, optimizer, s.tbptt_k), optimizer
    return "online", jaxrnn.make_online_step(model, optimizer, estimator(s, method), every=1,
                                             loss="half_sse"), optimizer


def first_below(steps: np.ndarray, curve: np.ndarray, level: float):
    hit = np.nonzero(curve < level)[0]
    return int(steps[hit[0]]) if hit.size else None


def train_one(s: Settings, model, entry: str, seed: int, windows, step, bar) -> dict:
    """Trains one network online on seed ``seed``'s stream; returns its curves and alignments."""
    method, lr = parse(entry, s)
    kind, fn, optimizer = step
    task = LagTask(seed=seed, batch_size=1, seq_len=s.chunk, t1=s.t1, t2=s.t2)
    params = marschall_init(model, seed)
    opt_state = optimizer.init(params)
    key = jax.random.key(1000 + seed)  # the estimator's draws (UORO, KF-RTRL)
    if kind == "tbptt":
        state = jnp.zeros((1, 1, s.hidden), jnp.float32)  # (layers, B, H): the zero state
    else:
        state = fn.init(params, 1, key)
    n_chunks = s.steps // s.chunk
    checks = sorted(set(np.linspace(0, n_chunks, s.checkpoints).round().astype(int).tolist()))
    align, losses = [], []
    t0 = time.perf_counter()
    for i in range(n_chunks + 1):
        if i in checks:
            row = measure_alignment(s, model, params, method, windows,
                                    jax.random.fold_in(key, 10_000 + i))
            align.append({"step": i * s.chunk, **row})
        if i == n_chunks:
            break
        batch = task.batch(i)  # the stream's steps [i * chunk, (i + 1) * chunk)
        if kind == "tbptt":
            params, opt_state, state, loss = fn(params, opt_state, state, batch.xs, batch.targets)
        else:
            params, opt_state, state, m = fn.step(params, opt_state, state, batch, key)
            loss = m["loss"]
        losses.append(loss)
        bar.update(1)
    wall = time.perf_counter() - t0
    mse = 2 * np.asarray(jax.device_get(losses), np.float64)  # half_sse per step -> MSE
    steps = (np.arange(n_chunks) + 1) * s.chunk  # each point: the chunk ending there
    w = max(1, s.smooth // s.chunk)
    smoothed = np.convolve(mse, np.ones(w) / w, mode="valid")
    final = float(np.mean(mse[-max(1, s.final // s.chunk):]))
    return {"entry": entry, "method": method, "lr": lr, "seed": seed, "steps": steps,
            "mse": mse, "smoothed_steps": steps[w - 1:], "smoothed": smoothed,
            "final_mse": final, "finite": bool(np.all(np.isfinite(mse))),
            "step_t1": first_below(steps[w - 1:], smoothed, s.t1_level),
            "step_both": first_below(steps[w - 1:], smoothed, s.both_level),
            "learned_t1": final < s.t1_level, "learned_both": final < s.both_level,
            "alignment": align, "wall_s": wall}


def summarize(s: Settings, runs: list[dict]) -> tuple[dict, list[str]]:
    """Per entry: final MSE over seeds, how many seeds learned what and when, the
    alignment at the first and last checkpoints; and the entries in the order they learn."""
    med = lambda v: float(np.median(v)) if v else None  # noqa: E731
    avg = lambda v: float(np.mean(v)) if None not in v else None  # noqa: E731
    table = {}
    for e in s.methods:
        rs = [r for r in runs if r["entry"] == e]
        first, last = [r["alignment"][0] for r in rs], [r["alignment"][-1] for r in rs]
        table[e] = {
            "label": label(e, s), "lr": rs[0]["lr"],
            "final_mse": [r["final_mse"] for r in rs],
            "final_mse_mean": float(np.mean([r["final_mse"] for r in rs])),
            "learned_t1": sum(r["learned_t1"] for r in rs),
            "learned_both": sum(r["learned_both"] for r in rs),
            "step_t1_median": med([r["step_t1"] for r in rs if r["step_t1"] is not None]),
            "step_both_median": med([r["step_both"] for r in rs if r["step_both"] is not None]),
            **{f"{k}_start": avg([a[k] for a in first]) for k in ("step_cosine", "window_cosine")},
            **{f"{k}_end": avg([a[k] for a in last])
               for k in ("step_cosine", "step_rel_error", "window_cosine", "mean_cosine",
                         "rel_variance")},
            "wall_s": float(np.sum([r["wall_s"] for r in rs])),
        }
    inf = float("inf")
    order = sorted(s.methods, key=lambda e: (
        -table[e]["learned_both"], table[e]["step_both_median"] or inf,
        -table[e]["learned_t1"], table[e]["step_t1_median"] or inf, table[e]["final_mse_mean"]))
    return table, order


# --- the experiment ------------------------------------------------------------------------

def run(s: Settings, out: Path, progress: bool) -> dict:
    for e in s.methods:
        parse(e, s)  # refuses an unknown method before anything runs
    if s.steps % s.chunk or s.chunk % s.tbptt_k:
        raise common.UsageError("steps must be a multiple of chunk, and chunk of tbptt_k")
    levels = lag_levels()
    model = make_model(s)
    steps = {e: make_step(s, model, e) for e in s.methods}
    runs = []
    total = len(s.seeds) * len(s.methods) * (s.steps // s.chunk)
    with tqdm(total=total, desc="online runs", unit="chunk", disable=not progress,
              dynamic_ncols=True) as bar:
        for seed in s.seeds:
            held = LagTask(seed=seed, seq_len=s.align_len, eval_size=s.align_windows,
                           t1=s.t1, t2=s.t2).eval_batch()  # streams no training run sees
            windows = [(held.xs[:, i:i + 1], held.targets[:, i:i + 1])
                       for i in range(s.align_windows)]
            for e in s.methods:
                bar.set_postfix_str(f"seed {seed} {label(e, s)}")
                runs.append(train_one(s, model, e, seed, windows, steps[e], bar))
    table, order = summarize(s, runs)
    n = len(s.seeds)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for e in order:
        t = table[e]
        print(f"{t['label']:>20}: final MSE {t['final_mse_mean']:.4f}  t1 {t['learned_t1']}/{n}"
              f"  both {t['learned_both']}/{n}  step cos {fmt(t['step_cosine_end'])}"
              f"  window cos {fmt(t['window_cosine_end'])}")
    figures = [plot_losses(s, runs, levels, out / "online_learning_loss.png"),
               plot_alignment(s, runs, out / "online_learning_alignment.png")]
    return {"levels": levels, "t1_level": s.t1_level, "both_level": s.both_level,
            "summary": table, "order": order, "runs": runs,
            "figures": [p.name for p in figures]}


# --- figures -------------------------------------------------------------------------------

def _style(entry: str) -> str:
    """e-prop dashed (at alpha = 1 it is RFLO's rule: the two curves coincide), an
    entry at its own rate dotted."""
    return {"eprop": "--", "readout": "-."}.get(entry, ":" if "@" in entry else "-")


def _levels(ax, s: Settings, levels: dict):
    ax.axhline(levels["constant"], color="gray", ls="--", lw=1, label="best constant (5/64)")
    ax.axhline(levels["t1_only"], color="k", ls="--", lw=1, label="t1 lag only (1/64)")
    ax.axhline(s.both_level, color="k", ls=":", lw=1, label=f"'both' threshold ({s.both_level:.3g})")


def plot_losses(s: Settings, runs: list[dict], levels: dict, path: Path) -> Path:
    """The smoothed online MSE against the stream step: a panel per entry (a line per
    seed), and the seed means of every entry together."""
    plt = common.pyplot()
    n, cols = len(s.methods) + 1, 3
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), dpi=110,
                             sharex=True, sharey=True, squeeze=False)
    axes = axes.ravel()
    for j, e in enumerate(s.methods):
        ax = axes[j]
        for r in (r for r in runs if r["entry"] == e):
            ax.plot(r["smoothed_steps"], np.maximum(r["smoothed"], 1e-5), color=f"C{j}",
                    lw=1, alpha=0.8)
        _levels(ax, s, levels)
        ax.set_title(label(e, s), fontsize=10)
    ax = axes[len(s.methods)]
    for j, e in enumerate(s.methods):
        rs = [r for r in runs if r["entry"] == e]
        mean = np.mean([r["smoothed"] for r in rs], axis=0)
        ax.plot(rs[0]["smoothed_steps"], np.maximum(mean, 1e-5), color=f"C{j}", lw=1.5,
                ls=_style(e), label=label(e, s))
    _levels(ax, s, levels)
    ax.set_title("seed means", fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    for ax in axes[n:]:
        ax.axis("off")
    for ax in axes[:n]:
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
        ax.tick_params(labelbottom=True)
    for i in range(rows):
        axes[i * cols].set_ylabel(f"MSE ({s.smooth}-step mean)")
    fig.legend(handles, names, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle(f"Online, batch 1, on y_t = 0.5 + 0.5 x(t-{s.t1}) - 0.25 x(t-{s.t2}): "
                 f"leaky RNN H = {s.hidden}, alpha = {s.alpha:g}, SGD {s.lr:g}, "
                 f"{len(s.seeds)} seed(s); x: stream step", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_alignment(s: Settings, runs: list[dict], path: Path) -> Path:
    """Along training: the per-step cosine with exact RTRL, and the window gradient's
    cosine with BPTT's (one draw; marked x, the mean of the draws)."""
    plt = common.pyplot()
    keys = ["step_cosine"] + (["window_cosine"] if s.align_draws else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(5.6 * len(keys), 4.2), dpi=110,
                             sharey=True, squeeze=False)
    axes = axes[0]
    for j, e in enumerate(s.methods):
        rs = [r for r in runs if r["entry"] == e]
        if rs[0]["method"] == "readout":
            continue
        steps = [a["step"] for a in rs[0]["alignment"]]
        for ax, k in zip(axes, keys):
            v = np.array([[a[k] for a in r["alignment"]] for r in rs], float)
            ax.plot(steps, v.mean(0), marker="o", ls=_style(e), color=f"C{j}", ms=3, lw=1.3,
                    label=label(e, s))
            ax.fill_between(steps, v.min(0), v.max(0), color=f"C{j}", alpha=0.12, lw=0)
        if s.align_draws and rs[0]["method"] in ("uoro", "kf_rtrl"):
            v = np.array([[a["mean_cosine"] for a in r["alignment"]] for r in rs], float)
            axes[1].plot(steps, v.mean(0), marker="x", ls="-.", color=f"C{j}", lw=1, ms=4,
                         label=f"{label(e, s)}: mean of {s.align_draws} draws")
    axes[0].set_title(f"per step: cos of the step's gradient with the exact one (RTRL's)\n"
                      f"(steps {s.align_burn}-{s.align_len} of held-out windows)", fontsize=9)
    if s.align_draws:
        axes[1].set_title(f"whole {s.align_len}-step window: cos with BPTT's gradient\n"
                          "(one draw; x: the mean of the draws)", fontsize=9)
    axes[0].set_ylabel("cosine (mean over seeds; band: min-max)")
    for ax in axes:
        ax.set_xlabel("stream step (the run's parameters there)")
        ax.axhline(0, color="gray", lw=0.8)
        ax.grid(True, alpha=0.3)
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(common.main("online_learning", __doc__, FULL, QUICK, run))
