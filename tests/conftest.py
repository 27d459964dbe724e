"""Shared test set-up: fast compiles, float64 enabled, a key fixture, strict tree comparisons."""

import os

# The suite is dominated by compiling small programs, not running them: compile with
# LLVM's cheap pipeline (XLA's HLO passes, and so the buffers and HLO the tests read,
# are unchanged). Measured on the 2-core CI machine: the gradient grid of
# test_family 95 -> 72 s, test_runner + test_exp_training 123 -> 107 s. Set before
# jax is imported; subprocesses the tests start inherit it (with their own flags
# appended, see ``xla_flags``).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()


def xla_flags(*flags: str) -> str:
    """``XLA_FLAGS`` for a subprocess: this process's (the fast compiles) plus ``flags``."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def key():
    return jax.random.key(0)


def tree_max_rel_error(actual, expected) -> float:
    """Max over leaves of max|a - e| / max|e|; asserts equal structure and shapes."""
    la, ta = jax.tree.flatten(actual)
    le, te = jax.tree.flatten(expected)
    assert ta == te, f"tree structures differ:\n{ta}\n{te}"
    worst = 0.0
    for a, e in zip(la, le):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, f"shapes differ: {a.shape} vs {e.shape}"
        assert a.dtype == e.dtype, f"dtypes differ: {a.dtype} vs {e.dtype}"
        if a.size == 0:
            continue
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(e))):
            return float("inf")  # NaN/inf never passes (max() would silently drop a NaN)
        scale = float(np.max(np.abs(e)))
        err = float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64))))
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


def assert_trees_rel_close(actual, expected, rtol: float):
    err = tree_max_rel_error(actual, expected)
    assert err <= rtol, f"max relative error {err:.3e} > {rtol:.1e}"


def all_pairs(factors: dict) -> list[dict]:
    """A small set of cases covering every pair of values of every two factors.

    Greedy and deterministic: the first case sets every factor to its *last* value
    (listed heaviest last: most layers, both directions, ...), then each next case
    is the full-product combination covering the most pairs not yet covered (ties:
    the first in product order).
    """
    import itertools

    names = list(factors)
    product = [dict(zip(names, vals)) for vals in itertools.product(*factors.values())]

    def pairs(case):
        return {(a, case[a], b, case[b]) for a, b in itertools.combinations(names, 2)}

    todo = set().union(*(pairs(c) for c in product))
    chosen = [{k: v[-1] for k, v in factors.items()}]
    todo -= pairs(chosen[0])
    while todo:
        best = max(product, key=lambda c: len(pairs(c) & todo))
        chosen.append(best)
        todo -= pairs(best)
    return chosen


# --- shared by several test files -------------------------------------------------------

import dataclasses  # noqa: E402
from typing import ClassVar, NamedTuple  # noqa: E402

import jax.numpy as jnp  # noqa: E402

from jaxrnn import Cell  # noqa: E402


class LeakyParams(NamedTuple):
    """A cell's own parameters: CellParams' four fields and a leak per unit."""

    w_ih: jax.Array  # (H, D)
    w_hh: jax.Array  # (H, H)
    b_ih: jax.Array | None  # (H,)
    b_hh: jax.Array | None  # (H,)
    leak: jax.Array  # (H,): h = (1 - s) h_prev + s tanh(a), s = sigmoid(leak)


@dataclasses.dataclass(frozen=True)
class LeakyElman(Cell):
    name: ClassVar[str] = "leaky"

    def init(self, key, input_size, hidden_size, bias=True, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        p = super().init(k1, input_size, hidden_size, bias, dtype)
        return LeakyParams(*p, leak=jax.random.uniform(k2, (hidden_size,), dtype, -2.0, 2.0))

    def step(self, params, carry, xp):
        (h_prev,) = carry
        u = jnp.tanh(xp + self.recurrent_preactivation(params, h_prev))
        s = jax.nn.sigmoid(params.leak)
        return ((1 - s) * h_prev + s * u,), u

    def backward_step(self, params, carry_prev, carry, res, dcarry):
        (h_prev,), u, (dh,) = carry_prev, res, dcarry
        s = jax.nn.sigmoid(params.leak)
        da = dh * s * (1 - u * u)  # through s * tanh(a)
        dh_prev = dh * (1 - s) + da @ params.w_hh  # leak path and W_hh path
        dleak = dh * (u - h_prev) * s * (1 - s)  # h = h_prev + s (u - h_prev), per example
        return (dh_prev,), da, da, {"leak": dleak}


def scan_eqns(closed_jaxpr) -> list:
    """Every ``lax.scan`` equation of a jaxpr, nested jaxprs included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                found.append(eqn)
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else [p]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        walk(sub)

    walk(closed_jaxpr.jaxpr)
    return found


def scan_carries(eqn) -> list:
    """A scan equation's carry variables."""
    k, n = eqn.params["num_consts"], eqn.params["num_carry"]
    return eqn.invars[k:k + n]


def weight_accumulating_scans(closed_jaxpr, batch: int) -> list:
    """The reverse scans whose carry holds an array without the batch axis.

    ``jax.grad`` through ``lax.scan`` accumulates the weights' gradients in the
    transposed scan's carry; the handwritten reverse scan carries only per-example
    arrays (``dh_next``) and forms the weight gradients after the loop.
    """
    return [v.aval.shape for eqn in scan_eqns(closed_jaxpr) if eqn.params["reverse"]
            for v in scan_carries(eqn) if batch not in v.aval.shape]
