r"""Benchmark: one full training step of jaxrnn against PyTorch and Flax, on the CPU.

One *step* is the whole update: forward over the sequence, the linear readout,
the loss (mean squared error of the readout's outputs at every step against
random targets), the backward pass and an Adam update. It is timed for

* ``bptt``:     ``jaxrnn.make_train_step(model, optax.adam(lr), loss="mse", method="bptt")``
  (the handwritten reverse-scan BPTT), jit-compiled, buffers donated;
* ``autodiff``: the same with ``method="autodiff"`` (``jax.grad`` through the scan);
* ``torch``:    ``nn.RNN(tanh)`` / ``nn.LSTM`` / ``nn.GRU`` + ``nn.Linear``,
  ``torch.optim.Adam``, eager, on as many threads as JAX uses; ``torch_1t``: the
  same on one thread (recorded as "not installed" without PyTorch, which the
  ``test`` extra installs);
* ``flax``:     ``flax.linen.RNN`` of ``SimpleCell`` / ``OptimizedLSTMCell`` /
  ``GRUCell`` + ``Dense``, ``jax.value_and_grad``, ``optax.adam``, jit, donated
  (recorded as "not installed" without flax: ``pip install -e ".[bench]"``);
* ``floor``:    the *sequential floor*, a jitted JAX function doing only the work
  no implementation can avoid: the chain of ``2T`` dependent small products
  (``T`` forward ``(B,H) x (H,G*H)``, ``T`` backward ``(B,G*H) x (G*H,H)``) plus the
  large products done once over all ``T*B`` rows (input projection, readout and its
  input gradient, ``dW_ih``, ``dW_hh``, ``dW_hy``); ``floor_chain`` is the chain alone.

Every side starts from the *same* weights (PyTorch's initialisation drawn with
numpy, loaded with ``RNN.from_torch``, handed to PyTorch with ``RNN.to_torch`` and
mapped onto Flax's parameter names, where one bias per gate stands for PyTorch's
two) and the same float32 data, so their first-step losses agree to float32
rounding. Every jaxrnn, Flax and PyTorch step also returns the loss and the
global gradient norm (what jaxrnn's train step reports), so all do the same work.

Method of measurement: all contenders of a grid point are compiled (compile
time, ``lower + compile``, recorded apart) and warmed up, then timed round-robin
in one process, one step each per round, the order rotated every round, each
step blocked on (``jax.block_until_ready``) before the clock stops. The reported
time is the median over the rounds (a contender whose ``repeats`` steps would
take over ``budget_s`` gets fewer, at least 3). Parameters and optimizer states
returned by a step are fed to the next one, so every timed step really runs.
PyTorch is also timed on one thread (``torch_1t``): on a small shared machine
its OpenMP threads wait at the barrier of every small op for a core to free up.

Peak memory (bytes of array/tensor buffers, not the process's RSS):

* JAX (``bptt``, ``autodiff``, ``flax``, ``floor``): from XLA's buffer assignment of
  the compiled executable, ``compiled.memory_analysis()``:
  ``argument + output - alias + temp`` bytes (donated buffers counted once). It
  is a static plan, exact for what the executable allocates; it includes the
  parameters, the optimizer state and the batch.
* PyTorch: one extra step under ``torch.profiler`` (``profile_memory``), replaying
  its allocation timeline: the bytes of the tensors alive before the step that it
  touches (parameters, Adam state, the batch) plus the running sum of the
  tensors it allocates and frees, maximised. It sees the tensors that go
  through PyTorch's allocator (the parameters, Adam state, batch,
  activations, gradients, workspaces), but not memory that MKL or oneDNN
  take for themselves, nor the allocator's slack.

Neither counts the runtime itself (libraries, thread stacks, compiled code).
The two numbers are comparable as "bytes of buffers the step needs at once",
not as process memory.

Run ``python experiments/benchmark.py --quick --out /tmp/b`` (seconds) or
without ``--quick`` for the full grid (minutes). It writes ``benchmark.json``
(every number), ``benchmark.md`` (a table) and ``benchmark.png`` (a chart).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jaxrnn  # noqa: E402  (the package is imported whole: the benchmark uses its public API)
from jaxrnn.scan import sum_outer  # noqa: E402  (the weight-gradient product of backward_scan)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one benchmark run measures."""

    cells: tuple[str, ...] = ("elman", "lstm", "gru")
    # (T, B, H): steps, batch, hidden units; input and output size are H // 4.
    grid: tuple[tuple[int, int, int], ...] = (
        (100, 32, 128), (200, 64, 256), (1000, 16, 64), (100, 128, 512))
    repeats: int = 10  # timed rounds; each times one step of every contender
    warmup: int = 2  # untimed steps of every contender after compilation
    lr: float = 1e-3  # Adam's learning rate, on every side
    seed: int = 0  # weights and data
    torch_memory: bool = True  # profile one extra PyTorch step for its peak memory
    torch_single_thread: bool = True  # also time PyTorch on 1 thread ("torch_1t")
    budget_s: float = 60.0  # cap on one contender's timed seconds per grid point (>= 3 steps)

    def __post_init__(self):
        unknown = [c for c in self.cells if c not in ("elman", "lstm", "gru")]
        if not self.cells or unknown:
            raise ValueError(f"cells must be a non-empty subset of elman, lstm, gru, "
                             f"got {self.cells!r}")
        if not self.grid or any(len(p) != 3 or min(p) < 1 for p in self.grid):
            raise ValueError(f"grid must hold (T, B, H) triples of positive integers, "
                             f"got {self.grid!r}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if not self.budget_s > 0:
            raise ValueError(f"budget_s must be > 0, got {self.budget_s}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the first step is not timed), "
                             f"got {self.warmup}")


QUICK = Settings(grid=((20, 4, 16),), repeats=5, warmup=1)

# Contenders, in the order of the table; the first five are full training steps.
STEPS = ("bptt", "autodiff", "torch", "torch_1t", "flax")
CONTENDERS = STEPS + ("floor", "floor_chain")
GATES = {"elman": 1, "lstm": 4, "gru": 3}


# --- one contender -----------------------------------------------------------

@dataclasses.dataclass
class Contender:
    """A ready-to-time step: ``run()`` does one step, blocks on it, returns its loss."""

    name: str
    run: Callable[[], Any]
    info: dict  # compile_s, memory, notes ... (JSON-ready)
    before: Callable[[], None] | None = None  # called before each run, off the clock
    profile: Callable[[], dict] | None = None  # measures memory once, after the timing


def xla_memory(compiled) -> dict:
    """The compiled executable's buffer sizes (bytes) and their peak."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {"status": "unavailable (memory_analysis() returned None)"}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
    out = {k: int(getattr(stats, k)) for k in keys if hasattr(stats, k)}
    out["peak_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                         - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
    out["method"] = "xla memory_analysis: argument + output - alias + temp"
    return out


def _copy(tree):
    """A copy of a pytree of arrays in fresh device buffers (through the host: no compile)."""
    return jax.tree.map(lambda a: jnp.asarray(np.array(a)), tree)


def _compile(fn, *args):
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def jaxrnn_contender(model: jaxrnn.RNN, params, batch: jaxrnn.Batch, method: str,
                     lr: float) -> Contender:
    """``jaxrnn.make_train_step(..., loss="mse", method=method)`` with optax Adam."""
    opt = optax.adam(lr)
    params = _copy(params)  # own buffers: the step donates them
    opt_state = jax.jit(opt.init)(params)
    step = jaxrnn.make_train_step(model, opt, loss="mse", method=method)
    compiled, compile_s = _compile(step, params, opt_state, batch)
    state = [params, opt_state]

    def run():
        p, s, metrics = compiled(state[0], state[1], batch)
        jax.block_until_ready((p, s, metrics))
        state[0], state[1] = p, s  # thread the donated buffers through
        return metrics["loss"]

    return Contender(method, run, {"compile_s": compile_s, "memory": xla_memory(compiled)})


def _torch():
    """The torch module, or None when PyTorch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_contender(model: jaxrnn.RNN, params, xs: np.ndarray, targets: np.ndarray,
                    lr: float, threads: int, profile_memory: bool,
                    name: str = "torch") -> Contender:
    """``nn.RNN/LSTM/GRU`` + ``nn.Linear`` with jaxrnn's weights, ``torch.optim.Adam``.

    ``threads`` is set (``torch.set_num_threads``) before every step, off the clock.
    """
    import torch
    import torch.nn.functional as F

    kind = {"elman": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[model.cell]
    extra = {"nonlinearity": model.nonlinearity} if model.cell == "elman" else {}
    rnn = kind(model.input_size, model.hidden_size, **extra)
    head = torch.nn.Linear(model.hidden_size, model.output_size)
    rnn_sd, head_sd = model.to_torch(params)
    rnn.load_state_dict({k: torch.from_numpy(v) for k, v in rnn_sd.items()})
    head.load_state_dict({k: torch.from_numpy(v) for k, v in head_sd.items()})
    weights = list(rnn.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(weights, lr=lr)
    xs_t, targets_t = torch.from_numpy(xs), torch.from_numpy(targets)

    def run():
        opt.zero_grad(set_to_none=True)
        hs, _ = rnn(xs_t)  # time-major, as jaxrnn
        loss = F.mse_loss(head(hs), targets_t)
        loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([w.grad for w in weights])  # as jaxrnn's metrics
        opt.step()
        return loss.detach(), grad_norm  # eager: everything has run by now

    info = {"compile_s": None, "threads": threads, "memory": {"status": "not measured"}}
    return Contender(name, lambda: run()[0], info,
                     before=lambda: torch.set_num_threads(threads),
                     profile=(lambda: torch_memory(run)) if profile_memory else None)


def torch_memory(run: Callable[[], Any]) -> dict:
    """Peak bytes of PyTorch tensors alive during one ``run()`` (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import Action

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                     record_shapes=True, with_stack=True) as prof:
            run()
        timeline = sorted(prof._memory_profile().timeline, key=lambda e: e[0])
    except Exception as e:  # a private API: degrade to "unavailable", never fail the run
        return {"status": f"unavailable ({type(e).__name__}: {e})"}
    live = preexisting = peak = 0
    for _, action, _, size in timeline:
        if action == Action.PREEXISTING:
            preexisting += size
            live += size
        elif action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return {"peak_bytes": int(peak), "preexisting_bytes": int(preexisting),
            "method": "torch.profiler memory timeline: tensors alive at the start and "
                      "touched by the step, plus the running sum of allocations - frees"}


def _flax_modules():
    """Flax's module classes, or None when flax is not installed."""
    try:
        import flax.linen as nn
    except ImportError:
        return None

    class FlaxRNN(nn.Module):
        """``nn.RNN`` of one cell (time-major) and a ``Dense`` readout."""

        cell: str
        hidden_size: int
        output_size: int

        @nn.compact
        def __call__(self, xs):  # (T, B, D) -> (T, B, O)
            cell_cls = {"elman": nn.SimpleCell, "lstm": nn.OptimizedLSTMCell,
                        "gru": nn.GRUCell}[self.cell]
            cell = cell_cls(features=self.hidden_size, name="cell")
            hs = nn.RNN(cell, time_major=True, name="rnn")(xs)
            return nn.Dense(self.output_size, name="readout")(hs)

    return FlaxRNN


def flax_params(model: jaxrnn.RNN, params) -> dict:
    r"""jaxrnn's (PyTorch-layout) weights under Flax's names: the same function.

    Flax's cells keep one bias per gate where PyTorch has two (``b_ih + b_hh``),
    except the GRU's candidate gate, whose recurrent bias sits inside ``r * (.)``.
    Kernels are transposed (Flax computes ``x @ kernel``).
    """
    p = params.layers[0][0]
    H = model.hidden_size
    w_i, w_h = np.asarray(p.w_ih).T, np.asarray(p.w_hh).T  # (D, G*H), (H, G*H)
    b_i, b_h = np.asarray(p.b_ih), np.asarray(p.b_hh)  # (G*H,)
    blk = lambda a, k: a[..., k * H:(k + 1) * H]  # noqa: E731  gate block k
    if model.cell == "elman":
        cell = {"i": {"kernel": w_i, "bias": b_i + b_h}, "h": {"kernel": w_h}}
    elif model.cell == "lstm":
        cell = {}
        for k, g in enumerate("ifgo"):  # PyTorch's gate order
            cell[f"i{g}"] = {"kernel": blk(w_i, k)}
            cell[f"h{g}"] = {"kernel": blk(w_h, k), "bias": blk(b_i, k) + blk(b_h, k)}
    else:  # gru, gates r, z, n
        cell = {"ir": {"kernel": blk(w_i, 0), "bias": blk(b_i, 0) + blk(b_h, 0)},
                "iz": {"kernel": blk(w_i, 1), "bias": blk(b_i, 1) + blk(b_h, 1)},
                "in": {"kernel": blk(w_i, 2), "bias": blk(b_i, 2)},
                "hr": {"kernel": blk(w_h, 0)},
                "hz": {"kernel": blk(w_h, 1)},
                "hn": {"kernel": blk(w_h, 2), "bias": blk(b_h, 2)}}
    readout = {"kernel": np.asarray(params.readout.weight).T,
               "bias": np.asarray(params.readout.bias)}
    tree = {"cell": cell, "readout": readout}
    return jax.tree.map(lambda a: jnp.asarray(np.ascontiguousarray(a)), tree)


def flax_contender(model: jaxrnn.RNN, params, batch: jaxrnn.Batch, lr: float
                   ) -> Contender | None:
    """``flax.linen.RNN`` + ``Dense`` with jaxrnn's weights, ``jax.value_and_grad``, optax Adam."""
    FlaxRNN = _flax_modules()
    if FlaxRNN is None:
        return None
    net = FlaxRNN(model.cell, model.hidden_size, model.output_size)
    fparams = flax_params(model, params)
    template = jax.eval_shape(net.init, jax.random.key(0), batch.xs)["params"]
    same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype,
                        dict(template), fparams)
    if jax.tree.structure(dict(template)) != jax.tree.structure(fparams) or not all(
            jax.tree.leaves(same)):
        raise ValueError(f"flax's parameters do not match the mapping: "
                         f"{jax.tree.map(jnp.shape, dict(template))}")
    opt = optax.adam(lr)

    def loss_fn(p, xs, targets):
        ys = net.apply({"params": p}, xs)
        return jnp.mean((ys - targets) ** 2)

    def step(p, opt_state, xs, targets):
        value, grads = jax.value_and_grad(loss_fn)(p, xs, targets)
        updates, opt_state = opt.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        return p, opt_state, {"loss": value, "grad_norm": optax.tree.norm(grads)}

    step = jax.jit(step, donate_argnums=(0, 1))
    opt_state = jax.jit(opt.init)(fparams)
    compiled, compile_s = _compile(step, fparams, opt_state, batch.xs, batch.targets)
    state = [fparams, opt_state]

    def run():
        p, s, metrics = compiled(state[0], state[1], batch.xs, batch.targets)
        jax.block_until_ready((p, s, metrics))
        state[0], state[1] = p, s
        return metrics["loss"]

    cell_name = {"elman": "SimpleCell", "lstm": "OptimizedLSTMCell", "gru": "GRUCell"}
    return Contender("flax", run, {"compile_s": compile_s, "memory": xla_memory(compiled),
                                   "cell": cell_name[model.cell]})


# --- the sequential floor ------------------------------------------------------

def floor_step(w_ih, w_hh, w_hy, xs, targets, *, gates: int):
    r"""The unavoidable work of one gradient: the dependent chain plus the big products.

    .. math::
        g_t = xp_t + h_{t-1} W_{hh}^\top, \quad h_t = \tanh(\textstyle\sum_k g_t^{(k)})
        \qquad\text{and back}\qquad
        \delta g_t = [\delta h_t, \ldots] \odot r_t, \quad
        \delta h_{t-1} = \delta g_t W_{hh}

    The gate math is replaced by the cheapest elementwise link that keeps every
    product's output in use (so XLA cannot drop any of it). The residual ``r_t``
    kept for the backward chain is ``g_t`` (B, G*H), as a gated cell must keep its
    gates, or ``h_t`` (B, H) for one gate (Elman reads tanh' back from h).

    Args:
        w_ih: (G*H, D). w_hh: (G*H, H). w_hy: (O, H).
        xs: (T, B, D). targets: (T, B, O).
        gates: G (static).

    Returns:
        ``(dW_ih (G*H, D), dW_hh (G*H, H), dW_hy (O, H))``.
    """
    T, B, _ = xs.shape
    H = w_hh.shape[1]
    xp = xs @ w_ih.T  # input projection, one (T*B, D) x (D, G*H) product

    def forward(h, xp_t):
        g = xp_t + h @ w_hh.T  # the dependent (B, H) x (H, G*H) product
        h = jnp.tanh(g.reshape(B, gates, H).sum(axis=1))  # close the loop cheaply
        return h, (h, g if gates > 1 else None)  # one gate's derivative reads h back

    zeros = jnp.zeros((B, H), xs.dtype)
    _, (hs, gs) = jax.lax.scan(forward, zeros, xp)
    res = gs if gates > 1 else hs  # the per-step residual the backward chain reads
    ys = hs @ w_hy.T  # readout, one product
    dys = (ys - targets) * (2.0 / ys.size)  # d mean((y - t)^2) / dy
    dhs = dys @ w_hy  # readout's input gradient, one product

    def backward(dh, inputs):
        dh_t, r_t = inputs
        dg = jnp.tile(dh + dh_t, (1, gates)) * r_t  # stand-in for the gates' derivative
        return dg @ w_hh, dg  # the dependent (B, G*H) x (G*H, H) product

    _, dgs = jax.lax.scan(backward, zeros, (dhs, res), reverse=True)
    hs_prev = jnp.concatenate([zeros[None], hs[:-1]])  # h_{t-1}, h_{-1} = 0
    dw_ih = sum_outer(dgs, xs)  # one product over T*B rows, as jaxrnn's backward_scan
    dw_hh = sum_outer(dgs, hs_prev)  # one product over T*B rows
    dw_hy = sum_outer(dys, hs)  # one product over T*B rows
    return dw_ih, dw_hh, dw_hy


def floor_chain(w_hh, xp, dhs, *, gates: int):
    """Only the ``2T`` dependent products (and their elementwise links) of ``floor_step``.

    Args:
        w_hh: (G*H, H). xp: (T, B, G*H) precomputed input projection.
        dhs: (T, B, H) precomputed output gradients.

    Returns:
        ``(h_T, dh_0)``, each (B, H).
    """
    _, B, _ = xp.shape
    H = w_hh.shape[1]

    def forward(h, xp_t):
        g = xp_t + h @ w_hh.T
        h = jnp.tanh(g.reshape(B, gates, H).sum(axis=1))
        return h, g if gates > 1 else h

    def backward(dh, inputs):
        dh_t, r_t = inputs
        dg = jnp.tile(dh + dh_t, (1, gates)) * r_t
        return dg @ w_hh, None

    zeros = jnp.zeros((B, H), xp.dtype)
    h_T, res = jax.lax.scan(forward, zeros, xp)
    dh_0, _ = jax.lax.scan(backward, zeros, (dhs, res), reverse=True)
    return h_T, dh_0


def floor_contenders(model: jaxrnn.RNN, params, batch: jaxrnn.Batch) -> list[Contender]:
    """``floor`` and ``floor_chain`` for the model's sizes, jitted."""
    G = GATES[model.cell]
    p = params.layers[0][0]
    w_hy = params.readout.weight
    out = []
    full = jax.jit(functools.partial(floor_step, gates=G))
    compiled, compile_s = _compile(full, p.w_ih, p.w_hh, w_hy, batch.xs, batch.targets)
    out.append(Contender(
        "floor", lambda: jax.block_until_ready(
            compiled(p.w_ih, p.w_hh, w_hy, batch.xs, batch.targets)),
        {"compile_s": compile_s, "memory": xla_memory(compiled)}))

    T, B, _ = batch.xs.shape
    rng = np.random.default_rng(1)
    xp = jnp.asarray(rng.standard_normal((T, B, G * model.hidden_size), np.float32))
    dhs = jnp.asarray(rng.standard_normal((T, B, model.hidden_size), np.float32) * 1e-3)
    chain = jax.jit(functools.partial(floor_chain, gates=G))
    compiled_c, compile_c = _compile(chain, p.w_hh, xp, dhs)
    out.append(Contender(
        "floor_chain", lambda: jax.block_until_ready(compiled_c(p.w_hh, xp, dhs)),
        {"compile_s": compile_c, "memory": xla_memory(compiled_c)}))
    return out


# --- timing --------------------------------------------------------------------

def time_round_robin(contenders: list[Contender], repeats: dict[str, int]
                     ) -> dict[str, list[float]]:
    """Seconds per step of each contender: one step each per round, order rotated.

    Args:
        contenders: what to time.
        repeats: timed steps per contender; one that has its count sits out the
            remaining rounds.
    """
    times = {c.name: [] for c in contenders}
    n = len(contenders)
    for r in range(max(repeats.values())):
        gc.collect()
        for c in contenders[r % n:] + contenders[:r % n]:
            if len(times[c.name]) >= repeats[c.name]:
                continue
            if c.before:
                c.before()
            gc.disable()
            t0 = time.perf_counter()
            c.run()  # blocks until the step's results are ready
            dt = time.perf_counter() - t0
            gc.enable()
            times[c.name].append(dt)
    return times


def summarize(seconds: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in seconds)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "q1_ms": q[0],
            "q3_ms": q[2], "repeats": len(ms), "times_ms": [s * 1e3 for s in seconds]}


def _as_float(loss) -> float:
    return float(np.asarray(loss.numpy() if hasattr(loss, "numpy") else loss))


def init_params(model: jaxrnn.RNN, rng: np.random.Generator):
    """PyTorch's initialisation (every entry ~ U(-1/sqrt(H), 1/sqrt(H))), float32.

    Drawn with numpy and loaded through ``RNN.from_torch``, so that setting up a grid
    point compiles nothing but the contenders.
    """
    G, H = GATES[model.cell], model.hidden_size
    bound = 1.0 / math.sqrt(H)
    shapes = {"weight_ih_l0": (G * H, model.input_size), "weight_hh_l0": (G * H, H),
              "bias_ih_l0": (G * H,), "bias_hh_l0": (G * H,)}
    draw = lambda shape: rng.uniform(-bound, bound, shape).astype(np.float32)  # noqa: E731
    rnn_sd = {name: draw(shapes[name]) for name in model.torch_names()}
    readout_sd = {"weight": draw((model.output_size, H)), "bias": draw((model.output_size,))}
    return model.from_torch(rnn_sd, readout_sd, dtype=jnp.float32)


def bench_point(cell: str, T: int, B: int, H: int, settings: Settings, threads: int) -> dict:
    """Builds, compiles, warms up and times every contender on one grid point."""
    t_start = time.perf_counter()
    D = O = max(1, H // 4)
    model = jaxrnn.RNN(cell=cell, input_size=D, hidden_size=H, output_size=O)
    rng = np.random.default_rng(settings.seed)
    params = init_params(model, rng)
    xs = rng.standard_normal((T, B, D), np.float32)
    targets = rng.standard_normal((T, B, O), np.float32)
    batch = jaxrnn.Batch(jnp.asarray(xs), jnp.asarray(targets))

    contenders = [jaxrnn_contender(model, params, batch, m, settings.lr)
                  for m in ("bptt", "autodiff")]
    missing = {}  # contender -> why it did not run
    if _torch() is None:
        missing["torch"] = missing["torch_1t"] = "not installed"
    else:
        contenders.append(torch_contender(model, params, xs, targets, settings.lr, threads,
                                          settings.torch_memory))
        if settings.torch_single_thread:
            contenders.append(torch_contender(model, params, xs, targets, settings.lr, 1,
                                              False, name="torch_1t"))  # same memory as torch
        else:
            missing["torch_1t"] = "not run"
    flax_c = flax_contender(model, params, batch, settings.lr)
    if flax_c is None:
        missing["flax"] = "not installed"
    else:
        contenders.append(flax_c)
    contenders += floor_contenders(model, params, batch)

    results: dict[str, dict] = {}
    for c in contenders:  # warm-up: untimed; the first step's loss is the sanity check
        for i in range(settings.warmup):
            if c.before:
                c.before()
            t0 = time.perf_counter()
            loss = c.run()
            c.info["last_step_s"] = time.perf_counter() - t0
            if i == 0:
                c.info["first_step_s"] = time.perf_counter() - t0
                if c.name in STEPS:
                    c.info["first_loss"] = _as_float(loss)
    # A contender whose steps are so slow that its repeats would exceed the budget
    # gets fewer (at least min(3, repeats)); the JSON records each one's count.
    repeats = {c.name: max(min(3, settings.repeats),
                           min(settings.repeats, int(settings.budget_s / c.info["last_step_s"])))
               for c in contenders}
    t_timing = time.perf_counter()
    times = time_round_robin(contenders, repeats)
    t_end = time.perf_counter()
    for c in contenders:
        if c.profile:  # after the timing, so that it cannot disturb it
            if c.before:
                c.before()
            c.info["memory"] = c.profile()
        results[c.name] = {"status": "ok", **summarize(times[c.name]), **c.info}
    results.update({name: {"status": why} for name, why in missing.items()})

    point = {"cell": cell, "T": T, "B": B, "H": H, "input_size": D, "output_size": O,
             "gates": GATES[cell], "methods": results,
             "wall_s": {"setup_and_warmup": t_timing - t_start, "timing": t_end - t_timing,
                        "total": time.perf_counter() - t_start}}
    point["ratios"] = ratios(results)
    return point


def ratios(results: dict) -> dict:
    """Speed-ups of ``bptt`` (``other_ms / bptt_ms``; > 1: bptt is faster) and floor / bptt."""
    def ms(name):
        r = results.get(name, {})
        return r.get("median_ms") if r.get("status") == "ok" else None

    bptt = ms("bptt")
    out = {}
    for other in ("autodiff", "torch", "torch_1t", "flax"):
        out[f"bptt_speedup_vs_{other}"] = ms(other) / bptt if ms(other) and bptt else None
    out["floor_over_bptt"] = ms("floor") / bptt if ms("floor") and bptt else None
    # The largest speed-up over autodiff that any step doing the floor's products
    # with XLA's kernels could reach (it would have to run at the floor).
    out["autodiff_over_floor"] = (ms("autodiff") / ms("floor")
                                  if ms("autodiff") and ms("floor") else None)
    out["floor_chain_over_bptt"] = ms("floor_chain") / bptt if ms("floor_chain") and bptt else None
    return out


# --- environment ---------------------------------------------------------------

def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_pressure() -> dict | None:
    """Linux PSI: the share of time some runnable task waited for a CPU (avg10/60/300, %)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]  # "some avg10=..."
    except (OSError, IndexError):
        return None
    fields = dict(f.split("=") for f in line.split()[1:])
    return {k: float(fields[k]) for k in ("avg10", "avg60", "avg300") if k in fields}


def _pressure_text(p: dict | None) -> str:
    return "n/a" if not p else f"{p['avg60']:.0f}%"


def jax_threads() -> int:
    """XLA:CPU sizes its intra-op thread pool to the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def environment(threads: int) -> dict:
    torch = _torch()
    return {
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": _version("jaxlib"), "optax": _version("optax"),
                     "torch": torch.__version__ if torch else "not installed",
                     "flax": _version("flax"), "numpy": np.__version__,
                     "jaxrnn": jaxrnn.__version__},
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": {"jax_xla_cpu": threads,
                    "torch_intra_op": torch.get_num_threads() if torch else None,
                    "torch_interop": torch.get_num_interop_threads() if torch else None},
        "jax_devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "torch_mkldnn": bool(torch.backends.mkldnn.is_available()) if torch else None,
        "platform": platform.platform(),
        "cpu_pressure_start": cpu_pressure(),
    }


