"""The dtype contract of ``method="bptt"``: every cotangent has its primal's dtype.

Under both ways of wiring the handwritten BPTT into JAX (``JAXRNN_BPTT_RULE``,
read at trace time, so every case traces afresh), ``jax.vjp`` through
``jaxrnn.layer`` gives the cotangents of ``params``, ``xs`` and the initial carry
in the dtypes and (to the dtype's rounding) the values ``method="autodiff"`` gives,
for every dtype combination ``layer`` accepts; the others get one line naming the
argument and both dtypes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tree_max_rel_error

import jaxrnn

RULES = ("hijax", "custom_vjp")
f16, bf16, f32, f64 = jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64
# (params, xs): pure dtypes, and inputs narrower than the parameters (promoted)
ACCEPTED = [(f32, f32), (f64, f64), (bf16, bf16), (f16, f16),
            (f32, bf16), (f32, f16), (f64, f32), (f64, bf16)]
# max relative error of bptt's gradients against autodiff's, by compute dtype
RTOL = {f64: 1e-12, f32: 1e-5, bf16: 6e-2, f16: 1e-2}


def _case(cell, pdt, xdt, T, B, D, H, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    params = jax.tree.map(lambda a: a.astype(pdt), cell.init(k[0], D, H, dtype=f64))
    xs = jax.random.normal(k[1], (T, B, D), f64).astype(xdt)
    carry0 = tuple(0.5 * jax.random.normal(kk, (B, H), f64).astype(pdt)
                   for kk in k[2:2 + len(cell.zero_carry(B, H))])
    return params, xs, carry0


def _vjp(cell, method, params, xs, carry0, mask=None, segment=None):
    """``(outputs, cotangents of (params, xs, carry0))`` for fixed output cotangents."""
    f = lambda p, x, c: jaxrnn.layer(cell, p, x, c, mask, method, segment)  # noqa: E731

    @jax.jit  # one compile per case, traced under the rule set now
    def run(params, xs, carry0):
        out, pullback = jax.vjp(f, params, xs, carry0)
        ks = jax.random.split(jax.random.key(7), 1 + len(out[1]))
        ct = (jax.random.normal(ks[0], out[0].shape, f64).astype(out[0].dtype),
              tuple(jax.random.normal(kk, c.shape, f64).astype(c.dtype)
                    for kk, c in zip(ks[1:], out[1])))
        return out, pullback(ct)

    return run(params, xs, carry0)


def _dtypes(tree):
    return jax.tree.map(lambda a: jnp.dtype(a.dtype), tree)


# Each accepted mix once, the two rules alternating over them (both rules give the
# same gradients bit for bit: tests/test_forward_mode.py).
MIXES = [(rule, pdt, xdt) for k, (pdt, xdt) in enumerate(ACCEPTED)
         for rule in [RULES[k % len(RULES)]]]


def test_every_mix_and_rule_is_covered():
    assert {m[1:] for m in MIXES} == set(ACCEPTED) and {m[0] for m in MIXES} == set(RULES)


@pytest.mark.parametrize("rule,pdt,xdt", MIXES, ids=lambda d: str(d) if isinstance(d, str)
                         else jnp.dtype(d).name)
def test_cotangent_dtypes_and_values_match_autodiff(monkeypatch, rule, pdt, xdt):
    monkeypatch.setenv("JAXRNN_BPTT_RULE", rule)
    cell = jaxrnn.LSTM()
    params, xs, carry0 = _case(cell, pdt, xdt, T=6, B=3, D=4, H=5)
    mask = jnp.arange(6)[:, None] < jnp.array([6, 4, 1])[None]
    (out_a, g_a) = _vjp(cell, "autodiff", params, xs, carry0, mask)
    # the full BPTT, and (one mix) the memory-lean one
    for segment in ((None, 4) if (pdt, xdt) == (f32, bf16) else (None,)):
        out_b, g_b = _vjp(cell, "bptt", params, xs, carry0, mask, segment)
        # every cotangent has its primal's dtype and shape, as autodiff's do
        assert _dtypes(g_b) == _dtypes((params, xs, carry0)) == _dtypes(g_a)
        assert jax.tree.map(jnp.shape, g_b) == jax.tree.map(jnp.shape, (params, xs, carry0))
        assert _dtypes(out_b) == _dtypes(out_a)
        assert tree_max_rel_error(g_b, g_a) <= RTOL[pdt]


@pytest.mark.parametrize("rule", RULES)
def test_bfloat16_input_gradient_is_bfloat16_under_jit(monkeypatch, rule):
    """The issue's case: float32 parameters, bfloat16 inputs, ``jax.grad`` under jit."""
    monkeypatch.setenv("JAXRNN_BPTT_RULE", rule)
    cell = jaxrnn.GRU()
    params, xs, carry0 = _case(cell, f32, bf16, T=5, B=2, D=3, H=4)

    def loss(method):
        def f(p, x, c):
            hs, _ = jaxrnn.layer(cell, p, x, c, None, method)
            return jnp.sum(hs ** 2)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    g_b, g_a = loss("bptt")(params, xs, carry0), loss("autodiff")(params, xs, carry0)
    assert g_b[1].dtype == bf16
    assert _dtypes(g_b) == _dtypes(g_a) == _dtypes((params, xs, carry0))
    assert tree_max_rel_error(g_b, g_a) <= 1e-2  # dxs rounded to bf16 in both


