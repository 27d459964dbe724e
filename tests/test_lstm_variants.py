"""The peephole and layer-normalised LSTM cells (``peephole_lstm``, ``layernorm_lstm``).

* In float64, the handwritten BPTT (``method="bptt"``) equals ``jax.grad`` through
  the forward scan (``method="autodiff"``) to a relative error <= 1e-10 for the
  loss, outputs, final state and every gradient, over a pairwise cover of layers x
  directions x bias x lengths x initial state (plus one memory-lean case).
* Each cell's forward values and gradients match an independent PyTorch autograd
  implementation of the paper's equations, with identical weights.
* ``check_cell`` passes both cells (also away from the unit LN gains of the
  initialisation) and tells a deliberately wrong backward step from the right one.
* ``forget_bias``, ``make_cell`` and a float32 jit training step.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import all_pairs, assert_trees_rel_close, tree_max_rel_error
from jaxrnn import (RNN, LayerNormLSTM, PeepholeLSTM, check_cell, half_sse, make_cell,
                    make_train_step)
from jaxrnn._src.cells import CELLS, split_gates
from jaxrnn._src.model import sequence_mask
from jaxrnn._src.scan import layer
from jaxrnn import Batch

torch = pytest.importorskip("torch")

BPTT_RTOL = 1e-10
TORCH_RTOL = 1e-9
T, B, D, H, O = 5, 3, 3, 4, 2
LENGTHS = {"none": None, "mixed": [5, 1, 3]}
VARIANTS = ["peephole_lstm", "layernorm_lstm"]
CLASSES = {"peephole_lstm": PeepholeLSTM, "layernorm_lstm": LayerNormLSTM}

# A pairwise (all-pairs) cover of cell x layers {1,2,3} x bidirectional x bias x
# lengths x initial state: every pair of values of any two factors occurs in some
# row (test_rows_cover_all_pairs checks it), every variant meeting every value of
# every option: 8 rows instead of the 96 of the product (or the 16 of a per-cell cover).
LEVELS = {"cell": tuple(VARIANTS), "layers": (1, 2, 3), "bidirectional": (False, True),
          "bias": (True, False), "lengths": tuple(LENGTHS), "state": ("given", "zero")}
PAIRWISE = [tuple(case.values()) for case in all_pairs(LEVELS)]
# each row with the full BPTT, and one more per variant with memory-lean BPTT (bptt_segment=2)
GRID = [row + (None,) for row in PAIRWISE] + [
    (c, 1, True, True, "mixed", "given", 2) for c in VARIANTS]
# Compiling dominates this file's time (a 3-layer bidirectional model: ~6 s per
# method on XLA:CPU at the default level, ~4 s at level 0); the tiny shapes run in
# milliseconds either way, so the gradient functions here are compiled at level 0.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.lru_cache(maxsize=None)
def grad_fn(model: RNN, method: str, with_lengths: bool):
    """test_family's grad_fn, compiled with FAST_COMPILE: jit(value_and_grad) of half_sse
    wrt (params, xs, state), with the outputs and the final state as aux."""

    def f(params, xs, state, targets, lengths):
        def loss(params, xs, state):
            ys, final = model.apply(params, xs, state, lengths if with_lengths else None, method)
            mask = sequence_mask(lengths if with_lengths else None, xs.shape[0])
            return half_sse(ys, targets, mask), (ys, final)
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, xs, state)

    return jax.jit(f, compiler_options=FAST_COMPILE)


def test_rows_cover_all_pairs():
    levels = list(LEVELS.values())
    for a, b in itertools.combinations(range(len(levels)), 2):
        need = set(itertools.product(levels[a], levels[b]))
        have = {(row[a], row[b]) for row in PAIRWISE}
        assert need <= have, (a, b, need - have)


def perturb_ln(params, key):
    """The LN gains and ``ln_c_bias`` moved away from their initial 1 and 0 (a cell's
    other fields unchanged), so that a backward step that drops a gain cannot pass."""
    fields = [f for f in params._fields if f.startswith("ln_")]
    keys = dict(zip(fields, jax.random.split(key, max(len(fields), 1))))
    return params._replace(**{
        f: getattr(params, f) + 0.4 * jax.random.normal(keys[f], getattr(params, f).shape,
                                                        getattr(params, f).dtype)
        for f in fields})


def make_inputs(model: RNN, seed: int, zero_state: bool):
    """float64 params (LN gains perturbed), inputs, targets and an (h0, c0) state."""
    k = jax.random.split(jax.random.key(seed), 5)
    params = model.init(k[0], jnp.float64)
    params = params._replace(layers=tuple(
        tuple(perturb_ln(p, jax.random.fold_in(k[4], 2 * l + d)) for d, p in enumerate(dirs))
        for l, dirs in enumerate(params.layers)))
    xs = jax.random.normal(k[1], (T, B, model.input_size), jnp.float64)
    targets = jax.random.normal(k[2], (T, B, model.output_size), jnp.float64)
    zeros = model.zero_state(B, jnp.float64)
    if zero_state:
        return params, xs, targets, zeros
    state = tuple(0.5 * jax.random.normal(kk, z.shape, jnp.float64)
                  for kk, z in zip(jax.random.split(k[3], len(zeros)), zeros))
    return params, xs, targets, state


@pytest.mark.parametrize("cell, layers, bidirectional, bias, lengths, state, segment", GRID,
                         ids=["-".join(map(str, g)) for g in GRID])
def test_bptt_equals_autodiff(cell, layers, bidirectional, bias, lengths, state, segment):
    model = RNN(cell=cell, input_size=D, hidden_size=H, output_size=O, num_layers=layers,
                bidirectional=bidirectional, bias=bias, readout_bias=bias,
                bptt_segment=segment)
    seed = 1000 + GRID.index((cell, layers, bidirectional, bias, lengths, state, segment))
    params, xs, targets, st0 = make_inputs(model, seed, zero_state=(state == "zero"))
    lens = LENGTHS[lengths]
    lens_arr = jnp.zeros((B,), jnp.int32) if lens is None else jnp.array(lens, jnp.int32)
    results = {m: grad_fn(model, m, lens is not None)(params, xs, st0, targets, lens_arr)
               for m in ("bptt", "autodiff")}
    (loss, (ys, final)), grads = results["bptt"]
    # the same forward values (loss, outputs, final state) ...
    assert_trees_rel_close(results["bptt"][0], results["autodiff"][0], 1e-14)
    # ... and gradients wrt params (every field of every cell), inputs and state
    assert_trees_rel_close(grads, results["autodiff"][1], BPTT_RTOL)
    # the comparison is not vacuous: every parameter field gets a nonzero gradient
    for dirs in grads[0].layers:
        for p in dirs:
            for f in p._fields:
                if getattr(p, f) is not None:
                    assert float(jnp.max(jnp.abs(getattr(p, f)))) > 0, f
    assert all(float(jnp.max(jnp.abs(s))) > 0 for s in grads[2])


# --- an independent implementation: PyTorch autograd on the papers' equations ----

def torch_cell_forward(cell, p, xs, h0, c0):
    """One layer, one direction, the equations written directly (no code shared)."""
    sig = torch.sigmoid
    h, c, hs = h0, c0, []
    for x in xs:
        if cell == "peephole_lstm":
            pre = x @ p["w_ih"].T + p["b_ih"] + h @ p["w_hh"].T + p["b_hh"]
            ai, af, ag, ao = pre.chunk(4, dim=-1)
            i = sig(ai + p["w_peep"][0] * c)
            f = sig(af + p["w_peep"][1] * c)
            c = f * c + i * torch.tanh(ag)
            o = sig(ao + p["w_peep"][2] * c)
            h = o * torch.tanh(c)
        else:
            ln = torch.nn.functional.layer_norm
            pre = (ln(h @ p["w_hh"].T, (4 * H,), p["ln_hh_gain"], None, 1e-5)
                   + ln(x @ p["w_ih"].T, (4 * H,), p["ln_ih_gain"], None, 1e-5) + p["bias"])
            ai, af, ag, ao = pre.chunk(4, dim=-1)
            c = sig(af) * c + sig(ai) * torch.tanh(ag)
            h = sig(ao) * torch.tanh(ln(c, (H,), p["ln_c_gain"], p["ln_c_bias"], 1e-5))
        hs.append(h)
    return torch.stack(hs), h, c


@pytest.mark.parametrize("cell", VARIANTS)
def test_matches_torch_reference(cell):
    k = jax.random.split(jax.random.key(7), 6)
    c = CLASSES[cell]()
    params = perturb_ln(c.init(k[0], D, H, True, jnp.float64), k[1])
    xs = jax.random.normal(k[2], (T, B, D), jnp.float64)
    carry0 = tuple(0.5 * jax.random.normal(kk, (B, H), jnp.float64)
                   for kk in jax.random.split(k[3], 2))
    dhs = jax.random.normal(k[4], (T, B, H), jnp.float64)
    dc_T = jax.random.normal(k[5], (B, H), jnp.float64)

    def loss(p, x, c0):  # a linear functional of the outputs and the final cell state
        hs, (_, c_T) = layer(c, p, x, c0, None, "bptt")
        return jnp.sum(hs * dhs) + jnp.sum(c_T * dc_T), (hs, c_T)

    (value, (hs, c_T)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2),
                                                           has_aux=True),
                                        compiler_options=FAST_COMPILE)(params, xs, carry0)
    tt = lambda a: torch.from_numpy(np.array(a)).requires_grad_(True)  # noqa: E731
    tp = {f: tt(v) for f, v in params._asdict().items() if v is not None}
    tx, th0, tc0 = tt(xs), tt(carry0[0]), tt(carry0[1])
    t_hs, _, t_cT = torch_cell_forward(cell, tp, tx, th0, tc0)
    t_loss = (t_hs * torch.from_numpy(np.array(dhs))).sum() + (
        t_cT * torch.from_numpy(np.array(dc_T))).sum()
    t_loss.backward()
    assert float(value) == pytest.approx(t_loss.item(), rel=TORCH_RTOL)
    assert tree_max_rel_error(np.asarray(hs), t_hs.detach().numpy()) <= TORCH_RTOL
    assert tree_max_rel_error(np.asarray(c_T), t_cT.detach().numpy()) <= TORCH_RTOL
    for f, v in tp.items():
        assert tree_max_rel_error(np.asarray(getattr(grads[0], f)), v.grad.numpy()) \
            <= TORCH_RTOL, f
    for a, b in ((grads[1], tx), (grads[2][0], th0), (grads[2][1], tc0)):
        assert tree_max_rel_error(np.asarray(a), b.grad.numpy()) <= TORCH_RTOL


# --- check_cell: right and wrong backward steps --------------------------------

@dataclasses.dataclass(frozen=True)
class GainedLayerNormLSTM(LayerNormLSTM):
    """The layer-norm cell initialised away from unit gains and zero ``ln_c_bias``."""

    def init(self, key, input_size, hidden_size, bias=True, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        return perturb_ln(super().init(k1, input_size, hidden_size, bias, dtype), k2)


@dataclasses.dataclass(frozen=True)
class NoPeepholeDcPrev(PeepholeLSTM):
    """Wrong on purpose: dc_prev lacks the i and f peepholes' terms."""

    def backward_step(self, params, carry_prev, carry, res, dcarry):
        (dh_prev, dc_prev), dgi, dgh, extra = super().backward_step(
            params, carry_prev, carry, res, dcarry)
        dai, daf, _, _ = split_gates(dgi, 4)
        return (dh_prev, dc_prev - dai * params.w_peep[0] - daf * params.w_peep[1]), dgi, dgh, \
            extra


