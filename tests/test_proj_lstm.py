"""The projected LSTM, ``RNN(cell="lstm", proj_size=P)``, against ``nn.LSTM(proj_size=P)``.

In float64, for a pairwise selection of layers x directions x bias x lengths x
initial state (every pair of two factors' values occurs in some case):

* the handwritten BPTT (``method="bptt"``) equals ``jax.grad`` through the forward
  scan (``method="autodiff"``) to a relative error <= 1e-10;
* PyTorch's ``nn.LSTM(proj_size=P)`` + ``nn.Linear`` with identical weights (loaded
  through ``to_torch``) give the same loss, outputs, final ``(h, c)`` and gradients
  (``weight_hr`` included, the inputs and both initial states) to <= 1e-9.

Plus ``check_cell`` on the cell (and its failure on two wrong variants), the
``state_dict`` round trip, and the bad-input errors.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_rel_close, tree_max_rel_error
from jaxrnn import RNN, Outer, check_cell, half_sse, make_cell
from jaxrnn._src.cells import LSTMPParams, ProjectedLSTM
from jaxrnn._src.diagnostics import gradient_diagnostics, step_gradients
from jaxrnn_app.gradcheck import CheckConfig, CheckResult, format_results, random_configs
from jaxrnn._src.model import sequence_mask

torch = pytest.importorskip("torch")

BPTT_RTOL = 1e-10
TORCH_RTOL = 1e-9
T, B, D, O = 5, 3, 3, 2
LENGTHS = {"none": None, "mixed": [5, 1, 3]}

# (layers, bidirectional, bias, lengths, state, H, P): the first six cover every
# pair of values of the first five factors; the last two add small H and P.
CASES = [
    (1, False, True, "none", "given", 4, 2),
    (1, True, False, "mixed", "zero", 5, 3),
    (2, False, False, "mixed", "given", 5, 1),
    (2, True, True, "none", "zero", 4, 3),
    (3, False, True, "mixed", "zero", 4, 2),
    (3, True, False, "none", "given", 5, 4),
    (1, False, False, "none", "zero", 3, 1),
    (1, True, True, "mixed", "given", 3, 2),
]


def test_cases_are_pairwise():
    """Every pair of values of any two of the five factors occurs in some case."""
    values = [(1, 2, 3), (False, True), (True, False), tuple(LENGTHS), ("given", "zero")]
    for i, j in itertools.combinations(range(5), 2):
        seen = {(c[i], c[j]) for c in CASES}
        assert seen == set(itertools.product(values[i], values[j])), (i, j)


def make_model(layers, bidirectional, bias, H, P):
    return RNN(cell="lstm", input_size=D, hidden_size=H, output_size=O, num_layers=layers,
               bidirectional=bidirectional, bias=bias, readout_bias=bias, proj_size=P)


def make_inputs(model: RNN, seed: int, zero_state: bool):
    """Parameters, inputs, targets and a state ``(h0 (L*dirs, B, P), c0 (L*dirs, B, H))``.

    The parameters are a freshly initialised PyTorch model's, through ``from_torch``,
    and the data numpy draws: no eager JAX op (each would compile for its shape).
    """
    torch.manual_seed(seed)
    rnn, readout = torch_modules(model)
    params = model.from_torch(rnn.state_dict(), readout.state_dict())
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.standard_normal((T, B, model.input_size)))
    targets = jnp.asarray(rng.standard_normal((T, B, model.output_size)))
    n = model.num_layers * model.num_directions
    shapes = [(n, B, model.proj_size), (n, B, model.hidden_size)]
    state = tuple(jnp.asarray(np.zeros(s) if zero_state else 0.5 * rng.standard_normal(s))
                  for s in shapes)
    return params, xs, targets, state


@functools.lru_cache(maxsize=None)
def grad_fn(model: RNN, method: str, with_lengths: bool):
    """jit(value_and_grad) of half_sse wrt (params, xs, state), with the outputs as aux."""

    def f(params, xs, state, targets, lengths):
        def loss(params, xs, state):
            lens = lengths if with_lengths else None
            ys, final = model.apply(params, xs, state, lens, method)
            return half_sse(ys, targets, sequence_mask(lens, xs.shape[0])), (ys, final)
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, xs, state)

    return jax.jit(f)


# --- PyTorch --------------------------------------------------------------------

def torch_modules(model: RNN, params=None):
    """``nn.LSTM(proj_size=P)`` and ``nn.Linear`` for ``model``, loaded with ``params`` if given."""
    rnn = torch.nn.LSTM(input_size=model.input_size, hidden_size=model.hidden_size,
                        num_layers=model.num_layers, bias=model.bias,
                        bidirectional=model.bidirectional, proj_size=model.proj_size,
                        dtype=torch.float64)
    readout = torch.nn.Linear(model.proj_size * model.num_directions, model.output_size,
                              bias=model.readout_bias, dtype=torch.float64)
    if params is None:
        return rnn, readout
    rnn_sd, ro_sd = model.to_torch(params)
    rnn.load_state_dict({k: torch.from_numpy(v) for k, v in rnn_sd.items()})
    readout.load_state_dict({k: torch.from_numpy(v) for k, v in ro_sd.items()})
    return rnn, readout


def torch_reference(model: RNN, params, xs, targets, state, lengths):
    """Loss, outputs, final (h, c) and gradients from PyTorch autograd on the same loss."""
    rnn, readout = torch_modules(model, params)
    x = torch.from_numpy(np.array(xs)).requires_grad_(True)
    h0, c0 = (torch.from_numpy(np.array(p)).requires_grad_(True) for p in state)
    if lengths is None:
        out, final = rnn(x, (h0, c0))
        mask = torch.ones(T, B, dtype=torch.bool)
    else:
        lens = torch.tensor(lengths)
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lens, enforce_sorted=False)
        out, final = rnn(packed, (h0, c0))
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
        mask = torch.arange(T)[:, None] < lens[None, :]
    ys = readout(out) * mask[:, :, None]
    loss = 0.5 * (((ys - torch.from_numpy(np.array(targets))) ** 2) * mask[:, :, None]).sum()
    loss.backward()
    return dict(
        loss=loss.item(), ys=ys.detach().numpy(),
        final=tuple(f.detach().numpy() for f in final),
        grads_rnn={k: p.grad.numpy() for k, p in rnn.named_parameters()},
        grads_ro={k: p.grad.numpy() for k, p in readout.named_parameters()},
        dx=x.grad.numpy(), dstate=(h0.grad.numpy(), c0.grad.numpy()))


@pytest.mark.parametrize("layers, bidirectional, bias, lengths, state, H, P", CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_bptt_equals_autodiff_and_torch(layers, bidirectional, bias, lengths, state, H, P):
    model = make_model(layers, bidirectional, bias, H, P)
    seed = 100 + CASES.index((layers, bidirectional, bias, lengths, state, H, P))
    params, xs, targets, st0 = make_inputs(model, seed, zero_state=(state == "zero"))
    assert all(isinstance(p, LSTMPParams) for layer in params.layers for p in layer)
    lens = LENGTHS[lengths]
    lens_arr = jnp.zeros((B,), jnp.int32) if lens is None else jnp.array(lens, jnp.int32)
    results = {m: grad_fn(model, m, lens is not None)(params, xs, st0, targets, lens_arr)
               for m in ("bptt", "autodiff")}
    (loss, (ys, final)), (gp, gx, gs) = results["bptt"]
    # bptt vs autodiff: the same forward values, and every gradient to rounding
    assert_trees_rel_close(results["bptt"][0], results["autodiff"][0], 1e-14)
    assert_trees_rel_close(results["bptt"][1], results["autodiff"][1], BPTT_RTOL)
    # the shapes PyTorch gives: outputs dirs*P wide, final h (L*dirs, B, P), c (.., H)
    n = layers * model.num_directions
    assert final[0].shape == (n, B, P) and final[1].shape == (n, B, H)
    assert gp.layers[-1][0].w_hr.shape == (P, H) and gp.layers[-1][0].w_hh.shape == (4 * H, P)

    ref = torch_reference(model, params, xs, targets, st0, lens)
    assert float(loss) == pytest.approx(ref["loss"], rel=TORCH_RTOL)
    assert tree_max_rel_error(np.asarray(ys), ref["ys"]) <= TORCH_RTOL
    assert tree_max_rel_error(jax.tree.map(np.asarray, final), ref["final"]) <= TORCH_RTOL
    g_rnn, g_ro = model.to_torch(gp)
    assert list(g_rnn) == list(ref["grads_rnn"]) and list(g_ro) == list(ref["grads_ro"])
    assert f"weight_hr_l{layers - 1}" in g_rnn
    for k in ref["grads_rnn"]:
        assert tree_max_rel_error(g_rnn[k], ref["grads_rnn"][k]) <= TORCH_RTOL, k
    for k in ref["grads_ro"]:
        assert tree_max_rel_error(g_ro[k], ref["grads_ro"][k]) <= TORCH_RTOL, k
    assert tree_max_rel_error(np.asarray(gx), ref["dx"]) <= TORCH_RTOL
    assert tree_max_rel_error(jax.tree.map(np.asarray, gs), ref["dstate"]) <= TORCH_RTOL


def test_loss_and_grad_diagnostics_and_lean_bptt():
    """The other model paths: loss_and_grad, gradient_diagnostics, step_gradients, bptt_segment."""
    model = make_model(2, True, True, 4, 2)
    params, xs, targets, st0 = make_inputs(model, 7, zero_state=False)
    lens = jnp.array([5, 2, 4])
    loss, grads = model.loss_and_grad(params, xs, targets, state=st0, lengths=lens)
    # (bptt == autodiff == torch for this path: test_bptt_equals_autodiff_and_torch)
    diag = gradient_diagnostics(model, params, xs, targets, state=st0, lengths=lens)
    assert_trees_rel_close(diag.grads, grads, BPTT_RTOL)
    assert float(diag.loss) == pytest.approx(float(loss), rel=1e-14)
    assert all(n.shape == (T,) for layer in diag.dh_norm for n in layer)
    sg = step_gradients(model, params, xs, targets, state=st0, lengths=lens)
    summed = jax.tree.map(lambda a: a.sum(axis=0), sg.dparams)  # the per-step terms sum up
    assert_trees_rel_close(summed, grads.layers, BPTT_RTOL)
    assert all(lw.shape == (T, B, 2) for layer in sg.dh for lw in layer)  # dL/dh_t is P wide
    lean = dataclasses.replace(model, bptt_segment=2)
    _, g_lean = lean.loss_and_grad(params, xs, targets, state=st0, lengths=lens)
    assert_trees_rel_close(g_lean, grads, BPTT_RTOL)


def test_gradcheck_configs_with_proj_size():
    """CheckConfig passes proj_size to its model; random_configs draws it for the LSTM only."""
    cfg = CheckConfig(cell="lstm", hidden_size=4, proj_size=3, bidirectional=True)
    assert cfg.model().proj_size == 3 and cfg.model().layer_output_size == 3
    # (check_config on it runs the same model path as test_bptt_equals_autodiff_and_torch)
    table = format_results([CheckResult(cfg, 1e-16, 1e-9, 1e-9)])
    head = [c.strip() for c in table.splitlines()[0].split("|")[1:-1]]
    row = [c.strip() for c in table.splitlines()[2].split("|")[1:-1]]
    assert (row[head.index("H")], row[head.index("P")]) == ("4", "3") and row[-1] == "ok"
    drawn = random_configs(40, seed=1, cells=("lstm", "gru"))
    assert any(c.proj_size for c in drawn) and any(c.cell == "lstm" and not c.proj_size
                                                    for c in drawn)
    assert all(c.cell == "lstm" and 1 <= c.proj_size < c.hidden_size
               for c in drawn if c.proj_size)
    with pytest.raises(ValueError, match="proj_size=2 needs cell='lstm'"):
        random_configs(1, cells=("gru",), proj_size=2)


# --- check_cell -------------------------------------------------------------------

def test_check_cell_passes():
    report = check_cell(ProjectedLSTM(proj_size=2), hidden_size=5)
    assert report.ok and report.max_rel_error <= 1e-10, str(report)
    assert any(r.output == "w_hr" for r in report.rows)  # the Outer term was compared


@dataclasses.dataclass(frozen=True)
class _NoProjectionInDh(ProjectedLSTM):
    """Wrong: takes dL/dm_t as if W_hr were the identity (drops the projection in dh's path)."""

    def backward_step(self, params, carry_prev, carry, res, dcarry):
        dh, dc_next = dcarry
        c = carry[1]
        m = res[..., 3 * c.shape[-1]:] * jnp.tanh(c)
        dm = dh @ jnp.eye(dh.shape[-1], c.shape[-1], dtype=dh.dtype)
        out = super(ProjectedLSTM, self).backward_step(params, carry_prev, carry, res,
                                                       (dm, dc_next))
        return (*out, {"w_hr": Outer(dg=dh, a=m)})


def test_check_cell_catches_a_wrong_backward():
    report = check_cell(_NoProjectionInDh(proj_size=2), hidden_size=5)
    assert not report.ok and report.max_rel_error > 1e-3, str(report)
    wrong = {r.output for r in report.rows if r.rel_error > 1e-3}
    assert "dcarry_prev[0]" in wrong and "w_hh" in wrong  # what the dropped W_hr feeds


# --- PyTorch state_dict -------------------------------------------------------------

def test_torch_state_dict_roundtrip_and_import():
    torch.manual_seed(0)
    H, P = 5, 2
    rnn = torch.nn.LSTM(D, H, num_layers=2, bidirectional=True, proj_size=P,
                        dtype=torch.float64)
    readout = torch.nn.Linear(2 * P, O, dtype=torch.float64)
    model = make_model(2, True, True, H, P)
    assert model.torch_names() == list(rnn.state_dict())
    params = model.from_torch(rnn.state_dict(), readout.state_dict())
    assert params.layers[1][1].w_ih.shape == (4 * H, 2 * P)
    rnn_sd, ro_sd = model.to_torch(params)
    assert list(rnn_sd) == list(rnn.state_dict())
    for k, v in rnn.state_dict().items():
        assert np.array_equal(rnn_sd[k], v.numpy()) and rnn_sd[k].dtype == np.float64, k
    for k, v in readout.state_dict().items():
        assert np.array_equal(ro_sd[k], v.numpy())
    again = model.from_torch(rnn_sd, ro_sd)
    assert jax.tree.structure(again) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again),
                                                      jax.tree.leaves(params)))
    # the imported model computes what PyTorch computes (default zero state)
    x = torch.randn(6, 2, D, dtype=torch.float64)
    with torch.no_grad():
        out, (h_n, c_n) = rnn(x)
        ref = readout(out).numpy()
    ys, (h, c) = model.apply(params, jnp.asarray(x.numpy()))
    assert tree_max_rel_error(np.asarray(ys), ref) <= TORCH_RTOL
    assert tree_max_rel_error((np.asarray(h), np.asarray(c)),
                              (h_n.numpy(), c_n.numpy())) <= TORCH_RTOL