# --- the run -------------------------------------------------------------------

def run_benchmark(settings: Settings = Settings(), progress: bool = True) -> dict:
    """Runs the whole grid; returns every number (JSON-ready).

    Returns:
        ``{"settings", "environment", "contenders", "results": [point, ...]}``, one
        point per (cell, T, B, H) with ``methods[name]`` (times in ms, compile time,
        first-step loss, memory) and ``ratios``.
    """
    torch = _torch()
    threads = jax_threads()
    old_threads = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(threads)  # the same number of threads on both sides
    points = [(c, *g) for c in settings.cells for g in settings.grid]
    results = []
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            env = environment(threads)
            bar = tqdm(points, desc="benchmark", disable=not progress, dynamic_ncols=True)
            for cell, T, B, H in bar:
                bar.set_postfix_str(f"{cell} T={T} B={B} H={H}")
                results.append(bench_point(cell, T, B, H, settings, threads))
    finally:
        if torch:
            torch.set_num_threads(old_threads)
    return {"settings": dataclasses.asdict(settings), "environment": env,
            "contenders": list(CONTENDERS), "results": results,
            "cpu_pressure_end": cpu_pressure()}


# --- outputs -------------------------------------------------------------------

def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0 or not math.isfinite(x):
        return f"{x}"
    return f"{x:.{max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))}f}"


