r"""The product floor of a training step, and the XLA chain (a contender, not a bound).

The *product floor* is the time of the step's matrix products alone, with no
elementwise work of any kind: ``step_products`` lists them as ``C (M, N) = A (M, K)
@ B (K, N)``, ``count`` times (for one layer and direction, G gates, H hidden
units, input size D)::

    fwd_chain   (B, H)     x (H, G*H)     T dependent products: h_{t-1} W_hh^T
    bwd_chain   (B, G*H)   x (G*H, H)     T dependent products: dg_t W_hh
    input_proj  (T*B, D)   x (D, G*H)     x_t W_ih^T for every t at once
    dW_ih       (G*H, T*B) x (T*B, D)     sum_t dg_t^T x_t
    dW_hh       (G*H, T*B) x (T*B, H)     sum_t dg_t^T h_{t-1}
    dx          (T*B, G*H) x (G*H, D)     the layer's input gradient (layers > 0 only)

plus, once, the readout ``(T*B, dirs*H) x (dirs*H, O)``, its input gradient
``(T*B, O) x (O, dirs*H)`` and ``dW_hy`` ``(O, T*B) x (T*B, dirs*H)``; D is the
input size for layer 0 and ``dirs*H`` above. ``product_floor`` times every
distinct shape with every kernel at hand (XLA, numpy, torch), interleaved, and
sums the fastest kernel's median time of each product, ``count``-weighted.

The *XLA chain* (``xla_chain_step``) is one XLA program doing those products
with the cheapest elementwise links that keep every product's output in use
(earlier versions of the benchmark reported it under ``methods["floor"]``). Its
links are work of their own and XLA chooses its kernels, so it bounds nothing;
it is timed as a contender.
"""

from __future__ import annotations

import functools
import gc
import math
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxrnn
from jaxrnn_lab.bench.contenders import Contender, compile_timed, xla_memory
from jaxrnn_lab.bench.environment import torch_module
from jaxrnn_lab.bench.timing import budget_repeats, settle, summarize, time_round_robin
from jaxrnn.extend import sum_outer  # the weight-gradient product of backward_scan

KERNELS = ("xla", "numpy", "torch")  # torch only where PyTorch is installed


class Product(NamedTuple):
    """``count`` matrix products ``C (M, N) = A (M, K) @ B (K, N)`` of one training step.

    ``count > 1`` is a chain: each product reads the one before, so the ``count``
    products run one after another and are timed as one chain.
    """

    name: str  # what it computes, with PyTorch's suffix: "fwd_chain_l0", "dW_hh_l1_reverse"
    M: int
    K: int
    N: int
    count: int = 1


def _suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction else "")


def step_products(model: jaxrnn.RNN, T: int, B: int) -> list[Product]:
    """Every matrix product of one training step of ``model`` on a (T, B) batch.

    Args:
        model: the model (cell, sizes, layers, directions).
        T: sequence length. B: batch size.

    Returns:
        Per layer and direction ``fwd_chain``, ``bwd_chain`` (count T),
        ``input_proj``, ``dW_ih``, ``dW_hh`` and, above the first layer, ``dx``;
        then ``readout``, ``readout_dx`` and ``dW_hy``.
    """
    G, H = model.cell_fn.num_gates, model.hidden_size
    F = model.num_directions * H  # features of a layer's output
    TB = T * B
    out = []
    for l in range(model.num_layers):
        D = model.input_size if l == 0 else F
        for d in range(model.num_directions):
            sfx = _suffix(l, d)
            out += [Product(f"fwd_chain{sfx}", B, H, G * H, T),
                    Product(f"bwd_chain{sfx}", B, G * H, H, T),
                    Product(f"input_proj{sfx}", TB, D, G * H),
                    Product(f"dW_ih{sfx}", G * H, TB, D),
                    Product(f"dW_hh{sfx}", G * H, TB, H)]
            if l > 0:  # the first layer's input gradient is not needed
                out.append(Product(f"dx{sfx}", TB, G * H, D))
    O = model.output_size
    return out + [Product("readout", TB, F, O), Product("readout_dx", TB, O, F),
                  Product("dW_hy", O, TB, F)]