@dataclasses.dataclass(frozen=True)
class NoVarianceTermLN(GainedLayerNormLSTM):
    """Wrong on purpose: the backward through LN(c_t) drops the path through sigma."""

    def backward_step(self, params, carry_prev, carry, res, dcarry):
        (dh_prev, dc_prev), dgi, dgh, extra = super().backward_step(
            params, carry_prev, carry, res, dcarry)
        _, f, _, _ = split_gates(res[0], 4)
        cn, rc = res[3], res[6]
        dn = extra["ln_c_bias"]  # dL/dn, the cotangent of LN(c_t)
        dcn = dn * params.ln_c_gain
        missing = -cn * (dcn * cn).mean(axis=-1, keepdims=True) * rc  # the sigma path of dc
        return (dh_prev, dc_prev - missing * f), dgi, dgh, extra


# check_cell passing on both cells (at perturbed parameters, so the gains are not 1):
# tests/test_open_cells.py::test_check_cell_passes_every_built_in_cell.


@pytest.mark.parametrize("cell", [NoPeepholeDcPrev(), NoVarianceTermLN()],
                         ids=["peephole-no-dc-prev-peep", "layernorm-no-sigma-path"])
def test_check_cell_catches_wrong_backward(cell):
    report = check_cell(cell)
    assert not report.ok and report.max_rel_error > 1e-3, str(report)
    wrong = {r.output for r in report.rows if r.rel_error > 1e-3}
    assert "dcarry_prev[1]" in wrong  # the one-step check points at dc_prev