def _peak_mb(result: dict) -> float | None:
    peak = result.get("memory", {}).get("peak_bytes")
    return None if peak is None else peak / 2**20


def markdown(bench: dict) -> str:
    """The results as a markdown table, with what was measured underneath."""
    env = bench["environment"]
    v = env["versions"]
    head = ("| cell | T | B | H | bptt ms | autodiff ms | torch ms | torch 1-thread ms "
            "| flax ms | bptt speed-up vs autodiff | vs torch (1-thread) | vs flax | floor ms "
            "| floor/bptt | autodiff/floor | peak MB (bptt / autodiff / torch / flax) |")
    rule = "|" + "---|" * (head.count("|") - 1)
    lines = ["# jaxrnn training-step benchmark", "", head, rule]
    for p in bench["results"]:
        m, r = p["methods"], p["ratios"]

        def ms(name):
            if m[name].get("status") != "ok":
                return m[name].get("status", "-")
            fewer = "*" if m[name]["repeats"] < bench["settings"]["repeats"] else ""
            return _fmt(m[name]["median_ms"]) + fewer

        def speed(key):
            return "-" if r[key] is None else f"{r[key]:.2f}x"

        peaks = " / ".join(_fmt(_peak_mb(m[n])) if m[n].get("status") == "ok" else "-"
                           for n in ("bptt", "autodiff", "torch", "flax"))
        lines.append(f"| {p['cell']} | {p['T']} | {p['B']} | {p['H']} | {ms('bptt')} "
                     f"| {ms('autodiff')} | {ms('torch')} | {ms('torch_1t')} | {ms('flax')} "
                     f"| {speed('bptt_speedup_vs_autodiff')} | {speed('bptt_speedup_vs_torch')} "
                     f"({speed('bptt_speedup_vs_torch_1t')}) "
                     f"| {speed('bptt_speedup_vs_flax')} | {ms('floor')} "
                     f"| {_fmt(r['floor_over_bptt'], 2)} "
                     f"| {_fmt(r.get('autodiff_over_floor'), 2)} | {peaks} |")
    s = bench["settings"]
    lines += [
        "",
        f"Median of {s['repeats']} interleaved steps after {s['warmup']} warm-up step(s) "
        f"(* fewer, at least 3, where {s['repeats']} would have taken over {s['budget_s']:g} s; "
        f"benchmark.json has every count and every time); "
        f"input and output size H/4; float32; loss: mean squared error of a linear readout "
        f"at every step; Adam (lr {s['lr']}) on every side; the same initial weights and "
        f"data on every side. Speed-up = other's time / bptt's time (> 1: bptt is faster). "
        f"`floor` = the 2T dependent (B,H)x(H,G*H) products plus the big input-projection, "
        f"readout and weight-gradient products, nothing else (see benchmark.py); "
        f"`autodiff/floor` is therefore the largest speed-up over autodiff that any "
        f"implementation running at least these products with XLA's kernels can reach. "
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
        f"python {v['python']}. Flax LSTM cell: OptimizedLSTMCell. "
        f"CPU pressure (share of time some task waited for a core, /proc/pressure/cpu avg60): "
        f"{_pressure_text(env.get('cpu_pressure_start'))} at the start, "
        f"{_pressure_text(bench.get('cpu_pressure_end'))} at the end.",
    ]
    return "\n".join(lines) + "\n"


