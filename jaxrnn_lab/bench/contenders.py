"""The contenders: a training step of jaxrnn, PyTorch, Flax from the same weights, ready to time.

Each builder returns a ``Contender`` whose ``run()`` does one step (forward,
loss, backward, Adam) and blocks on it. ``init_params`` draws PyTorch's
initialisation with numpy, so every side starts from the same weights.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxrnn  # the benchmark uses the public API only


@dataclasses.dataclass
class Contender:
    """A ready-to-time step: ``run()`` does one step, blocks on it, returns its loss."""

    name: str
    run: Callable[[], Any]
    info: dict  # compile_s, memory, notes ... (JSON-ready)
    before: Callable[[], None] | None = None  # called before each run, off the clock
    profile: Callable[[], dict] | None = None  # measures memory once, after the timing


def xla_memory(compiled) -> dict:
    """The compiled executable's buffer sizes (bytes) and their peak.

    Args:
        compiled: a ``jax.stages.Compiled``.

    Returns:
        XLA's ``memory_analysis()`` sizes and ``peak_bytes`` = argument + output -
        alias + temp (donated buffers counted once), or ``{"status": ...}``.
    """
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


def copy_tree(tree):
    """A copy of a pytree of arrays in fresh device buffers (through the host: no compile)."""
    return jax.tree.map(lambda a: jnp.asarray(np.array(a)), tree)


def compile_timed(fn, *args):
    """``(fn.lower(*args).compile(), seconds it took)`` for a jitted ``fn``."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def torch_shapes(model: jaxrnn.RNN) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the matching ``torch.nn.RNN/LSTM/GRU``, by its name.

    ``weight_ih_l{k}[_reverse]`` is (G*H, D_k) with D_0 = input size and D_k =
    dirs*H above; ``weight_hh`` (G*H, H); ``bias_ih``, ``bias_hh`` (G*H,).
    """
    G, H = model.cell_fn.num_gates, model.hidden_size
    shapes = {}
    for l in range(model.num_layers):
        d_in = model.input_size if l == 0 else model.num_directions * H
        for d in range(model.num_directions):
            sfx = f"_l{l}" + ("_reverse" if d else "")
            shapes.update({f"weight_ih{sfx}": (G * H, d_in), f"weight_hh{sfx}": (G * H, H),
                           f"bias_ih{sfx}": (G * H,), f"bias_hh{sfx}": (G * H,)})
    return shapes


def init_params(model: jaxrnn.RNN, rng: np.random.Generator) -> jaxrnn.RNNParams:
    """PyTorch's initialisation, float32, of every layer and direction and the readout.

    Every recurrent tensor ~ U(-1/sqrt(H), 1/sqrt(H)) (``nn.RNN/LSTM/GRU``); the
    readout ~ U(-1/sqrt(F), 1/sqrt(F)) with F = dirs*H its fan-in (``nn.Linear``).
    Drawn with numpy in ``model.torch_names()`` order and loaded through
    ``RNN.from_torch``, so that setting up a grid point compiles nothing but the
    contenders.

    Args:
        model: the model (any cell, layers, directions).
        rng: the generator to draw from.
    """
    shapes = torch_shapes(model)
    features = model.num_directions * model.hidden_size

    def draw(shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    rnn_sd = {name: draw(shapes[name], model.hidden_size) for name in model.torch_names()}
    readout_sd = {"weight": draw((model.output_size, features), features)}
    if model.readout_bias:
        readout_sd["bias"] = draw((model.output_size,), features)
    return model.from_torch(rnn_sd, readout_sd, dtype=jnp.float32)


def jaxrnn_contender(model: jaxrnn.RNN, params, batch: jaxrnn.Batch, method: str,
                     lr: float, name: str | None = None) -> Contender:
    """``jaxrnn.make_train_step(..., loss="mse", method=method)`` with optax Adam.

    Args:
        model: the model (its ``compute_dtype`` too). params: its parameters
            (copied: the step donates them).
        batch: ``xs`` (T, B, D), ``targets`` (T, B, O).
        method: ``"bptt"`` or ``"autodiff"``.
        lr: Adam's learning rate.
        name: the contender's name; default ``method``.
    """
    opt = optax.adam(lr)
    params = copy_tree(params)  # own buffers: the step donates them
    opt_state = jax.jit(opt.init)(params)
    step = jaxrnn.make_train_step(model, opt, loss="mse", method=method)
    compiled, compile_s = compile_timed(step, params, opt_state, batch)
    state = [params, opt_state]

    def run():
        p, s, metrics = compiled(state[0], state[1], batch)
        jax.block_until_ready((p, s, metrics))
        state[0], state[1] = p, s  # thread the donated buffers through
        return metrics["loss"]

    info = {"compile_s": compile_s, "memory": xla_memory(compiled)}
    if model.compute_dtype is not None:
        info["compute_dtype"] = model.compute_dtype
    return Contender(name or method, run, info)


def torch_contender(model: jaxrnn.RNN, params, xs: np.ndarray, targets: np.ndarray,
                    lr: float, threads: int, profile_memory: bool,
                    name: str = "torch") -> Contender:
    """``nn.RNN/LSTM/GRU(num_layers, bidirectional)`` + ``nn.Linear`` with jaxrnn's weights, Adam.

    Args:
        model: the model; params: its parameters (handed over with ``RNN.to_torch``).
        xs: inputs, (T, B, D), time-major. targets: (T, B, O).
        lr: Adam's learning rate.
        threads: set (``torch.set_num_threads``) before every step, off the clock.
        profile_memory: measure the peak memory of one extra step after the timing.
        name: the contender's name.
    """
    import torch
    import torch.nn.functional as F

    kind = {"elman": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[model.cell]
    extra = {"nonlinearity": model.nonlinearity} if model.cell == "elman" else {}
    rnn = kind(model.input_size, model.hidden_size, num_layers=model.num_layers,
               bidirectional=model.bidirectional, **extra)
    head = torch.nn.Linear(model.num_directions * model.hidden_size, model.output_size)
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
    """Peak bytes of PyTorch tensors alive during one ``run()`` (see ``jaxrnn_lab.bench``'s doc)."""
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


def _suffix(layer: int, direction: int) -> str:
    """PyTorch's name suffix of a layer and direction: ``_l0``, ``_l1_reverse``."""
    return f"_l{layer}" + ("_reverse" if direction else "")


def flax_rnn_class():
    """Flax's module class of the benchmark's model, or None when flax is not installed."""
    try:
        import flax.linen as nn
    except ImportError:
        return None

    class FlaxRNN(nn.Module):
        """``nn.RNN`` layers of one cell (time-major, order kept), then a ``Dense``."""

        cell: str
        hidden_size: int
        output_size: int
        num_layers: int = 1
        bidirectional: bool = False

        @nn.compact
        def __call__(self, xs):  # (T, B, D) -> (T, B, O)
            cell_cls = {"elman": nn.SimpleCell, "lstm": nn.OptimizedLSTMCell,
                        "gru": nn.GRUCell}[self.cell]
            hs = xs
            for l in range(self.num_layers):
                outs = []
                for d in range(2 if self.bidirectional else 1):
                    cell = cell_cls(features=self.hidden_size, name=f"cell{_suffix(l, d)}")
                    outs.append(nn.RNN(cell, time_major=True, reverse=bool(d), keep_order=True,
                                       name=f"rnn{_suffix(l, d)}")(hs))
                hs = jnp.concatenate(outs, axis=-1) if len(outs) > 1 else outs[0]
            return nn.Dense(self.output_size, name="readout")(hs)

    return FlaxRNN


def _flax_cell(cell: str, p, H: int) -> dict:
    """One layer-direction's ``CellParams`` (PyTorch layout) under Flax's names."""
    w_i, w_h = np.asarray(p.w_ih).T, np.asarray(p.w_hh).T  # (D, G*H), (H, G*H)
    b_i, b_h = np.asarray(p.b_ih), np.asarray(p.b_hh)  # (G*H,)
    blk = lambda a, k: a[..., k * H:(k + 1) * H]  # noqa: E731  gate block k
    if cell == "elman":
        return {"i": {"kernel": w_i, "bias": b_i + b_h}, "h": {"kernel": w_h}}
    if cell == "lstm":
        out = {}
        for k, g in enumerate("ifgo"):  # PyTorch's gate order
            out[f"i{g}"] = {"kernel": blk(w_i, k)}
            out[f"h{g}"] = {"kernel": blk(w_h, k), "bias": blk(b_i, k) + blk(b_h, k)}
        return out
    return {"ir": {"kernel": blk(w_i, 0), "bias": blk(b_i, 0) + blk(b_h, 0)},  # gru: r, z, n
            "iz": {"kernel": blk(w_i, 1), "bias": blk(b_i, 1) + blk(b_h, 1)},
            "in": {"kernel": blk(w_i, 2), "bias": blk(b_i, 2)},
            "hr": {"kernel": blk(w_h, 0)},
            "hz": {"kernel": blk(w_h, 1)},
            "hn": {"kernel": blk(w_h, 2), "bias": blk(b_h, 2)}}


def flax_params(model: jaxrnn.RNN, params) -> dict:
    r"""jaxrnn's (PyTorch-layout) weights under Flax's names: the same function.

    Flax's cells keep one bias per gate where PyTorch has two (``b_ih + b_hh``),
    except the GRU's candidate gate, whose recurrent bias sits inside ``r * (.)``.
    Kernels are transposed (Flax computes ``x @ kernel``). Layer ``l``'s
    direction ``d`` is ``cell_l{l}[_reverse]``.
    """
    tree = {f"cell{_suffix(l, d)}": _flax_cell(model.cell, p, model.hidden_size)
            for l, dirs in enumerate(params.layers) for d, p in enumerate(dirs)}
    tree["readout"] = {"kernel": np.asarray(params.readout.weight).T,
                       "bias": np.asarray(params.readout.bias)}
    return jax.tree.map(lambda a: jnp.asarray(np.ascontiguousarray(a)), tree)


def flax_contender(model: jaxrnn.RNN, params, batch: jaxrnn.Batch, lr: float
                   ) -> Contender | None:
    """``flax.linen.RNN`` layers + ``Dense`` with jaxrnn's weights, ``jax.value_and_grad``, Adam.

    Args:
        model: the model. params: its parameters.
        batch: ``xs`` (T, B, D), ``targets`` (T, B, O).
        lr: Adam's learning rate.

    Returns:
        The contender, or None when flax is not installed.
    """
    FlaxRNN = flax_rnn_class()
    if FlaxRNN is None:
        return None
    net = FlaxRNN(model.cell, model.hidden_size, model.output_size, model.num_layers,
                  model.bidirectional)
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
    compiled, compile_s = compile_timed(step, fparams, opt_state, batch.xs, batch.targets)
    state = [fparams, opt_state]

    def run():
        p, s, metrics = compiled(state[0], state[1], batch.xs, batch.targets)
        jax.block_until_ready((p, s, metrics))
        state[0], state[1] = p, s
        return metrics["loss"]

    cell_name = {"elman": "SimpleCell", "lstm": "OptimizedLSTMCell", "gru": "GRUCell"}
    return Contender("flax", run, {"compile_s": compile_s, "memory": xla_memory(compiled),
                                   "cell": cell_name[model.cell]})
