"""Gradient checks: handwritten BPTT against ``jax.grad`` and finite differences, in float64.

For each random configuration, the gradient of a loss with respect to the
parameters, the inputs and the initial state is computed three ways:

* ``bptt``: ``jax.grad`` through the ``custom_vjp`` layers (the handwritten reverse scan);
* ``autodiff``: ``jax.grad`` through the plain forward ``lax.scan``;
* finite differences: the central difference of the loss along a random
  direction ``v``, compared with ``<grad, v>`` for both methods;
* ``rtrl``, where the configuration allows it (one direction, any cell and depth,
  sensitivities within ``rtrl.MAX_SENSITIVITY_ELEMENTS``): real-time recurrent
  learning, forward in time (``jaxrnn.rtrl_loss_and_grad``), for the parameters and
  the initial state (RTRL gives no input gradient), compared with ``autodiff``.

``bptt``, ``autodiff`` and ``rtrl`` are equal in exact arithmetic, so their
float64 relative differences should be at rounding level (<= 1e-10); the finite
difference has truncation error (<= 1e-6 passes).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxrnn
from jaxrnn import RNN, Cell, extend
from jaxrnn.extend import CELLS, loss_fn

BPTT_TOL = 1e-10
FD_TOL = 1e-6


@dataclasses.dataclass(frozen=True)
class CheckConfig:
    """One configuration to check."""

    cell: str | Cell = "elman"  # a built-in cell's name or a Cell instance
    input_size: int = 3
    hidden_size: int = 4
    output_size: int = 2
    num_layers: int = 1
    bidirectional: bool = False
    bias: bool = True
    readout_bias: bool = True
    nonlinearity: str = "tanh"
    proj_size: int = 0  # lstm only: 0 < P < hidden_size projects h (nn.LSTM(proj_size=P))
    seq_len: int = 5
    batch: int = 2
    loss: str = "half_sse"
    with_state: bool = True
    with_lengths: bool = False

    def model(self) -> RNN:
        return RNN(cell=self.cell, input_size=self.input_size, hidden_size=self.hidden_size,
                   output_size=self.output_size, num_layers=self.num_layers,
                   bidirectional=self.bidirectional, bias=self.bias,
                   readout_bias=self.readout_bias, nonlinearity=self.nonlinearity,
                   proj_size=self.proj_size)


class CheckResult(NamedTuple):
    """Max relative errors of one configuration."""

    config: CheckConfig
    bptt_vs_autodiff: float  # max over all gradient leaves of max|a - b| / max|b|
    bptt_vs_fd: float  # |<g_bptt, v> - fd| / max(|fd|, tiny)
    autodiff_vs_fd: float
    rtrl_vs_autodiff: float | None = None  # params and state gradients; None: not supported

    @property
    def ok(self) -> bool:
        return (self.bptt_vs_autodiff <= BPTT_TOL and self.bptt_vs_fd <= FD_TOL
                and self.autodiff_vs_fd <= FD_TOL
                and (self.rtrl_vs_autodiff is None or self.rtrl_vs_autodiff <= BPTT_TOL))


def tree_rel_error(a, b) -> float:
    """Max over leaves of ``max|a - b| / max|b|`` (absolute where ``b`` is all zero).

    Raises:
        ValueError: the trees differ in structure or shapes.
    """
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb:
        raise ValueError(f"tree structures differ: {ta} vs {tb}")
    worst = 0.0
    for x, y in zip(la, lb):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape:
            raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
        scale = np.max(np.abs(y)) if y.size else 0.0
        err = np.max(np.abs(x - y)) if x.size else 0.0
        worst = max(worst, float(err / scale) if scale > 0 else float(err))
    return worst


def check_config(cfg: CheckConfig, key: jax.Array, eps: float = 1e-6) -> CheckResult:
    """Checks one configuration in float64 (enables x64 for the duration).

    Args:
        cfg: the configuration.
        key: a PRNG key for parameters, data and the finite-difference direction.
        eps: the finite-difference step.
    """
    with jax.enable_x64(True):
        model = cfg.model()
        kp, kx, kt, ks, kl, kv = jax.random.split(key, 6)
        f64 = jnp.float64
        params = model.init(kp, f64)
        T, B = cfg.seq_len, cfg.batch
        xs = jax.random.normal(kx, (T, B, cfg.input_size), f64)
        if cfg.loss == "xent":
            targets = jax.random.randint(kt, (T, B), 0, cfg.output_size)
        else:
            targets = jax.random.normal(kt, (T, B, cfg.output_size), f64)
        state = None
        if cfg.with_state:
            zero = model.zero_state(B, f64)
            parts = zero if isinstance(zero, tuple) else (zero,)
            keys = jax.random.split(ks, len(parts))
            parts = tuple(0.5 * jax.random.normal(k, z.shape, f64) for k, z in zip(keys, parts))
            state = parts if isinstance(zero, tuple) else parts[0]
        lengths = jax.random.randint(kl, (B,), 1, T + 1) if cfg.with_lengths else None
        model.check_inputs(params, xs, state, lengths)

        def make(method):
            def f(params, xs, state):
                return loss_fn(model, cfg.loss, method, params, xs, targets, state, lengths)
            return f

        primals = (params, xs, state)
        grads = {m: jax.jit(jax.grad(make(m), argnums=(0, 1, 2)))(*primals)
                 for m in ("bptt", "autodiff")}
        bva = tree_rel_error(grads["bptt"], grads["autodiff"])

        leaves, treedef = jax.tree.flatten(primals)
        vkeys = jax.random.split(kv, len(leaves))
        v = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, f64)
                                         for k, x in zip(vkeys, leaves)])
        f = jax.jit(make("autodiff"))
        shift = lambda s: jax.tree.map(lambda x, d: x + s * d, primals, v)  # noqa: E731
        fd = (float(f(*shift(eps))) - float(f(*shift(-eps)))) / (2 * eps)
        dot = lambda g: float(sum(jnp.vdot(a, b) for a, b in  # noqa: E731
                                  zip(jax.tree.leaves(g), jax.tree.leaves(v))))
        denom = max(abs(fd), 1e-12)
        rva = None
        if rtrl_supported(cfg):
            out = jaxrnn.rtrl_loss_and_grad(model, params, xs, targets, cfg.loss, state, lengths,
                                          state_grad=state is not None)
            ad = grads["autodiff"]
            if state is None:
                rva = tree_rel_error(out[1], ad[0])
            else:
                rva = tree_rel_error((out[1], out[2]), (ad[0], ad[2]))
        return CheckResult(cfg, bva, abs(dot(grads["bptt"]) - fd) / denom,
                           abs(dot(grads["autodiff"]) - fd) / denom, rva)


def rtrl_supported(cfg: CheckConfig) -> bool:
    """Whether ``method="rtrl"`` handles ``cfg``: one direction (any cell and depth), within
    ``rtrl.MAX_SENSITIVITY_ELEMENTS``."""
    model = cfg.model()
    params = jax.eval_shape(lambda: model.init(jax.random.key(0)))  # shapes: none made
    try:
        extend.check_model(model, cfg.batch, state_grad=cfg.with_state, params=params)
    except ValueError:
        return False
    return True


def cell_label(cell: str | Cell) -> str:
    """A cell's name for tables: the built-in name, or a user cell's class name."""
    return cell if isinstance(cell, str) else type(cell).__name__


def random_configs(n: int, seed: int = 0, cells=tuple(CELLS),
                   max_seq_len: int = 20, max_hidden: int = 8, max_layers: int = 3,
                   directions=(False, True), lengths=(False, True),
                   **fixed) -> list[CheckConfig]:
    """``n`` random configurations over the given cells and options.

    Args:
        n: how many.
        seed: numpy seed for the draw.
        cells: cells to draw from: built-in names or ``Cell`` instances.
        max_seq_len: T is drawn from [1, max_seq_len].
        max_hidden: H is drawn from [1, max_hidden].
        max_layers: the number of layers is drawn from [1, max_layers].
        directions: ``bidirectional`` settings to draw from.
        lengths: whether to draw variable lengths.
        **fixed: ``CheckConfig`` fields to hold fixed instead of drawing them
            (e.g. ``hidden_size=64, seq_len=200``).

    Raises:
        ValueError: an unknown field in ``fixed``.
    """
    names = {f.name for f in dataclasses.fields(CheckConfig)}
    unknown = sorted(set(fixed) - names)
    if unknown:
        raise ValueError(f"unknown configuration fields {unknown}; known: {sorted(names)}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cell = cells[int(rng.integers(len(cells)))]
        drawn = dict(
            cell=cell,
            input_size=int(rng.integers(1, 6)),
            hidden_size=int(rng.integers(1, max_hidden + 1)),
            output_size=int(rng.integers(1, 4)),
            num_layers=int(rng.integers(1, max_layers + 1)),
            bidirectional=bool(rng.choice(directions)),
            bias=bool(rng.integers(2)),
            readout_bias=bool(rng.integers(2)),
            nonlinearity=(str(rng.choice(["tanh", "relu"])) if cell in ("elman", "indrnn")
                          else "tanh"),
            seq_len=int(rng.integers(1, max_seq_len + 1)),
            batch=int(rng.integers(1, 4)),
            loss=str(rng.choice(["half_sse", "mse", "xent"])),
            with_state=bool(rng.integers(2)),
            with_lengths=bool(rng.choice(lengths)),
        )
        # lstm only: no projection or P in [1, H-1], half the time each (H >= 2)
        kind, H = fixed.get("cell", cell), fixed.get("hidden_size", drawn["hidden_size"])
        drawn["proj_size"] = (int(rng.integers(1, H)) if isinstance(kind, str) and
                              kind == "lstm" and H >= 2 and rng.integers(2) else 0)
        drawn.update(fixed)
        if drawn["cell"] not in ("elman", "indrnn"):
            drawn["nonlinearity"] = "tanh"
        if drawn["cell"] != "lstm" or drawn["proj_size"] >= drawn["hidden_size"]:
            if "proj_size" in fixed and drawn["proj_size"]:
                raise ValueError(f"proj_size={drawn['proj_size']} needs cell='lstm' and "
                                 f"hidden_size > proj_size, got cell={drawn['cell']!r}, "
                                 f"hidden_size={drawn['hidden_size']}")
            drawn["proj_size"] = 0
        if drawn["loss"] == "xent" and drawn["output_size"] < 2:
            if "output_size" in fixed:
                raise ValueError("loss='xent' needs output_size >= 2 classes (with one class "
                                 "the loss is constant and every gradient zero)")
            drawn["output_size"] = 2
        out.append(CheckConfig(**drawn))
    return out


def format_results(results: list[CheckResult]) -> str:
    """A markdown table of the results, one row per configuration ("-": rtrl not supported)."""
    head = ("| # | cell | nonlin | L | dirs | bias | T | B | D | H | P | O | loss | state "
            "| lengths | bptt vs autodiff | bptt vs FD | autodiff vs FD | rtrl vs autodiff "
            "| result |")
    sep = "|" + "---|" * 20
    rows = [head, sep]
    for i, r in enumerate(results):
        c = r.config
        rows.append(
            f"| {i} | {cell_label(c.cell)} | {c.nonlinearity} | {c.num_layers} | "
            f"{2 if c.bidirectional else 1} | {'y' if c.bias else 'n'} | {c.seq_len} | "
            f"{c.batch} | {c.input_size} | {c.hidden_size} | {c.proj_size or '-'} | "
            f"{c.output_size} | {c.loss} | "
            f"{'y' if c.with_state else 'n'} | {'y' if c.with_lengths else 'n'} | "
            f"{r.bptt_vs_autodiff:.1e} | {r.bptt_vs_fd:.1e} | {r.autodiff_vs_fd:.1e} | "
            f"{'-' if r.rtrl_vs_autodiff is None else f'{r.rtrl_vs_autodiff:.1e}'} | "
            f"{'ok' if r.ok else 'MISMATCH'} |")
    return "\n".join(rows)