def chart(bench: dict, path: Path) -> None:
    """Grouped bars: ms per step of every contender at every grid point, one panel per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys(p["cell"] for p in bench["results"]))
    threads = bench["environment"]["threads"]["jax_xla_cpu"]
    style = {  # name: (label, color)
        "bptt": ("jaxrnn bptt", "tab:blue"), "autodiff": ("jaxrnn autodiff", "tab:orange"),
        "torch": (f"torch ({threads} threads)", "tab:red"),
        "torch_1t": ("torch (1 thread)", "lightcoral"), "flax": ("flax", "tab:green"),
        "floor": ("sequential floor", "0.6")}
    names = list(style)
    width = 0.84 / len(names)
    fig, axes = plt.subplots(1, len(cells), figsize=(4.8 * len(cells) + 0.6, 4.8), dpi=120,
                             squeeze=False, sharey=True)
    for ax, cell in zip(axes[0], cells):
        pts = [p for p in bench["results"] if p["cell"] == cell]
        for i, name in enumerate(names):
            ok = [p["methods"][name].get("status") == "ok" for p in pts]
            get = lambda key: np.array([p["methods"][name][key] if o else np.nan  # noqa: E731
                                        for p, o in zip(pts, ok)])
            med, q1, q3 = get("median_ms"), get("q1_ms"), get("q3_ms")
            x = np.arange(len(pts)) + (i - (len(names) - 1) / 2) * width
            label, color = style[name]
            ax.bar(x, med, width, label=label, color=color, edgecolor="white", linewidth=0.5,
                   hatch="//" if name == "floor" else None)
            ax.errorbar(x, med, yerr=[med - q1, q3 - med], fmt="none", ecolor="black",
                        elinewidth=0.7, capsize=1.5)  # the interquartile range
        ax.set_xticks(np.arange(len(pts)))
        ax.set_xticklabels([f"T={p['T']} B={p['B']}\nH={p['H']}" for p in pts], fontsize=8)
        ax.set_yscale("log")
        ax.set_title(cell)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("ms per training step (median; bars: quartiles)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    env = bench["environment"]
    fig.suptitle(f"One training step (forward, backward, Adam), float32, {env['cpu']}, "
                 f"{threads} threads; log scale", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def write_outputs(bench: dict, out: str | Path) -> dict[str, Path]:
    """Writes ``benchmark.json``, ``benchmark.md`` and ``benchmark.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "benchmark.json", "md": out / "benchmark.md",
             "png": out / "benchmark.png"}
    paths["json"].write_text(json.dumps(bench, indent=1) + "\n")
    paths["md"].write_text(markdown(bench))
    chart(bench, paths["png"])
    return paths


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="jaxrnn bench", description="Times one training step of jaxrnn (bptt, autodiff), "
        "PyTorch and Flax, and the sequential floor, on a grid of sizes.")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats (seconds; what the tests run)")
    parser.add_argument("--cells", nargs="+", choices=("elman", "lstm", "gru"),
                        help="cells to run (default: all three)")
    parser.add_argument("--repeats", type=int, help="timed rounds per grid point")
    parser.add_argument("--out", default=None,
                        help="output directory (default: runs/benchmark-TIME)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command line: runs the benchmark and writes its outputs; returns the exit status."""
    args = parse_args(argv)
    try:
        settings = QUICK if args.quick else Settings()
        changes = {}
        if args.cells:
            changes["cells"] = tuple(dict.fromkeys(args.cells))
        if args.repeats is not None:
            changes["repeats"] = args.repeats
        settings = dataclasses.replace(settings, **changes)
    except ValueError as e:
        print(f"benchmark: error: {e}", file=sys.stderr)
        return 2
    out = args.out or f"runs/benchmark-{time.strftime('%Y%m%d-%H%M%S')}"
    bench = run_benchmark(settings, progress=not args.no_progress)
    paths = write_outputs(bench, out)
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
