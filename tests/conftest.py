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