# --- forget_bias, make_cell ------------------------------------------------------

def _forget_bias_field(params):
    return "b_ih" if params.b_ih is not None else "bias"


@pytest.mark.parametrize("cell", VARIANTS)
def test_forget_bias_adds_one_to_the_forget_block(cell):
    made = make_cell(cell, forget_bias=1.0)
    assert type(made) is CLASSES[cell] and made.forget_bias == 1.0 and CELLS[cell] is type(made)
    key = jax.random.key(3)
    m0 = RNN(cell=cell, input_size=D, hidden_size=H, output_size=O, num_layers=2)
    m1 = RNN(cell=cell, input_size=D, hidden_size=H, output_size=O, num_layers=2,
             forget_bias=1.0)
    assert m1.cell_fn == made
    p0, p1 = m0.init(key), m1.init(key)
    for d0, d1 in zip(jax.tree.leaves(p0.layers, is_leaf=lambda x: hasattr(x, "_fields")),
                      jax.tree.leaves(p1.layers, is_leaf=lambda x: hasattr(x, "_fields"))):
        fb = _forget_bias_field(d0)
        for f in d0._fields:
            a, b = getattr(d0, f), getattr(d1, f)
            if f != fb:
                assert (a is None and b is None) or np.array_equal(a, b), f
                continue
            a, b = np.asarray(a), np.asarray(b)
            assert np.array_equal(b[H:2 * H], a[H:2 * H] + np.float32(1.0))  # the forget block
            np.testing.assert_allclose(b[H:2 * H] - a[H:2 * H], 1.0, rtol=1e-6)
            assert np.array_equal(np.delete(b, np.s_[H:2 * H]), np.delete(a, np.s_[H:2 * H]))
    assert np.array_equal(p0.readout.weight, p1.readout.weight)