def test_init_matches_torch_layout_and_bounds():
    model = RNN(cell="lstm", input_size=D, hidden_size=6, output_size=O, bias=False,
                proj_size=2, forget_bias=0.0)
    rnn = torch.nn.LSTM(D, 6, proj_size=2, bias=False)
    rnn_sd, _ = model.to_torch(model.init(jax.random.key(1), jnp.float64))
    assert {k: v.shape for k, v in rnn_sd.items()} == {
        k: tuple(v.shape) for k, v in rnn.state_dict().items()}
    bound = 1 / np.sqrt(6)
    assert all(np.max(np.abs(v)) <= bound for v in rnn_sd.values())
    fb = RNN(cell="lstm", input_size=D, hidden_size=6, output_size=O, proj_size=2,
             forget_bias=1.0).init(jax.random.key(1), jnp.float64).layers[0][0].b_ih
    assert np.all(fb[6:12] > 1 - bound) and np.all(np.abs(fb[:6]) <= bound)


def test_from_torch_rejects_a_model_without_projection():
    rnn = torch.nn.LSTM(D, 5, dtype=torch.float64)
    readout = torch.nn.Linear(2, O, dtype=torch.float64)
    model = make_model(1, False, True, 5, 2)
    with pytest.raises(ValueError, match=r"missing keys \['weight_hr_l0'\]"):
        model.from_torch(rnn.state_dict(), readout.state_dict())
    sd = {k: v.numpy() for k, v in torch.nn.LSTM(D, 5, proj_size=3).state_dict().items()}
    with pytest.raises(ValueError, match=r"\['weight_hh_l0'\] must have shape \(20, 2\)"):
        model.from_torch(sd, readout.state_dict())
    plain = RNN(cell="lstm", input_size=D, hidden_size=5, output_size=O)
    with pytest.raises(ValueError, match="needs no w_hr field"):
        plain.to_torch(model.init(jax.random.key(0)))