# --- kernels: run() does `calls` back-to-back products and returns when all have run

# A run of a product that is not a chain repeats it back to back for about this
# long: one cold call of a microsecond product (after the garbage collector's
# sweep or a sleep) took 4-10x as long as a warm one (numpy 55 vs 5 us, XLA 280
# vs 25 us for (80, 4) x (4, 64) on 2 cores), and in a step products run warm.
# Each run is also preceded by one untimed product (see time_product).
MIN_RUN_S = 5e-4
MAX_CALLS = 200  # at most this many back-to-back products in one run


def operands(M: int, K: int, N: int, rng: np.random.Generator):
    """``A (M, K)`` ~ N(0, 1) and ``B (K, N)`` ~ U(-1/sqrt(K), 1/sqrt(K)), float32, C-contiguous.

    ``B``'s scale keeps ``A @ B`` of order one, so that the XLA chain (which feeds a
    column of each product back into ``A``) neither overflows nor goes subnormal.
    """
    bound = 1.0 / math.sqrt(K)
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.uniform(-bound, bound, (K, N)).astype(np.float32)
    return a, b


def numpy_kernel(a: np.ndarray, b: np.ndarray, calls: int) -> Callable[[], None]:
    """``calls`` calls of ``np.matmul(a, b, out=c)`` in a Python loop (numpy's BLAS)."""
    c = np.empty((a.shape[0], b.shape[1]), np.float32)
    matmul = np.matmul

    def run():
        for _ in range(calls):
            matmul(a, b, out=c)

    return run


def torch_kernel(a: np.ndarray, b: np.ndarray, calls: int) -> Callable[[], None]:
    """``calls`` calls of ``torch.mm(a, b, out=c)`` in a Python loop (eager, synchronous)."""
    import torch

    a_t, b_t = torch.from_numpy(a), torch.from_numpy(b)
    c_t = torch.empty((a.shape[0], b.shape[1]), dtype=torch.float32)
    mm = torch.mm

    def run():
        for _ in range(calls):
            mm(a_t, b_t, out=c_t)

    return run


def _xla_chain_of_products(a, b, *, count: int):
    """``count`` dependent products ``c = a @ b``, each writing its first column into ``a``.

    The one-column write (M elements) is what makes every product depend on the
    previous one; the last product is returned, so none of them is dead code.
    """
    def body(_, carry):
        a, _ = carry
        c = a @ b
        return jax.lax.dynamic_update_slice(a, c[:, :1], (0, 0)), c

    c0 = jnp.zeros((a.shape[0], b.shape[1]), a.dtype)
    return jax.lax.fori_loop(0, count, body, (a, c0))


