"""Shared test set-up: float64 enabled, a key fixture, strict tree comparisons."""

import jax
import numpy as np
import pytest

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