def test_torch_interop_rejects_user_cells():
    model = RNN(cell=ProjectedLSTM(proj_size=2), input_size=D, hidden_size=5, output_size=O)
    params = model.init(jax.random.key(0))
    for call in (model.torch_names, lambda: model.to_torch(params),
                 lambda: model.from_torch({}, {})):
        with pytest.raises(ValueError, match=r"applies to the built-in cells elman, lstm, gru.*"
                                             r"is a user cell"):
            call()
    indrnn = RNN(cell="indrnn", input_size=D, hidden_size=5, output_size=O)
    with pytest.raises(ValueError, match="cell='indrnn' has no PyTorch counterpart"):
        indrnn.to_torch(indrnn.init(jax.random.key(0)))


# --- bad input ---------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(cell="lstm", hidden_size=4, proj_size=4), "proj_size must be smaller than hidden_size=4"),
    (dict(cell="lstm", hidden_size=4, proj_size=7), "proj_size must be smaller than hidden_size=4"),
    (dict(cell="gru", hidden_size=4, proj_size=2), "proj_size=2 applies to cell='lstm' only"),
    (dict(cell="lstm", hidden_size=4, proj_size=-1), "proj_size must be an integer >= 0, got -1"),
    (dict(cell="lstm", hidden_size=4, proj_size=1.5), "proj_size must be an integer"),
])
def test_bad_proj_size(kw, match):
    with pytest.raises(ValueError, match=match):
        RNN(input_size=D, output_size=O, **kw)