def xla_kernel(a: np.ndarray, b: np.ndarray, calls: int, chain: bool
               ) -> tuple[Callable[[], None], Callable[[], None], float]:
    """XLA's products: a chain is one jitted loop of ``calls`` dependent products,
    else ``calls`` blocking calls of a jitted ``jnp.dot``.

    Returns:
        ``(run, one, compile_s)``: ``one()`` does a single product (a warm-up).
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    dot, compile_s = compile_timed(jax.jit(jnp.dot), a, b)
    one = lambda: jax.block_until_ready(dot(a, b))  # noqa: E731
    if not chain:
        def run():
            for _ in range(calls):
                jax.block_until_ready(dot(a, b))

        return run, one, compile_s
    loop, loop_s = compile_timed(
        jax.jit(functools.partial(_xla_chain_of_products, count=calls)), a, b)
    return (lambda: jax.block_until_ready(loop(a, b))), one, compile_s + loop_s


def _calls(a: np.ndarray, b: np.ndarray) -> int:
    """Back-to-back products per run of a product that is not a chain: about ``MIN_RUN_S``."""
    one = numpy_kernel(a, b, 1)
    one()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        one()
        ts.append(time.perf_counter() - t0)
    return int(min(MAX_CALLS, max(1, math.ceil(MIN_RUN_S / max(min(ts), 1e-9)))))


def _before_run(one: Callable[[], None], set_threads: Callable[[], None] | None
                ) -> Callable[[], None]:
    """What runs off the clock before each timed run of a kernel.

    Its thread count, a wait for other kernels' spinning threads, one product:
    the run then starts warm and on free cores.
    """
    def prepare():
        if set_threads:
            set_threads()
        settle()
        one()

    return prepare


def time_product(M: int, K: int, N: int, count: int, *, threads: int, repeats: int,
                 warmup: int, budget_s: float, rng: np.random.Generator) -> dict:
    """Times (M, K) x (K, N) products with every kernel, interleaved round-robin.

    A run is ``count`` dependent products when ``count > 1`` (a chain), else
    enough back-to-back products to take about ``MIN_RUN_S``. Before each run,
    off the clock, the process waits for other kernels' spinning threads
    (``timing.settle``) and the kernel does one product, so that the run starts
    warm and on free cores.

    Args:
        M, K, N: the product's shape. count: products of the step (a chain when > 1).
        threads: torch's intra-op threads (those of the torch contender).
        repeats: timed runs per kernel (fewer where they would take over ``budget_s``).
        warmup: untimed runs per kernel first.
        budget_s: cap on one kernel's timed seconds.
        rng: draws the operands.

    Returns:
        ``{kernel: summarize(...) of its runs (ms per run) and "calls" (products
        per run)}``, XLA's also with ``compile_s``.
    """
    a, b = operands(M, K, N, rng)
    chain = count > 1
    calls = count if chain else _calls(a, b)
    xla_run, xla_one, compile_s = xla_kernel(a, b, calls, chain)
    prepared = [("xla", xla_run, xla_one, None),
                ("numpy", numpy_kernel(a, b, calls), numpy_kernel(a, b, 1), None)]
    torch = torch_module()
    if torch is not None:
        prepared.append(("torch", torch_kernel(a, b, calls), torch_kernel(a, b, 1),
                         lambda: torch.set_num_threads(threads)))

    kernels = [Contender(name, run, {}, before=_before_run(one, set_threads))
               for name, run, one, set_threads in prepared]
    for k in kernels:
        for _ in range(warmup):
            k.before()
            t0 = time.perf_counter()
            k.run()
            k.info["last_s"] = time.perf_counter() - t0
    n = {k.name: budget_repeats(repeats, budget_s, k.info["last_s"]) for k in kernels}
    times = time_round_robin(kernels, n, collect=False)  # product_floor collected once
    out = {k.name: {**summarize(times[k.name]), "calls": calls} for k in kernels}
    out["xla"]["compile_s"] = compile_s
    return out


def product_floor(model: jaxrnn.RNN, T: int, B: int, *, threads: int, repeats: int,
                  warmup: int, budget_s: float, seed: int = 0) -> dict:
    """The product floor of one training step: its matrix products alone, fastest kernel each.

    Every distinct ``(M, K, N, count)`` of ``step_products`` is timed once by
    ``time_product``; a product's time is the smallest over the kernels of the
    median over the runs, per product (a run's median / its products).

    Args:
        model: the model. T: sequence length. B: batch size.
        threads: torch's intra-op threads. repeats, warmup, budget_s: as ``time_product``.
        seed: draws the operands.

    Returns:
        JSON-ready: ``floor_ms`` (sum over products of ``count * best_ms``),
        ``chains_ms`` and ``big_products_ms`` (its two parts), ``kernels``,
        ``wins`` (products won per kernel) and ``products``: per product its
        ``name, M, K, N, count``, ``kernels_ms`` (median ms of one product, per
        kernel), ``best``, ``best_ms``, ``total_ms`` (``count * best_ms``),
        ``calls`` (products per timed run), ``runs_ms`` (every run, ms) and
        ``compile_s`` (XLA's).
    """
    t0 = time.perf_counter()
    gc.collect()  # once: the collector is off while each run is timed
    rng = np.random.default_rng(seed)
    products = step_products(model, T, B)
    timed = {}  # (M, K, N, count) -> time_product(...)
    for p in products:
        if p[1:] not in timed:
            timed[p[1:]] = time_product(*p[1:], threads=threads, repeats=repeats,
                                        warmup=warmup, budget_s=budget_s, rng=rng)
    rows = []
    for p in products:
        stats = timed[p[1:]]
        per_product = {k: s["median_ms"] / s["calls"] for k, s in stats.items()}
        best = min(per_product, key=per_product.get)
        rows.append({**p._asdict(), "kernels_ms": per_product, "best": best,
                     "best_ms": per_product[best], "total_ms": p.count * per_product[best],
                     "calls": stats[best]["calls"],
                     "runs_ms": {k: s["times_ms"] for k, s in stats.items()},
                     "compile_s": stats["xla"]["compile_s"]})
    kernels = list(next(iter(timed.values())))
    return {
        "status": "ok",
        "floor_ms": sum(r["total_ms"] for r in rows),
        "chains_ms": sum(r["total_ms"] for r in rows if r["count"] > 1),
        "big_products_ms": sum(r["total_ms"] for r in rows if r["count"] == 1),
        "kernels": kernels,
        "wins": {k: sum(r["best"] == k for r in rows) for k in kernels},
        "torch_threads": threads if "torch" in kernels else None,
        "distinct_shapes": len(timed),
        "products": rows,
        "wall_s": time.perf_counter() - t0,
        "method": "per product, the smallest over kernels (xla, numpy, torch) of the median "
                  "over interleaved runs, per product; a chain of T dependent products is "
                  "timed whole; summed, count-weighted",
    }


# --- the XLA chain: a contender with its own elementwise links, NOT a bound ------

def _chain_forward(w_ih, w_hh, xs, *, gates: int, reverse: bool):
    """One direction's forward chain: ``hs`` (T, B, H), the residual for the backward one."""
    _, B, _ = xs.shape
    H = w_hh.shape[1]
    xp = xs @ w_ih.T  # input projection, one (T*B, D) x (D, G*H) product

    def forward(h, xp_t):
        g = xp_t + h @ w_hh.T  # the dependent (B, H) x (H, G*H) product
        h = jnp.tanh(g.reshape(B, gates, H).sum(axis=1))  # close the loop cheaply
        return h, (h, g if gates > 1 else None)  # one gate's derivative reads h back

    _, (hs, gs) = jax.lax.scan(forward, jnp.zeros((B, H), xs.dtype), xp, reverse=reverse)
    return hs, (gs if gates > 1 else hs)


def _chain_backward(w_hh, dhs, res, *, gates: int, reverse: bool):
    """One direction's backward chain; returns ``dgs`` (T, B, G*H)."""
    _, B, H = dhs.shape

    def backward(dh, inputs):
        dh_t, r_t = inputs
        dg = jnp.tile(dh + dh_t, (1, gates)) * r_t  # stand-in for the gates' derivative
        return dg @ w_hh, dg  # the dependent (B, G*H) x (G*H, H) product

    zeros = jnp.zeros((B, H), dhs.dtype)
    _, dgs = jax.lax.scan(backward, zeros, (dhs, res), reverse=not reverse)
    return dgs


def xla_chain_step(layers, w_hy, xs, targets, *, gates: int):
    r"""One XLA program doing the step's products with cheap elementwise links: NOT a bound.

    Per layer and direction (the reverse one runs from ``T-1`` down to ``0``):

    .. math::
        g_t = x_t W_{ih}^\top + h_{t-1} W_{hh}^\top, \quad h_t = \tanh(\textstyle\sum_k g_t^{(k)})
        \qquad\text{and back}\qquad
        \delta g_t = [\delta h_t, \ldots] \odot r_t, \quad
        \delta h_{t-1} = \delta g_t W_{hh}

    The gate math is replaced by the cheapest elementwise link that keeps every
    product's output in use (so XLA cannot drop any of it). The residual ``r_t``
    kept for the backward chain is ``g_t`` (B, G*H), as a gated cell must keep its
    gates, or ``h_t`` (B, H) for one gate (Elman reads tanh' back from h). These
    links are work of their own and XLA picks the kernels: it is a contender
    (``xla_chain``), not a bound; the bound is ``product_floor``.

    Args:
        layers: per layer, per direction, ``(w_ih (G*H, D_l), w_hh (G*H, H))``;
            D_0 = D, D_l = dirs*H above.
        w_hy: readout weight, (O, dirs*H).
        xs: inputs, (T, B, D). targets: (T, B, O).
        gates: G (static).

    Returns:
        ``(grads, dW_hy)``: per layer, per direction, ``(dW_ih (G*H, D_l), dW_hh
        (G*H, H))``, and ``dW_hy`` (O, dirs*H).
    """
    inputs, traces = [], []  # per layer: its input; per direction its (hs, residual)
    inp = xs
    for dirs in layers:
        inputs.append(inp)
        traces.append([_chain_forward(w_ih, w_hh, inp, gates=gates, reverse=bool(d))
                       for d, (w_ih, w_hh) in enumerate(dirs)])
        outs = [hs for hs, _ in traces[-1]]
        inp = jnp.concatenate(outs, axis=-1) if len(outs) > 1 else outs[0]  # (T, B, dirs*H)
    ys = inp @ w_hy.T  # readout, one product
    dys = (ys - targets) * (2.0 / ys.size)  # d mean((y - t)^2) / dy
    d_out = dys @ w_hy  # readout's input gradient, one product, (T, B, dirs*H)
    grads = [None] * len(layers)
    for l in reversed(range(len(layers))):
        H = layers[l][0][1].shape[1]
        layer_grads, dx = [], 0.0
        for d, (w_ih, w_hh) in enumerate(layers[l]):
            hs, res = traces[l][d]
            dgs = _chain_backward(w_hh, d_out[..., d * H:(d + 1) * H], res, gates=gates,
                                  reverse=bool(d))
            zero = jnp.zeros_like(hs[:1])
            # h_{t-1} of each step: the forward direction's previous, the reverse one's next
            hs_prev = (jnp.concatenate([hs[1:], zero]) if d
                       else jnp.concatenate([zero, hs[:-1]]))
            layer_grads.append((sum_outer(dgs, inputs[l]),  # dW_ih, one product over T*B rows
                                sum_outer(dgs, hs_prev)))  # dW_hh, one product over T*B rows
            if l > 0:
                dx = dx + dgs @ w_ih  # the layer's input gradient, one product
        grads[l] = tuple(layer_grads)
        d_out = dx
    return tuple(grads), sum_outer(dys, inp)  # dW_hy, one product over T*B rows


def xla_chain_contender(model: jaxrnn.RNN, params, batch: jaxrnn.Batch) -> Contender:
    """``xla_chain_step`` for the model's sizes and weights, jitted (contender ``xla_chain``)."""
    layers = tuple(tuple((p.w_ih, p.w_hh) for p in dirs) for dirs in params.layers)
    w_hy = params.readout.weight
    fn = jax.jit(functools.partial(xla_chain_step, gates=model.cell_fn.num_gates))
    compiled, compile_s = compile_timed(fn, layers, w_hy, batch.xs, batch.targets)
    return Contender(
        "xla_chain",
        lambda: jax.block_until_ready(compiled(layers, w_hy, batch.xs, batch.targets)),
        {"compile_s": compile_s, "memory": xla_memory(compiled)})
