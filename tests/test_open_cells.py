"""Cells as an open protocol: user-defined cells, ``check_cell``, IndRNN, ``forget_bias``.

The user cells here are written outside the package, as a user would: the README's
worked example (CIFG, executed from the README itself) with the default
``CellParams``, and a leaky Elman cell that owns an extra parameter vector whose
per-example gradient terms the generic reverse scan sums. Both go through every
path of the model (layers, directions, lengths, states, dropout, ``bptt_segment``,
training steps, diagnostics, checkpoints) with ``method="bptt"`` equal to
``method="autodiff"`` in float64 to <= 1e-10.
"""

import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import LeakyElman, LeakyParams, assert_trees_rel_close, tree_max_rel_error
import jaxrnn
from jaxrnn_app import checkpoint
from jaxrnn import RNN, Cell, CellParams, check_cell
from jaxrnn._src.cells import CELLS, IndRNN

ROOT = Path(__file__).resolve().parents[1]
BPTT_RTOL = 1e-10


def readme_cell_example() -> str:
    """The python block of the README's "Writing your own cell" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Writing your own cell", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def readme():
    ns = {}
    exec(compile(readme_cell_example(), "README.md (Writing your own cell)", "exec"), ns)
    return ns


def _inputs(model, seed, T=6, B=3, lengths=None, state="given"):
    k = jax.random.split(jax.random.key(seed), 4)
    params = model.init(k[0], jnp.float64)
    xs = jax.random.normal(k[1], (T, B, model.input_size), jnp.float64)
    targets = jax.random.normal(k[2], (T, B, model.output_size), jnp.float64)
    st = None
    if state == "given":
        zero = model.zero_state(B, jnp.float64)
        parts = zero if isinstance(zero, tuple) else (zero,)
        keys = jax.random.split(k[3], len(parts))
        parts = tuple(0.5 * jax.random.normal(kk, z.shape, jnp.float64)
                      for kk, z in zip(keys, parts))
        st = parts if isinstance(zero, tuple) else parts[0]
    lens = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    return params, xs, targets, st, lens


def _grads(model, method, params, xs, targets, st, lens, dropout_key=None):
    def loss(params, xs, st):
        return model.loss(params, xs, targets, method=method, state=st, lengths=lens,
                          dropout_key=dropout_key)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, xs, st)


# (layers, bidirectional, lengths, state, dropout, bptt_segment): pairwise over options
PATHS = [(1, False, None, "given", 0.0, None),
         (2, True, [6, 1, 4], "zero", 0.3, None),
         (2, False, [6, 2, 5], "given", 0.0, 2),
         (3, True, None, "given", 0.0, 4)]


@pytest.mark.parametrize("which", ["readme_cifg", "leaky"])
@pytest.mark.parametrize("path", PATHS, ids=[f"p{i}" for i in range(len(PATHS))])
def test_user_cell_bptt_equals_autodiff_on_every_path(readme, which, path):
    layers, bidir, lengths, state, dropout, segment = path
    cell = readme["CIFG"]() if which == "readme_cifg" else LeakyElman()
    model = RNN(cell=cell, input_size=3, hidden_size=4, output_size=2, num_layers=layers,
                bidirectional=bidir, dropout=dropout, bptt_segment=segment)
    params, xs, targets, st, lens = _inputs(model, PATHS.index(path), lengths=lengths,
                                            state=state)
    key = jax.random.key(7) if dropout else None
    got = _grads(model, "bptt", params, xs, targets, st, lens, key)
    want = _grads(model, "autodiff", params, xs, targets, st, lens, key)
    assert_trees_rel_close(got[0], want[0], 1e-13)
    assert_trees_rel_close(got[1], want[1], BPTT_RTOL)
    if which == "leaky":  # the cell's own parameter got its gradient, and it is not zero
        leak = got[1][0].layers[0][0].leak
        assert leak.shape == (4,) and float(jnp.max(jnp.abs(leak))) > 0


def test_readme_example_checks_and_trains(readme):
    assert readme["report"].max_rel_error <= BPTT_RTOL
    losses = readme["losses"]
    assert losses[-1] < 0.25 * losses[0]


def test_user_cell_trains_tbptt_sharded_diagnostics_and_checkpoints(tmp_path):
    from jaxrnn_app.sharding import make_mesh, make_sharded_train_step

    model = RNN(cell=LeakyElman(), input_size=3, hidden_size=4, output_size=2, num_layers=2)
    params, xs, targets, st, lens = _inputs(model, 11, T=8, lengths=[8, 3, 6], state=None)
    batch = jaxrnn.Batch(xs, targets, lens)
    opt = optax.adam(1e-2)
    plain = jaxrnn.make_train_step(model, opt, donate=False)
    sharded = make_sharded_train_step(model, opt, make_mesh(1), donate=False)
    p1, _, m1 = plain(params, opt.init(params), batch)
    p2, _, m2 = sharded(params, opt.init(params), batch)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-12)
    assert_trees_rel_close(p2, p1, 1e-12)
    # truncated BPTT (k1 = k2 = T: one window) equals the full step
    tb = jaxrnn.make_tbptt_step(model, opt, k1=8, k2=8, donate=False)
    p3, _, m3 = tb(params, opt.init(params), jaxrnn.Batch(xs, targets, None))
    p4, _, m4 = plain(params, opt.init(params), jaxrnn.Batch(xs, targets, None))
    assert float(m3["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-12)
    assert_trees_rel_close(p3, p4, 1e-10)
    # diagnostics: the same gradient, and the leak's per-step terms sum to it
    loss, grads = model.loss_and_grad(params, xs, targets, lengths=lens)
    d = jaxrnn.gradient_diagnostics(model, params, xs, targets, lengths=lens)
    assert_trees_rel_close(d.grads, grads, 1e-12)
    sg = jaxrnn.step_gradients(model, params, xs, targets, lengths=lens)
    for l in range(2):
        assert sg.dparams[l][0].leak.shape == (8, 4)
        assert_trees_rel_close(sg.dparams[l][0].leak.sum(0), grads.layers[l][0].leak, 1e-12)
    # a checkpoint of the cell's own parameter tree restores exactly
    state = checkpoint.CheckpointState(p1, opt.init(p1), 3, jax.random.key(0), 0, {"m": 1})
    with checkpoint.Checkpointer(tmp_path / "ck") as ck:
        ck.save(state)
        back = ck.restore(state)
    assert tree_max_rel_error(back.params, p1) == 0.0
    assert type(back.params.layers[0][0]) is LeakyParams


# --- check_cell ------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CELLS))
def test_check_cell_passes_every_built_in_cell(name):
    cell = RNN(cell=name, input_size=3, hidden_size=4, output_size=1).cell_fn
    report = check_cell(cell)
    assert report.ok and report.max_rel_error <= BPTT_RTOL, str(report)
    outputs = {r.output for r in report.rows}
    assert {"dgi", "dcarry_prev[0]", "dxs", "w_ih", "tangent dcarry[0]", "tangent dhs"} <= outputs
    # every parameter field of the cell was compared over the sequence
    params = cell.init(jax.random.key(0), 3, 4, True, jnp.float32)
    compared = {r.output for r in report.rows if r.check == "sequence"}
    assert {f for f in params._fields if getattr(params, f) is not None} <= compared


def test_check_cell_tells_a_wrong_backward_step(readme):
    CIFG = readme["CIFG"]

    @dataclasses.dataclass(frozen=True)
    class WrongCIFG(CIFG):
        def backward_step(self, params, carry_prev, carry, res, dcarry):
            (dh_prev, dc_prev), dgi, dgh = super().backward_step(params, carry_prev, carry,
                                                                 res, dcarry)
            i = jnp.split(res, 3, axis=-1)[0]
            return (dh_prev, dc_prev / (1 - i) * i), dgi, dgh  # dc * i instead of dc * (1 - i)

    report = check_cell(WrongCIFG())
    assert report.max_rel_error > 1e-3 and not report.ok
    text = str(report)
    wrong = [line for line in text.splitlines() if "WRONG" in line]
    assert any("| step | dcarry_prev[1] |" in line for line in wrong)
    assert all("| step | dgi |" not in line for line in wrong)  # dgi is still right
    assert "FAIL" in text


def test_check_cell_tells_a_wrong_tangent_step():
    """A tangent step that forgets the forget gate's tangent (df c_{t-1}): the tangent
    rows fail, the backward rows still pass."""

    @dataclasses.dataclass(frozen=True)
    class WrongTangentLSTM(jaxrnn.LSTM):
        def tangent_step(self, params, carry_prev, xp, carry, res, dparams, dcarry_prev, dxp):
            dh, dc = super().tangent_step(params, carry_prev, xp, carry, res, dparams,
                                          dcarry_prev, dxp)
            H = dc.shape[-1]
            f = res[..., H:2 * H]
            return dh, dc - 0.5 * f * dcarry_prev[1]  # half of f dc_{t-1} missing

    report = check_cell(WrongTangentLSTM())
    wrong = {r.output for r in report.rows if r.rel_error > 1e-3}
    assert {"tangent dcarry[1]", "tangent dhs"} <= wrong, str(report)
    assert all(o.startswith("tangent") for o in wrong) and not report.ok


@dataclasses.dataclass(frozen=True)
class WideCarry(jaxrnn.Elman):
    def step(self, params, carry, xp):
        (h,), res = super().step(params, carry, xp)
        return (jnp.concatenate([h, h[:, :1]], axis=-1),), res


@dataclasses.dataclass(frozen=True)
class ShortDgi(jaxrnn.Elman):
    def backward_step(self, params, carry_prev, carry, res, dcarry):
        dcp, dgi, dgh = super().backward_step(params, carry_prev, carry, res, dcarry)
        return dcp, dgi[:, :-1], dgh


@dataclasses.dataclass(frozen=True)
class UnknownField(jaxrnn.Elman):
    def backward_step(self, params, carry_prev, carry, res, dcarry):
        return super().backward_step(params, carry_prev, carry, res, dcarry) + ({"gain": 0},)


@dataclasses.dataclass(frozen=True)
class NoLeakGradient(LeakyElman):
    def backward_step(self, params, carry_prev, carry, res, dcarry):
        return super().backward_step(params, carry_prev, carry, res, dcarry)[:3]


def test_wrong_structures_name_the_output_and_both_shapes():
    m = RNN(cell=WideCarry(), input_size=3, hidden_size=4, output_size=1)
    params = m.init(jax.random.key(0))
    xs = jnp.zeros((5, 2, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"WideCarry.step's carry must have shape \(2, 4\), "
                                         r"got shape \(2, 5\)"):
        m.apply(params, xs)
    with pytest.raises(ValueError, match=r"WideCarry.step's carry"):
        check_cell(WideCarry())
    m = RNN(cell=ShortDgi(), input_size=3, hidden_size=4, output_size=1)
    ys = jnp.zeros((5, 2, 1), jnp.float32)
    with pytest.raises(ValueError, match=r"ShortDgi.backward_step's dgi must have shape "
                                         r"\(2, 4\) \(B, G\*H\), got shape \(2, 3\)"):
        m.loss_and_grad(m.init(jax.random.key(0)), xs, ys)
    with pytest.raises(ValueError, match=r"ShortDgi.backward_step's dgi"):
        check_cell(ShortDgi())
    with pytest.raises(ValueError, match=r"names 'gain', which is not an array field"):
        check_cell(UnknownField())
    with pytest.raises(ValueError, match=r"gives no gradient for the parameter field\(s\) "
                                         r"\['leak'\]"):
        check_cell(NoLeakGradient())


def test_bad_cells_are_refused_at_construction(readme):
    kw = dict(input_size=3, hidden_size=4, output_size=1)
    with pytest.raises(ValueError, match=r"cell must be one of .* or a jaxrnn.Cell instance"):
        RNN(cell=object(), **kw)
    with pytest.raises(ValueError, match=r"pass cell=CIFG\(\)"):
        RNN(cell=readme["CIFG"], **kw)
    with pytest.raises(ValueError, match=r"nonlinearity='relu'.*a Cell instance \(CIFG\)"):
        RNN(cell=readme["CIFG"](), nonlinearity="relu", **kw)

    class Mutable(jaxrnn.Elman):  # unhashable, so not a static jit argument
        __hash__ = None

    with pytest.raises(ValueError, match=r"must be hashable"):
        RNN(cell=Mutable(), **kw)

    @dataclasses.dataclass(frozen=True)
    class NoBackward(Cell):
        def step(self, params, carry, xp):
            return carry, ()

    with pytest.raises(ValueError, match=r"NoBackward must define backward_step"):
        RNN(cell=NoBackward(), **kw)


# --- the CLI: jaxrnn gradcheck --cell package.module:ClassName ----------------------

def _write_module(tmp_path, name, source):
    (tmp_path / f"{name}.py").write_text(source)


def test_gradcheck_cli_checks_a_user_cell(tmp_path, monkeypatch, capsys):
    from jaxrnn_app.cli import main

    source = readme_cell_example().split("# 1.", 1)[0]  # the class, without the demo
    _write_module(tmp_path, "user_cifg", source)
    wrong = source.replace("dc_prev = dc * (1 - i)", "dc_prev = dc * i")
    assert wrong != source
    _write_module(tmp_path, "user_cifg_wrong", wrong)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["gradcheck", "--trials", "1", "--max-seq-len", "4", "--max-layers", "2",
            "--max-hidden", "3", "--no-progress", "--cell"]
    assert main(args + ["user_cifg:CIFG"]) == 0
    out = capsys.readouterr().out
    assert "check_cell(CIFG)" in out and "PASS" in out and "all 1 configurations agree" in out
    assert main(args + ["user_cifg_wrong:CIFG"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "MISMATCH" in out
    for spec, msg in [("no_such_module_xyz:C", "cannot import"),
                      ("user_cifg:Nope", "must name a subclass of jaxrnn.Cell"),
                      ("lsmt", "expected one of")]:
        with pytest.raises(SystemExit) as e:
            main(args + [spec])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err


def test_cli_cell_names_are_the_built_in_cells():
    from jaxrnn_app.cli import CELL_NAMES

    assert sorted(CELL_NAMES) == sorted(CELLS)


# --- IndRNN ------------------------------------------------------------------------

# (nonlinearity, layers, bidirectional, lengths, state, recurrent_max); recurrent_max at
# one point: Li et al.'s 2^(1/T) range for u, through a Cell instance
INDRNN = [("tanh", 1, False, None, "given", None), ("relu", 2, True, [6, 1, 4], "zero", None),
          ("relu", 1, False, [2, 6, 6], "given", 2 ** (1 / 6)),
          ("tanh", 3, True, [5, 6, 3], "given", None)]


@pytest.mark.parametrize("case", INDRNN, ids=[f"i{i}" for i in range(len(INDRNN))])
def test_indrnn_bptt_equals_autodiff(case):
    nonlin, layers, bidir, lengths, state, rmax = case
    cell = dict(cell="indrnn", nonlinearity=nonlin) if rmax is None else dict(
        cell=IndRNN(nonlin, recurrent_max=rmax))
    model = RNN(**cell, input_size=3, hidden_size=5,
                output_size=2, num_layers=layers, bidirectional=bidir)
    params, xs, targets, st, lens = _inputs(model, 100 + INDRNN.index(case), lengths=lengths,
                                            state=state)
    got = _grads(model, "bptt", params, xs, targets, st, lens)
    want = _grads(model, "autodiff", params, xs, targets, st, lens)
    assert_trees_rel_close(got[0], want[0], 1e-13)
    assert_trees_rel_close(got[1], want[1], BPTT_RTOL)


def test_indrnn_has_a_recurrent_vector_not_a_matrix():
    model = RNN(cell="indrnn", input_size=3, hidden_size=50, output_size=1)
    p = model.init(jax.random.key(0)).layers[0][0]
    assert p.w_ih.shape == (50, 3) and p.w_hh.shape == (50,)
    assert 0.0 <= float(p.w_hh.min()) and float(p.w_hh.max()) <= 1.0  # u ~ U(0, 1)
    # h_t = phi(W x_t + b + u * h_{t-1}), computed here by hand for two steps (relu)
    model = RNN(cell="indrnn", nonlinearity="relu", input_size=3, hidden_size=4, output_size=1)
    params = model.init(jax.random.key(1), jnp.float64)
    q = params.layers[0][0]
    xs = jax.random.normal(jax.random.key(2), (2, 1, 3), jnp.float64)
    hs, _ = model.features(params, xs)
    h1 = np.maximum(np.asarray(xs[0] @ q.w_ih.T + q.b_ih + q.b_hh), 0)
    h2 = np.maximum(np.asarray(xs[1] @ q.w_ih.T + q.b_ih + q.b_hh) + np.asarray(q.w_hh) * h1, 0)
    np.testing.assert_allclose(np.asarray(hs[1]), h2, rtol=1e-14)
    assert isinstance(IndRNN(), Cell)


def test_indrnn_recurrent_max_sets_the_range_of_u():
    r = 2 ** (1 / 1000)  # Li et al.'s bound for T = 1000
    kw = dict(input_size=3, hidden_size=400, output_size=1)
    base = RNN(cell="indrnn", **kw).init(jax.random.key(0)).layers[0][0]
    same = RNN(cell=IndRNN(recurrent_max=None), **kw).init(jax.random.key(0)).layers[0][0]
    np.testing.assert_array_equal(same.w_hh, base.w_hh)  # None keeps U(0, 1)
    p = RNN(cell=IndRNN("relu", recurrent_max=r), **kw).init(jax.random.key(0)).layers[0][0]
    u = np.asarray(p.w_hh)
    assert 0.0 <= u.min() < 0.01 * r and 0.99 * r < u.max() <= r  # U(0, r): it fills the range
    np.testing.assert_array_equal(p.w_ih, base.w_ih)  # only u's range changed
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="recurrent_max must be a finite number > 0"):
            IndRNN(recurrent_max=bad)


# --- forget_bias -------------------------------------------------------------------

def test_forget_bias_initialises_the_forget_block():
    kw = dict(cell="lstm", input_size=3, hidden_size=4, output_size=1)
    base = RNN(**kw).init(jax.random.key(0)).layers[0][0]
    plus = RNN(forget_bias=1.0, **kw).init(jax.random.key(0)).layers[0][0]
    np.testing.assert_array_equal(plus.b_ih[4:8], base.b_ih[4:8] + 1.0)
    np.testing.assert_array_equal(np.delete(plus.b_ih, np.s_[4:8]), np.delete(base.b_ih, np.s_[4:8]))
    np.testing.assert_array_equal(plus.b_hh, base.b_hh)
    assert isinstance(base, CellParams)
    with pytest.raises(ValueError, match=r"forget_bias=1.0 applies to cells with a forget gate"):
        RNN(cell="gru", input_size=3, hidden_size=4, output_size=1, forget_bias=1.0)
    with pytest.raises(ValueError, match=r"forget_bias=1.0 needs bias=True"):
        RNN(bias=False, forget_bias=1.0, **kw)


def test_train_cli_refuses_bad_cell_options_before_writing(tmp_path, capsys):
    from jaxrnn_app.cli import main

    for args, msg in [(["--cell", "lstm", "--proj-size", "40", "--hidden", "8"],
                       "--proj-size must be smaller than --hidden=8"),
                      (["--cell", "gru", "--forget-bias", "1"],
                       "--forget-bias=1.0 applies to cells with a forget gate"),
                      (["--cell", "elman", "--proj-size", "2"],
                       "--proj-size=2 applies to --cell 'lstm' only")]:
        out = tmp_path / "run"
        assert main(["train", "--task", "sine", "--steps", "2", "--out", str(out)] + args) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
        assert not out.exists()


def _whole_sequence_copies_in_loops(cell, T=7, B=3) -> list[str]:
    """Copies of a whole (T, B, .) loop buffer in the compiled bptt gradient's HLO.

    Such a copy of a loop's state (a ``get-tuple-element``) runs at every step: the
    step then costs O(T) and the layer O(T^2). (Copies of a broadcast are the stacked
    outputs' one-off zero fill, outside the loops.)
    """
    m = RNN(cell=cell, input_size=2, hidden_size=4, output_size=1)
    p = m.init(jax.random.key(0))
    xs, ys = jnp.ones((T, B, 2), jnp.float32), jnp.ones((T, B, 1), jnp.float32)
    hlo = jax.jit(jax.grad(lambda p: m.loss(p, xs, ys))).lower(p).compile().as_text()
    return [line.strip() for line in hlo.splitlines()
            if re.search(rf"= f32\[{T},{B},\d+\]\S* copy\(%get-tuple-element", line)]


def test_no_cell_copies_a_whole_sequence_buffer_at_every_step():
    for name in sorted(CELLS):
        assert _whole_sequence_copies_in_loops(name) == [], name

    @dataclasses.dataclass(frozen=True)
    class LayerNormInPlace(jaxrnn.LayerNormLSTM):
        residual_over_input = True  # x-hat is not elementwise in xp_t: XLA copies

    assert _whole_sequence_copies_in_loops(LayerNormInPlace()) != []
