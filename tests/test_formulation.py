"""The per-backend formulation: chosen in one place, and both forms give jax.grad's gradients.

No accelerator runs the tests, so the plain formulation (what GPU and TPU get) is
forced on the CPU and checked there: bptt against autodiff in float64, as in
tests/test_scan.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_rel_close
import jaxrnn._src.scan as scan_mod
from jaxrnn._src import formulation as form_mod
from jaxrnn._src.model import RNN, loss_fn

RTOL = 1e-10


@pytest.fixture
def plain(monkeypatch):
    """The scans trace with the plain formulation (the non-CPU backends'), on the CPU."""
    monkeypatch.setattr(scan_mod, "formulation", lambda backend: form_mod.PLAIN)


def test_cpu_gets_the_measured_rewrites_and_other_backends_the_plain_form():
    assert form_mod.formulation("cpu") == form_mod.Formulation(True, True)
    for backend in ("gpu", "cuda", "rocm", "tpu", "METAL"):
        assert form_mod.formulation(backend) == form_mod.Formulation(False, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        form_mod.CPU.transposed_w_hh = False
    assert hash(form_mod.CPU) != hash(form_mod.PLAIN)


def _lowered(cell):
    model = RNN(cell=cell, input_size=3, hidden_size=4, output_size=2)
    params = model.init(jax.random.key(0))
    xs, ys = jnp.ones((5, 2, 3), jnp.float32), jnp.ones((5, 2, 2), jnp.float32)  # as params
    f = jax.jit(jax.grad(lambda p: loss_fn(model, "mse", "bptt", p, xs, ys, None, None)))
    return f.lower(params).as_text()


def test_the_scans_read_the_backends_formulation(monkeypatch):
    """On this CPU the barriers of both rewrites are traced; with the plain form, none."""
    assert jax.default_backend() == "cpu"
    assert scan_mod._formulation() == form_mod.CPU
    # the w_hh copy (1), and two per weight-gradient product (w_ih, w_hh): 5 barriers
    assert _lowered("lstm").count("optimization_barrier") == 5
    monkeypatch.setattr(scan_mod, "formulation", lambda backend: form_mod.PLAIN)
    assert "optimization_barrier" not in _lowered("lstm")
    seen = []
    monkeypatch.setattr(scan_mod, "formulation", lambda backend: seen.append(backend)
                        or form_mod.CPU)
    _lowered("elman")
    assert set(seen) == {jax.default_backend()}


@pytest.mark.parametrize("cell, with_lengths", [
    ("lstm", True), ("gru", False), ("elman", True), ("peephole_lstm", False),
])
def test_plain_formulation_bptt_equals_autodiff(plain, cell, with_lengths):
    T, B, D, H, O = 11, 3, 4, 5, 2
    model = RNN(cell=cell, input_size=D, hidden_size=H, output_size=O, proj_size=3
                if cell == "lstm" else 0)
    k = jax.random.split(jax.random.key(3), 4)
    params = model.init(k[0], jnp.float64)
    xs = jax.random.normal(k[1], (T, B, D), jnp.float64)
    ys = jax.random.normal(k[2], (T, B, O), jnp.float64)
    lengths = jnp.array([T, 6, 1]) if with_lengths else None

    def grads(method):
        f = lambda p, x: loss_fn(model, "mse", method, p, x, ys, None, lengths)  # noqa: E731
        return jax.jit(jax.grad(f, argnums=(0, 1)))(params, xs)

    assert_trees_rel_close(grads("bptt"), grads("autodiff"), RTOL)
    assert "optimization_barrier" not in jax.jit(jax.grad(
        lambda p: loss_fn(model, "mse", "bptt", p, xs, ys, None, lengths))).lower(params).as_text()


def test_sum_outer_forms_agree(monkeypatch):
    k = jax.random.split(jax.random.key(1), 2)
    dg = jax.random.normal(k[0], (7, 3, 8), jnp.float64)
    a = jax.random.normal(k[1], (7, 3, 5), jnp.float64)
    expected = np.einsum("tbg,tbk->gk", np.asarray(dg), np.asarray(a))
    cpu = scan_mod.sum_outer(dg, a)
    monkeypatch.setattr(scan_mod, "formulation", lambda backend: form_mod.PLAIN)
    plain = scan_mod.sum_outer(dg, a)
    assert cpu.shape == plain.shape == (8, 5)
    np.testing.assert_allclose(cpu, expected, rtol=1e-12)
    np.testing.assert_allclose(plain, expected, rtol=1e-12)
