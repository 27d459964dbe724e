"""The weight-gradient product ``sum_t dg_t^T a_t``, every way of writing it, against numpy (#10).

After the reverse loop the handwritten BPTT computes each weight gradient as one
product over all ``T*B`` rows, ``dW = sum_t dg_t^T a_t`` with ``dg (T, B, G*H)``
and ``a (T, B, K)`` (``scan.sum_outer``): ``dW_hh`` (``a`` = the states, K = H) and
``dW_ih`` (``a`` = the inputs). Unlike the input projection, its output is small
(G*H, K), so the first touch of fresh pages (jaxrnn_lab/perf/huge_pages.py) is not
what it costs. This script times, interleaved round-robin in one process, at the
benchmark's shapes:

* ``sum_outer``: the library's form, ``a`` transposed to ``(K, T, B)`` and the
  small result transposed back, both explicit behind ``optimization_barrier``;
* ``folded``: one ``dot_general`` contracting ``(t, b)``, the transposes left to XLA;
* ``flat``: ``dg`` and ``a`` reshaped to ``(T*B, .)``, then ``dg^T @ a``;
* ``chunks``: a ``lax.scan`` over ``chunks`` slices of time, one ``sum_outer`` each,
  summed;
* ``per_step``: ``dg_t^T a_t`` accumulated step by step in a ``lax.scan`` (what
  ``jax.grad`` through the forward scan does inside its loop);
* ``callback``: numpy's product called from the jitted function through
  ``jax.pure_callback``;
* ``numpy``: ``np.matmul(dg^T, a, out=...)`` (OpenBLAS); ``torch``: ``dg^T @ a``.

Every XLA form is checked against numpy's float64 product before it is timed.

Commands::

    python -m jaxrnn_lab.perf.weight_gradient --quick --out /tmp/wg   # seconds
    python -m jaxrnn_lab.perf.weight_gradient                 # docs/experiments/weight_gradient

Writes ``weight_gradient.json`` and ``weight_gradient.md``; compare within a row only.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import sys
import time
from pathlib import Path

from jaxrnn_lab import harness as common
import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn_lab.bench.environment import cpu_pressure, jax_threads, torch_module
from jaxrnn.extend import sum_outer

FORMS = ("sum_outer", "folded", "flat", "chunks", "per_step", "callback", "numpy", "torch")
XLA_FORMS = FORMS[:5]  # the ones XLA compiles on its own kernels


@dataclasses.dataclass(frozen=True)
class Settings:
    # (name, T, B, G*H, K): dW_hh of the benchmark's single-layer points (K = H) and
    # the large LSTM's dW_ih (K = D = H/4)
    shapes: tuple = (
        ("lstm dW_hh", 100, 32, 512, 128), ("lstm dW_hh", 200, 64, 1024, 256),
        ("lstm dW_hh", 1000, 16, 256, 64), ("lstm dW_hh", 100, 128, 2048, 512),
        ("lstm dW_ih", 100, 128, 2048, 128),
        ("gru dW_hh", 100, 32, 384, 128), ("gru dW_hh", 200, 64, 768, 256),
        ("gru dW_hh", 1000, 16, 192, 64), ("gru dW_hh", 100, 128, 1536, 512),
        ("elman dW_hh", 200, 64, 256, 256), ("elman dW_hh", 100, 128, 512, 512))
    chunks: int = 4  # time slices of the ``chunks`` form (one where they do not divide T)
    rounds: int = 5  # round-robin rounds; each times every form ``calls`` times
    calls: int = 3  # calls per form and round (the round's median counts)
    seed: int = 0


FULL = Settings()
QUICK = Settings(shapes=(("lstm dW_hh", 8, 2, 32, 8),), chunks=2, rounds=2, calls=2)


def folded_outer(dg, a):
    """One ``dot_general`` contracting ``(t, b)``, the transposes left to XLA."""
    return jax.lax.dot_general(dg, a, (((0, 1), (0, 1)), ((), ())))


def flat_outer(dg, a):
    """``dg^T @ a`` on ``(T*B, .)`` reshapes of both."""
    return dg.reshape(-1, dg.shape[-1]).T @ a.reshape(-1, a.shape[-1])


def chunked_outer(dg, a, chunks: int):
    """``scan.sum_outer`` over ``chunks`` slices of time in a ``lax.scan``, summed.

    One ``sum_outer`` over all of time where ``chunks`` does not divide T.
    """
    T = dg.shape[0]
    if T % chunks:
        return sum_outer(dg, a)
    split = lambda x: x.reshape((chunks, T // chunks) + x.shape[1:])  # noqa: E731
    zero = jnp.zeros((dg.shape[-1], a.shape[-1]), dg.dtype)
    return jax.lax.scan(lambda acc, da: (acc + sum_outer(*da), None), zero,
                        (split(dg), split(a)))[0]


def per_step_outer(dg, a):
    """``dg_t^T a_t`` accumulated step by step in a ``lax.scan``."""
    zero = jnp.zeros((dg.shape[-1], a.shape[-1]), dg.dtype)
    return jax.lax.scan(lambda acc, da: (acc + da[0].T @ da[1], None), zero, (dg, a))[0]


def xla_forms(chunks: int) -> dict:
    """The jitted XLA forms of ``sum_t dg_t^T a_t``, each ``f(dg, a) -> (G*H, K)``."""
    return {"sum_outer": jax.jit(sum_outer), "folded": jax.jit(folded_outer),
            "flat": jax.jit(flat_outer),
            "chunks": jax.jit(functools.partial(chunked_outer, chunks=chunks)),
            "per_step": jax.jit(per_step_outer)}


def callback_form():
    """numpy's product inside a jitted function, through ``jax.pure_callback``."""
    def host(dg, a):
        dg, a = np.asarray(dg), np.asarray(a)
        return np.matmul(dg.reshape(-1, dg.shape[-1]).T, a.reshape(-1, a.shape[-1]))

    return jax.jit(lambda dg, a: jax.pure_callback(
        host, jax.ShapeDtypeStruct((dg.shape[-1], a.shape[-1]), dg.dtype), dg, a))


