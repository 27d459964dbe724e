"""The unbiased stochastic estimators, UORO and KF-RTRL, proven unbiased by sampling.

For each case (float64, one tiny network, T steps, B examples, lengths that end one
sequence early), N seeded draws of the estimator's gradient (keys fixed: split from
``key(0)``), run as one ``jax.vmap`` over the keys in one jit, and the exact RTRL
gradient. Per entry: the draws' mean is within ``K * sigma / sqrt(N)`` of the exact
gradient, sigma the entry's standard deviation measured over the same draws. A
deliberately biased variant of each estimator fails the same bound, so the test has
power (UORO: one sign shared by every state entry, E[nu nu^T] != I; KF-RTRL: a first
sign of variance 2). The loss is the exact loss, bit for bit (the
forward is the same), and every draw is finite with a finite, nonzero spread.

Why K = 5: for an unbiased estimator the standardised error of the mean of N = 2000
bounded draws is close to a standard normal (CLT), and P(|Z| > 5) = 5.7e-7; over the
193 entries of all cases here (84 + 45 + 32 + 32) the chance that any one exceeds it is
below 1.1e-4 (a union bound). Measured: the largest |z| of the four cases is 1.9, 2.1,
1.5 and 0.8; the biased variants' are 139 (UORO, two layers) and 23 (KF-RTRL, Elman),
asserted above 2 K.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrnn._src.estimators.kf_rtrl import KFRTRL
from jaxrnn._src.estimators.rtrl import RTRL
from jaxrnn._src.estimators.run import Readout, loss_and_grad
from jaxrnn._src.estimators.uoro import UORO
from jaxrnn._src.model import RNN

K = 5  # the bound in standard errors (see the module docstring)
N = 2000  # draws per case
T, B, D, O = 6, 2, 2, 2


@dataclasses.dataclass(frozen=True)
class SharedSignUORO(UORO):
    """Biased on purpose: one sign per example for every state entry, so E[nu nu^T] != I."""

    def signs(self, key, u):
        c = jax.random.rademacher(key, (u[0][0].shape[0], 1), u[0][0].dtype)
        return jax.tree.map(lambda a: jnp.broadcast_to(c, a.shape), u)


def problem(cell, num_layers, hidden):
    """A tiny float64 network, inputs, targets, lengths: what ``loss_and_grad`` takes."""
    model = RNN(cell=cell, input_size=D, hidden_size=hidden, output_size=O,
                num_layers=num_layers)
    params = model.init(jax.random.key(1), jnp.float64)
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(T, B, D)))
    targets = jnp.asarray(rng.normal(size=(T, B, O)))
    lengths = jnp.array([T, T - 2])  # the second sequence ends two steps early
    layers = tuple(layer[0] for layer in params.layers)
    return (model.cell_fn, "mse", layers, Readout(*params.readout), xs, targets,
            model.initial_carries(None, B, jnp.float64), lengths)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def draws(estimators, cell, loss, layers, readout, xs, targets, carries0, lengths):
    """The exact loss and gradient (RTRL), and N draws of each of ``estimators``."""
    def run(est, key):
        return loss_and_grad(est, cell, layers, readout, loss, xs, targets, carries0, lengths,
                             key)[:2]

    keys = jax.random.split(jax.random.key(0), N)
    return run(RTRL(), None), [jax.vmap(lambda k: run(e, k))(keys) for e in estimators]


def z_scores(exact, samples):
    """Per entry |mean - exact| / (sigma / sqrt(N)), and sigma, over the flattened tree."""
    g = np.concatenate([np.ravel(a) for a in jax.tree.leaves(exact)])
    s = np.concatenate([np.asarray(a).reshape(N, -1) for a in jax.tree.leaves(samples)], axis=1)
    assert np.all(np.isfinite(s)), "a draw is not finite"
    sigma = s.std(axis=0, ddof=1)
    return np.abs(s.mean(axis=0) - g) / (sigma / np.sqrt(N)), sigma


def check_unbiased(estimator, cell, num_layers, hidden, biased=None):
    """Asserts ``estimator`` unbiased (and ``biased``, if given, caught) on one case."""
    (loss, exact), runs = draws((estimator,) + ((biased,) if biased else ()),
                                *problem(cell, num_layers, hidden))
    losses, samples = runs[0]
    np.testing.assert_array_equal(np.asarray(losses), np.full(N, float(loss)))  # same forward
    z, sigma = z_scores(exact, samples)
    assert np.all((sigma > 0) & np.isfinite(sigma)), "an entry's spread is zero or infinite"
    assert z.max() < K, f"{estimator.name}: entry {z.argmax()} is {z.max():.1f} sigma/sqrt(N) off"
    if biased is not None:
        zb, _ = z_scores(exact, runs[1][1])
        assert zb.max() > 2 * K, f"the biased variant passes too (max z {zb.max():.1f}): no power"


def test_uoro_is_unbiased_lstm():
    check_unbiased(UORO(), "lstm", 1, 3)


def test_uoro_is_unbiased_two_layers_and_a_biased_variant_is_caught():
    check_unbiased(UORO(), "elman", 2, 3, biased=SharedSignUORO())


@dataclasses.dataclass(frozen=True)
class LoudKFRTRL(KFRTRL):
    """Biased on purpose: c1 = +-sqrt(2), so E[c1^2] = 2 doubles the carried term J_t P_{t-1}.

    (c1 = c2 would not do: it makes the step's cross terms deterministic, but they are
    still odd in the previous step's sign, so the estimator stays unbiased.)
    """

    def signs(self, key, B, dtype):
        c1, c2 = super().signs(key, B, dtype)
        return jnp.sqrt(2.0).astype(dtype) * c1, c2


def test_kf_rtrl_is_unbiased_elman_and_a_biased_variant_is_caught():
    check_unbiased(KFRTRL(), "elman", 1, 4, biased=LoudKFRTRL())


def test_kf_rtrl_is_unbiased_leaky():
    check_unbiased(KFRTRL(), "leaky", 1, 4)


@pytest.mark.parametrize("cell, num_layers", [("lstm", 1), ("elman", 2)])
def test_kf_rtrl_refuses_other_cells_and_depths(cell, num_layers):
    with pytest.raises(ValueError, match="method='kf_rtrl'"):
        KFRTRL().check(RNN(cell=cell, input_size=D, hidden_size=3, output_size=O).cell_fn,
                       num_layers)