def test_bad_proj_cell_and_state():
    with pytest.raises(ValueError, match="proj_size must be an integer >= 1"):
        ProjectedLSTM(proj_size=0)
    with pytest.raises(ValueError, match="proj_size must be smaller than hidden_size=3"):
        ProjectedLSTM(proj_size=3).init(jax.random.key(0), D, 3)
    with pytest.raises(ValueError, match="proj_size"):
        make_cell("elman", proj_size=1)
    model = make_model(2, False, True, 5, 2)
    params, xs, _, (h0, c0) = make_inputs(model, 0, zero_state=True)
    wide = jnp.zeros((2, B, 5), jnp.float64)  # h0 as wide as c0: the non-projected shape
    with pytest.raises(ValueError, match=r"state\[0\] must have shape .*proj_size\) = "
                                         r"\(2, 3, 2\), got shape \(2, 3, 5\)"):
        model.apply(params, xs, (wide, c0))
    with pytest.raises(ValueError, match=r"state\[1\] must have shape .*hidden_size\) = "
                                         r"\(2, 3, 5\), got shape \(2, 3, 2\)"):
        model.apply(params, xs, (h0, h0))
    with pytest.raises(ValueError, match=r"pair \(h0, c0\), of shapes \(2, 3, 2\) and "
                                         r"\(2, 3, 5\)"):
        model.apply(params, xs, h0)
    zs = model.zero_state(B)
    assert zs[0].shape == (2, B, 2) and zs[1].shape == (2, B, 5)