def median_ms(f, calls: int) -> float:
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def time_shape(name: str, T: int, B: int, GH: int, K: int, settings: Settings, torch) -> dict:
    """Median ms of every form at one shape, interleaved round-robin (order rotated)."""
    rng = np.random.default_rng(settings.seed)
    dg = rng.standard_normal((T, B, GH), np.float32)
    a = rng.standard_normal((T, B, K), np.float32)
    dgj, aj = jnp.asarray(dg), jnp.asarray(a)
    fns = xla_forms(settings.chunks)
    fns["callback"] = callback_form()
    ref = dg.reshape(-1, GH).astype(np.float64).T @ a.reshape(-1, K).astype(np.float64)
    for form, f in fns.items():  # every jitted form computes the same product
        got = np.asarray(f(dgj, aj), np.float64)
        err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        if err > 1e-4:
            raise AssertionError(f"{form} at {name} {(T, B, GH, K)}: relative error {err:.1e}")
    run = {form: (lambda f=f: f(dgj, aj).block_until_ready()) for form, f in fns.items()}
    dg2, a2, out = dg.reshape(-1, GH), a.reshape(-1, K), np.empty((GH, K), np.float32)
    run["numpy"] = lambda: np.matmul(dg2.T, a2, out=out)
    if torch is not None:
        dgt, at = torch.from_numpy(dg2), torch.from_numpy(a2)
        run["torch"] = lambda: dgt.T @ at
    for f in run.values():  # warm up: compile, first touch
        f()
        f()
    times = {form: [] for form in run}
    order = list(run)
    for r in range(settings.rounds):
        for form in order[r % len(order):] + order[:r % len(order)]:
            times[form].append(median_ms(run[form], settings.calls))
    return {"name": name, "T": T, "B": B, "GH": GH, "K": K,
            "gflop": 2 * T * B * GH * K / 1e9,
            "ms": {form: statistics.median(v) for form, v in times.items()}}


def markdown(rows: list[dict]) -> str:
    """One row per shape: ms per form, and the best XLA form over numpy."""
    head = ("| product | (T, B, G*H, K) | " + " | ".join(f"{f} ms" for f in FORMS)
            + " | best XLA form | best XLA / numpy |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ms = r["ms"]
        best = min(XLA_FORMS, key=lambda f: ms[f])
        cells = [f"{ms[f]:.3g}" if f in ms else "-" for f in FORMS]
        lines.append(f"| {r['name']} | ({r['T']}, {r['B']}, {r['GH']}, {r['K']}) | "
                     + " | ".join(cells) + f" | {best} | {ms[best] / ms['numpy']:.2f} |")
    return "\n".join(lines) + "\n"


def run(settings: Settings, out: Path, progress: bool) -> dict:
    from tqdm.auto import tqdm

    torch = torch_module()
    if torch is not None:
        torch.set_num_threads(jax_threads())  # as many threads as XLA:CPU
    pressure = cpu_pressure()
    rows = [time_shape(*shape, settings, torch)
            for shape in tqdm(settings.shapes, desc="weight gradient", disable=not progress)]
    (out / "weight_gradient.md").write_text(markdown(rows))
    return {"rows": rows, "cpu_pressure": {"start": pressure, "end": cpu_pressure()}}


if __name__ == "__main__":
    sys.exit(common.main("weight_gradient", __doc__, FULL, QUICK, run))