@pytest.mark.parametrize("cell", VARIANTS)
def test_forget_bias_without_bias_is_an_error(cell):
    with pytest.raises(ValueError, match="forget_bias=1.0 needs bias=True"):
        RNN(cell=cell, input_size=D, hidden_size=H, output_size=O, bias=False, forget_bias=1.0)
    with pytest.raises(ValueError, match="forget_bias=1.0 needs bias=True"):
        CLASSES[cell](forget_bias=1.0).init(jax.random.key(0), D, H, bias=False)
    # without bias and forget_bias the cell has no bias fields at all
    p = CLASSES[cell]().init(jax.random.key(0), D, H, bias=False)
    assert p.b_ih is None and p.b_hh is None and getattr(p, "bias", None) is None


def test_layernorm_init_and_shapes():
    p = LayerNormLSTM().init(jax.random.key(0), D, H)
    assert p.b_ih is None and p.b_hh is None  # the bias is added after normalisation
    assert p.bias.shape == (4 * H,) and p.w_ih.shape == (4 * H, D) and p.w_hh.shape == (4 * H, H)
    assert np.array_equal(p.ln_ih_gain, np.ones(4 * H)) and np.array_equal(p.ln_hh_gain,
                                                                           np.ones(4 * H))
    assert np.array_equal(p.ln_c_gain, np.ones(H)) and np.array_equal(p.ln_c_bias, np.zeros(H))
    bound = 1 / np.sqrt(H)
    assert all(float(jnp.max(jnp.abs(a))) <= bound for a in (p.w_ih, p.w_hh, p.bias))
    q = PeepholeLSTM().init(jax.random.key(0), D, H)
    assert q.w_peep.shape == (3, H) and float(jnp.max(jnp.abs(q.w_peep))) <= bound
    assert float(jnp.min(jnp.abs(q.w_peep))) > 0


# --- float32 jit training -------------------------------------------------------

@pytest.mark.parametrize("cell", VARIANTS)
def test_float32_train_step_decreases_loss(cell):
    model = RNN(cell=cell, input_size=2, hidden_size=8, output_size=1, forget_bias=1.0)
    k = jax.random.split(jax.random.key(11), 2)
    xs = jax.random.normal(k[0], (12, 8, 2), jnp.float32)
    batch = Batch(xs, 0.5 * jnp.cumsum(xs[..., :1], axis=0) / jnp.sqrt(12.0),
                  jnp.array([12, 3, 7, 12, 9, 1, 12, 5], jnp.int32))  # a running sum
    losses = {}
    for method in ("bptt", "autodiff"):
        opt = optax.adam(3e-2)
        step = make_train_step(model, opt, method=method, donate=False)
        params = model.init(k[1], jnp.float32)
        opt_state = opt.init(params)
        out = []
        for _ in range(6):
            params, opt_state, metrics = step(params, opt_state, batch)
            out.append(float(metrics["loss"]))
        losses[method] = np.array(out)
        assert all(np.isfinite(out)) and out[-1] < 0.9 * out[0], out
    np.testing.assert_allclose(losses["bptt"], losses["autodiff"], rtol=1e-5)
