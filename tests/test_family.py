"""The whole model family: every cell x layers x directions x bias x lengths x initial state.

For each combination, in float64:
* the handwritten BPTT (``method="bptt"``) equals ``jax.grad`` through the forward
  scan (``method="autodiff"``) to a relative error <= 1e-10, for the parameters,
  the inputs and the initial state;
* PyTorch's ``nn.RNN``/``nn.LSTM``/``nn.GRU`` + ``nn.Linear`` with identical weights
  (loaded through ``to_torch``) give the same outputs, final states and gradients
  of the same loss to a relative error <= 1e-9, with ``lengths`` going through
  ``pack_padded_sequence``.

Compiled gradient functions are cached per static configuration, so the values
of the initial state and of the lengths vary without recompiling.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import all_pairs, assert_trees_rel_close, tree_max_rel_error
from jaxrnn import RNN, half_sse
from jaxrnn._src.model import sequence_mask

torch = pytest.importorskip("torch")

BPTT_RTOL = 1e-10
TORCH_RTOL = 1e-9
T, B, D, H, O = 5, 3, 3, 4, 2
LENGTHS = {"none": None, "mixed": [5, 1, 3], "equal": [4, 4, 4]}
CELLS = ["elman", "lstm", "gru"]


@functools.lru_cache(maxsize=None)
def grad_fn(model: RNN, method: str, with_lengths: bool):
    """jit(value_and_grad) of half_sse wrt (params, xs, state), with the outputs as aux."""

    def f(params, xs, state, targets, lengths):
        def loss(params, xs, state):
            ys, final = model.apply(params, xs, state, lengths if with_lengths else None, method)
            mask = sequence_mask(lengths if with_lengths else None, xs.shape[0])
            return half_sse(ys, targets, mask), (ys, final)
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, xs, state)

    return jax.jit(f)


def make_inputs(model: RNN, seed: int, zero_state: bool, T=T, B=B):
    k = jax.random.split(jax.random.key(seed), 5)
    params = model.init(k[0], jnp.float64)
    xs = jax.random.normal(k[1], (T, B, model.input_size), jnp.float64)
    targets = jax.random.normal(k[2], (T, B, model.output_size), jnp.float64)
    shape = (model.num_layers * model.num_directions, B, model.hidden_size)
    if zero_state:
        h0 = jnp.zeros(shape, jnp.float64)
        c0 = jnp.zeros(shape, jnp.float64)
    else:
        h0 = 0.5 * jax.random.normal(k[3], shape, jnp.float64)
        c0 = 0.5 * jax.random.normal(k[4], shape, jnp.float64)
    state = (h0, c0) if model.cell == "lstm" else h0
    return params, xs, targets, state


# --- PyTorch --------------------------------------------------------------------

def torch_modules(model: RNN, params):
    kw = dict(input_size=model.input_size, hidden_size=model.hidden_size,
              num_layers=model.num_layers, bias=model.bias, bidirectional=model.bidirectional,
              dtype=torch.float64)
    if model.cell == "elman":
        rnn = torch.nn.RNN(nonlinearity=model.nonlinearity, **kw)
    elif model.cell == "lstm":
        rnn = torch.nn.LSTM(**kw)
    else:
        rnn = torch.nn.GRU(**kw)
    readout = torch.nn.Linear(model.hidden_size * model.num_directions, model.output_size,
                              bias=model.readout_bias, dtype=torch.float64)
    rnn_sd, ro_sd = model.to_torch(params)
    rnn.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in rnn_sd.items()})
    readout.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ro_sd.items()})
    return rnn, readout


def torch_reference(model: RNN, params, xs, targets, state, lengths):
    """Outputs, final state and gradients from PyTorch autograd on the same loss."""
    rnn, readout = torch_modules(model, params)
    x = torch.from_numpy(np.array(xs)).requires_grad_(True)
    parts = state if model.cell == "lstm" else (state,)
    s = tuple(torch.from_numpy(np.array(p)).requires_grad_(True) for p in parts)
    hx = s if model.cell == "lstm" else s[0]
    steps = xs.shape[0]
    if lengths is None:
        out, final = rnn(x, hx)
        mask = torch.ones(steps, xs.shape[1], dtype=torch.bool)
    else:
        lens = torch.tensor(lengths)
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lens, enforce_sorted=False)
        out, final = rnn(packed, hx)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=steps)
        mask = torch.arange(steps)[:, None] < lens[None, :]
    ys = readout(out) * mask[:, :, None]
    loss = 0.5 * (((ys - torch.from_numpy(np.array(targets))) ** 2) * mask[:, :, None]).sum()
    loss.backward()
    final = tuple(f.detach().numpy() for f in final) if model.cell == "lstm" \
        else final.detach().numpy()
    grads_rnn = {k: p.grad.numpy() for k, p in rnn.named_parameters()}
    grads_ro = {k: p.grad.numpy() for k, p in readout.named_parameters()}
    dstate = tuple(p.grad.numpy() for p in s)
    return (loss.item(), ys.detach().numpy(), final, grads_rnn, grads_ro, x.grad.numpy(),
            dstate if model.cell == "lstm" else dstate[0])


def check_against_torch(model, params, xs, targets, state, lengths, jax_result):
    (loss, (ys, final)), (gp, gx, gs) = jax_result
    t_loss, t_ys, t_final, t_grnn, t_gro, t_gx, t_gs = torch_reference(
        model, params, xs, targets, state, lengths)
    assert float(loss) == pytest.approx(t_loss, rel=TORCH_RTOL)
    assert tree_max_rel_error(np.asarray(ys), t_ys) <= TORCH_RTOL
    assert tree_max_rel_error(jax.tree.map(np.asarray, final), t_final) <= TORCH_RTOL
    g_rnn, g_ro = model.to_torch(gp)
    assert set(g_rnn) == set(t_grnn) and set(g_ro) == set(t_gro)
    for k in t_grnn:
        assert tree_max_rel_error(g_rnn[k], t_grnn[k]) <= TORCH_RTOL, k
    for k in t_gro:
        assert tree_max_rel_error(g_ro[k], t_gro[k]) <= TORCH_RTOL, k
    assert tree_max_rel_error(np.asarray(gx), t_gx) <= TORCH_RTOL
    assert tree_max_rel_error(jax.tree.map(np.asarray, gs), t_gs) <= TORCH_RTOL


# --- the grid --------------------------------------------------------------------

# Every pair of option values (cell, layers, directions, bias, lengths, state) appears
# in some case: 12 cases instead of the 216 of the full product (or the 29 of a
# per-cell cover), the first with every option at its heaviest (3 layers,
# bidirectional, ...); every cell meets every value of every other option.
OPTIONS = {"cell": list(CELLS), "layers": [1, 2, 3], "bidirectional": [False, True],
           "bias": [False, True], "lengths": ["none", "equal", "mixed"],
           "state": ["zero", "given"]}
GRID = [tuple(case.values()) for case in all_pairs(OPTIONS)]


def test_grid_covers_every_pair_of_option_values():
    for (a, va), (b, vb) in itertools.combinations(OPTIONS.items(), 2):
        i, j = list(OPTIONS).index(a), list(OPTIONS).index(b)
        need = set(itertools.product(va, vb))
        assert need <= {(g[i], g[j]) for g in GRID}, (a, b)


@pytest.mark.parametrize("cell, layers, bidirectional, bias, lengths, state", GRID,
                         ids=["-".join(map(str, g)) for g in GRID])
def test_bptt_equals_autodiff_and_torch(cell, layers, bidirectional, bias, lengths, state):
    model = RNN(cell=cell, input_size=D, hidden_size=H, output_size=O, num_layers=layers,
                bidirectional=bidirectional, bias=bias, readout_bias=bias)
    seed = GRID.index((cell, layers, bidirectional, bias, lengths, state))
    params, xs, targets, st0 = make_inputs(model, seed, zero_state=(state == "zero"))
    lens = LENGTHS[lengths]
    lens_arr = jnp.zeros((B,), jnp.int32) if lens is None else jnp.array(lens, jnp.int32)
    results = {m: grad_fn(model, m, lens is not None)(params, xs, st0, targets, lens_arr)
               for m in ("bptt", "autodiff")}
    # bptt vs autodiff: same loss, outputs, state; gradients to rounding
    assert_trees_rel_close(results["bptt"][0], results["autodiff"][0], 1e-14)
    assert_trees_rel_close(results["bptt"][1], results["autodiff"][1], BPTT_RTOL)
    # and both against PyTorch
    check_against_torch(model, params, xs, targets, st0, lens, results["bptt"])


@pytest.mark.parametrize("cell", CELLS)
def test_default_state_is_zeros(cell):
    model = RNN(cell=cell, input_size=D, hidden_size=H, output_size=O, num_layers=2,
                bidirectional=True)
    params, xs, _, zeros = make_inputs(model, 0, zero_state=True)
    ys1, s1 = model.apply(params, xs)
    ys2, s2 = model.apply(params, xs, zeros)
    assert_trees_rel_close((ys1, s1), (ys2, s2), 0.0)


@pytest.mark.parametrize("cell", CELLS)
def test_elman_relu_and_lstm_gru_outputs_shapes(cell):
    model = RNN(cell=cell, input_size=D, hidden_size=H, output_size=O, num_layers=3,
                bidirectional=True)
    params = model.init(jax.random.key(0))
    assert len(params.layers) == 3 and all(len(d) == 2 for d in params.layers)
    g = {"elman": 1, "lstm": 4, "gru": 3}[cell]
    assert params.layers[0][0].w_ih.shape == (g * H, D)
    assert params.layers[1][1].w_ih.shape == (g * H, 2 * H)
    assert params.readout.weight.shape == (O, 2 * H)
    ys, state = model.apply(params, jnp.ones((7, 2, D), jnp.float32))
    assert ys.shape == (7, 2, O)
    parts = state if cell == "lstm" else (state,)
    assert all(p.shape == (6, 2, H) for p in parts)


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(cell=st.sampled_from(CELLS), T=st.integers(1, 40), B=st.integers(1, 3),
       D=st.integers(1, 4), H=st.integers(1, 6), O=st.integers(1, 3),
       layers=st.integers(1, 3), bidirectional=st.booleans(), bias=st.booleans(),
       with_lengths=st.booleans(), relu=st.booleans(), seed=st.integers(0, 2**16))
def test_property_over_shapes(cell, T, B, D, H, O, layers, bidirectional, bias,
                              with_lengths, relu, seed):
    """bptt == autodiff == torch over random shapes of every cell."""
    model = RNN(cell=cell, input_size=D, hidden_size=H, output_size=O, num_layers=layers,
                bidirectional=bidirectional, bias=bias, readout_bias=not bias,
                nonlinearity="relu" if (relu and cell == "elman") else "tanh")
    params, xs, targets, st0 = make_inputs(model, seed, zero_state=False, T=T, B=B)
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, T + 1, size=B).tolist() if with_lengths else None
    lens_arr = jnp.zeros((B,), jnp.int32) if lens is None else jnp.array(lens, jnp.int32)
    results = {m: grad_fn(model, m, lens is not None)(params, xs, st0, targets, lens_arr)
               for m in ("bptt", "autodiff")}
    assert_trees_rel_close(results["bptt"][1], results["autodiff"][1], BPTT_RTOL)
    check_against_torch(model, params, xs, targets, st0, lens, results["bptt"])


def test_dropout_between_layers():
    model = RNN(cell="lstm", input_size=D, hidden_size=H, output_size=O, num_layers=3,
                dropout=0.5)
    params, xs, targets, st0 = make_inputs(model, 3, zero_state=False)
    key = jax.random.key(42)
    # compiled once each (op by op, a 3-layer model's ops took most of this test's time)
    ys_eval = jax.jit(lambda p: model.apply(p, xs, st0)[0])(params)
    apply_with_key = jax.jit(lambda p, k: model.apply(p, xs, st0, dropout_key=k)[0])
    ys_a = apply_with_key(params, key)
    ys_b = apply_with_key(params, key)
    ys_c = apply_with_key(params, jax.random.key(43))
    assert np.array_equal(ys_a, ys_b)  # the key decides
    assert not np.allclose(ys_a, ys_eval) and not np.allclose(ys_a, ys_c)
    off = RNN(cell="lstm", input_size=D, hidden_size=H, output_size=O, num_layers=3)
    assert np.array_equal(jax.jit(lambda p: off.apply(p, xs, st0, dropout_key=key)[0])(params),
                          ys_eval)
    gb = jax.jit(jax.grad(lambda p: model.loss(p, xs, targets, state=st0,
                                               dropout_key=key)))(params)
    ga = jax.jit(jax.grad(lambda p: model.loss(p, xs, targets, state=st0, dropout_key=key,
                                               method="autodiff")))(params)
    assert_trees_rel_close(gb, ga, BPTT_RTOL)
    with pytest.raises(ValueError, match="dropout must be a probability"):
        RNN(cell="gru", input_size=1, hidden_size=1, output_size=1, dropout=1.0)


@pytest.mark.parametrize("cell", CELLS)
def test_torch_state_dict_roundtrip_and_import(cell):
    """A PyTorch model's own state_dict (tensors) imports, and exports back exactly."""
    torch.manual_seed(0)
    cls = {"elman": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
    rnn = cls(input_size=D, hidden_size=H, num_layers=2, bidirectional=True,
              dtype=torch.float64)
    readout = torch.nn.Linear(2 * H, O, dtype=torch.float64)
    model = RNN(cell=cell, input_size=D, hidden_size=H, output_size=O, num_layers=2,
                bidirectional=True)
    params = model.from_torch(rnn.state_dict(), readout.state_dict())
    rnn_sd, ro_sd = model.to_torch(params)
    assert list(rnn_sd) == list(rnn.state_dict())
    for k, v in rnn.state_dict().items():
        assert np.array_equal(rnn_sd[k], v.numpy()) and rnn_sd[k].dtype == np.float64
    for k, v in readout.state_dict().items():
        assert np.array_equal(ro_sd[k], v.numpy())
    again = model.from_torch(rnn_sd, ro_sd)
    assert jax.tree.structure(again) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again),
                                                      jax.tree.leaves(params)))
    # and the imported model computes what PyTorch computes
    x = torch.randn(6, 2, D, dtype=torch.float64)
    with torch.no_grad():
        out, _ = rnn(x)
        ref = readout(out).numpy()
    ys, _ = model.apply(params, jnp.asarray(x.numpy()))
    assert tree_max_rel_error(np.asarray(ys), ref) <= TORCH_RTOL