def test_pure_bfloat16_rounding_no_worse_than_autodiff():
    """LSTM T=50 B=16 H=64 in bfloat16: error against a float64 reference, per method
    (the default rule; the other gives the same numbers)."""
    rule = "default"
    cell = jaxrnn.LSTM()
    params, xs, carry0 = _case(cell, f64, f64, T=50, B=16, D=8, H=64, seed=3)
    w = jax.random.normal(jax.random.key(11), (50, 16, 64), f64)

    def grads(method, dtype):
        def f(p, x, c):
            hs, _ = jaxrnn.layer(cell, p, x, c, None, method)
            return jnp.sum(hs.astype(f32) * w.astype(f32))
        cast = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)  # noqa: E731
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(cast(params), cast(xs), cast(carry0))

    ref = grads("autodiff", f64)
    err = {m: tree_max_rel_error(jax.tree.map(lambda a: np.asarray(a, np.float64),
                                              grads(m, bf16)), ref)
           for m in ("bptt", "autodiff")}
    print(f"bf16 LSTM T=50 B=16 H=64 ({rule}): max relative error vs float64: "
          f"bptt {err['bptt']:.2e}, autodiff {err['autodiff']:.2e}")
    assert err["bptt"] <= 1.5 * err["autodiff"] + 1e-6
    assert err["bptt"] <= 2.0 ** -5  # bf16 has an 8-bit significand: a few roundings


@pytest.mark.parametrize("method", ["bptt", "autodiff"])
def test_mismatched_dtypes_one_line_naming_argument(method):
    cell = jaxrnn.LSTM()
    params, xs, carry0 = _case(cell, f32, f32, T=3, B=2, D=4, H=5)
    bf16_carry = (carry0[0], carry0[1].astype(bf16))
    with pytest.raises(TypeError, match=r"^carry0\[1\] has dtype bfloat16 but the layer keeps "
                                        r"its carry in the parameters' dtype float32"):
        jaxrnn.layer(cell, params, xs, bf16_carry, None, method)
    with pytest.raises(TypeError, match=r"^xs has dtype float64 but the parameters have dtype "
                                        r"float32, and xs must not be wider"):
        jaxrnn.layer(cell, params, xs.astype(f64), carry0, None, method)
    with pytest.raises(TypeError, match=r"^xs must be a floating array, got dtype int32"):
        jaxrnn.layer(cell, params, xs.astype(jnp.int32), carry0, None, method)
    with pytest.raises(TypeError) as e:  # the rule runs before any tracing: one line
        jaxrnn.layer(cell, params, xs, tuple(c.astype(f64) for c in carry0), None, method)
    assert "\n" not in str(e.value) and "float64" in str(e.value) and "float32" in str(e.value)
