"""The framework modules: ``jaxrnn.nnx.RNN`` (Flax NNX) and ``jaxrnn.equinox.RNN``.

Each is used as its framework's users would: inside a model (an embedding, the
module, a linear head) trained with the framework's optimizer, under its jit, grad
and vmap. In float64 the whole model's gradients with ``method="bptt"`` equal
``method="autodiff"`` (every cell, pairwise with the options), the outputs equal
``jaxrnn.RNN.features`` on the same weights and PyTorch's on a loaded
``state_dict``; the gradient's jaxpr shows the handwritten reverse scan.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import (LeakyElman, all_pairs, assert_trees_rel_close, scan_carries, scan_eqns,
                      weight_accumulating_scans)
import jaxrnn

nnx = pytest.importorskip("flax.nnx")
eqx = pytest.importorskip("equinox")
import jaxrnn.equinox  # noqa: E402
import jaxrnn.nnx  # noqa: E402

RTOL = 1e-10
V, D, H, O = 7, 3, 4, 2  # vocabulary, embedding, hidden, head sizes
F64 = jnp.float64


# --- the models, as a user writes them -----------------------------------------------

class NNXModel(nnx.Module):
    def __init__(self, rngs, param_dtype=jnp.float32, **rnn):
        self.embed = nnx.Embed(V, D, param_dtype=param_dtype, rngs=rngs)
        self.rnn = jaxrnn.nnx.RNN(rnn.pop("cell", "lstm"), D, H, param_dtype=param_dtype,
                                  rngs=rngs, **rnn)
        width = self.rnn.model.layer_output_size * self.rnn.model.num_directions
        self.head = nnx.Linear(width, O, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, tokens, seq_lengths=None):  # (B, T) -> (B, T, O)
        return self.head(self.rnn(self.embed(tokens), seq_lengths=seq_lengths))


class EqxModel(eqx.Module):
    embed: eqx.nn.Embedding
    rnn: jaxrnn.equinox.RNN
    head: eqx.nn.Linear

    def __init__(self, key, **rnn):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(V, D, key=k1)
        self.rnn = jaxrnn.equinox.RNN(rnn.pop("cell", "lstm"), D, H, key=k2, **rnn)
        width = self.rnn.stack.layer_output_size * self.rnn.stack.num_directions
        self.head = eqx.nn.Linear(width, O, key=k3)

    def __call__(self, tokens, length=None):  # (T,) -> (T, O)
        ys, _ = self.rnn(jax.vmap(self.embed)(tokens), length=length)
        return jax.vmap(self.head)(ys)


def tokens_and_targets(B=3, T=6, seed=1):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.randint(k1, (B, T), 0, V), jax.random.normal(k2, (B, T, O), F64)


def nnx_loss(model, tokens, targets, lengths=None):
    return jnp.mean((model(tokens, lengths) - targets) ** 2)


def eqx_loss(model, tokens, targets, lengths=None):
    if lengths is None:
        ys = jax.vmap(model)(tokens)
    else:
        ys = jax.vmap(model)(tokens, lengths)
    return jnp.mean((ys - targets) ** 2)


# --- training with the framework's optimizer ------------------------------------------

def test_nnx_model_trains_with_nnx_optimizer():
    model = NNXModel(nnx.Rngs(0), cell="lstm")
    optimizer = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
    tokens, targets = tokens_and_targets()
    targets = targets.astype(jnp.float32)

    @nnx.jit
    def step(model, optimizer, tokens, targets):
        loss, grads = nnx.value_and_grad(nnx_loss)(model, tokens, targets)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, tokens, targets)) for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0], losses
    model.eval()  # no dropout: two calls agree
    np.testing.assert_array_equal(model(tokens), model(tokens))


def test_equinox_model_trains_with_optax():
    model = EqxModel(jax.random.key(0), cell="lstm")
    optimizer = optax.adam(0.1)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    tokens, targets = tokens_and_targets()

    @eqx.filter_jit
    def step(model, opt_state, tokens, targets):
        loss, grads = eqx.filter_value_and_grad(eqx_loss)(model, tokens, targets)
        updates, opt_state = optimizer.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, loss

    losses = []
    for _ in range(8):
        model, opt_state, loss = step(model, opt_state, tokens, targets)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


# --- float64 gradients: bptt == autodiff, every cell pairwise with the options --------

# ordered so that the cheapest cells take the heaviest options (CASES cycles OPTIONS)
CELLS = ["elman", "lstm", "gru", "peephole_lstm", "layernorm_lstm", "lstm_proj", "indrnn",
         "user"]
# Every cell once, the framework and the options pairwise (all pairs with the cell
# would be 16 compiles: the cells' own grids are in test_family and test_open_cells;
# here the modules' wiring is under test).
FACTORS = {"framework": ["nnx", "equinox"], "bidirectional": [False, True],
           "num_layers": [1, 2], "lengths": [False, True]}
OPTIONS = all_pairs(FACTORS)
CASES = [dict(OPTIONS[i % len(OPTIONS)], cell=cell) for i, cell in enumerate(CELLS)]


def test_cases_cover_every_cell_and_every_pair_of_options():
    assert {c["cell"] for c in CASES} == set(CELLS)
    for a, b in itertools.combinations(FACTORS, 2):
        assert {(c[a], c[b]) for c in CASES} == set(itertools.product(FACTORS[a], FACTORS[b]))


def cell_options(cell: str) -> dict:
    if cell == "lstm_proj":
        return {"cell": "lstm", "proj_size": 3}
    return {"cell": LeakyElman() if cell == "user" else cell}


def model_and_loss(framework: str, method: str, **options):
    """The model (same weights whatever ``method``) and its loss function."""
    if framework == "nnx":
        return NNXModel(nnx.Rngs(0), param_dtype=F64, method=method, **options), nnx_loss
    return EqxModel(jax.random.key(0), method=method, **options), eqx_loss


def split(framework: str, model):
    """(arrays, rebuild): the model's arrays and the function that puts them back."""
    if framework == "nnx":
        graphdef, state = nnx.split(model)
        return state, lambda s: nnx.merge(graphdef, s)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return params, lambda p: eqx.combine(p, static)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_gradients_bptt_equal_autodiff(case):
    options = dict(cell_options(case["cell"]), bidirectional=case["bidirectional"],
                   num_layers=case["num_layers"])
    tokens, targets = tokens_and_targets()
    lengths = jnp.array([6, 2, 4]) if case["lengths"] else None
    fw = case["framework"]
    models = [model_and_loss(fw, method, **options) for method in ("bptt", "autodiff")]
    arrays, rebuilds = zip(*(split(fw, model) for model, _ in models))

    @jax.jit  # both gradients in one program: one compile
    def both(arrays):
        return [jax.grad(lambda a: loss(rebuild(a), tokens, targets, lengths))(a)
                for a, rebuild, (_, loss) in zip(arrays, rebuilds, models)]

    bptt, autodiff = both(arrays)
    # by path: the static method differs, so an Equinox tree's structure does
    assert_trees_rel_close(by_path(bptt), by_path(autodiff), RTOL)


def by_path(tree) -> dict:
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_same_key_same_weights_whatever_the_method():
    a = jaxrnn.equinox.RNN("gru", D, H, key=jax.random.key(3), method="bptt")
    b = jaxrnn.equinox.RNN("gru", D, H, key=jax.random.key(3), method="autodiff")
    assert_trees_rel_close(a.layers, b.layers, 0.0)
    c = jaxrnn.nnx.RNN("gru", D, H, method="bptt", rngs=nnx.Rngs(3))
    d = jaxrnn.nnx.RNN("gru", D, H, method="autodiff", rngs=nnx.Rngs(3))
    assert_trees_rel_close(nnx.state(c, nnx.Param), nnx.state(d, nnx.Param), 0.0)


# --- the outputs: jaxrnn.RNN.features on the same weights -----------------------------

def params_from_names(model: jaxrnn.RNN, named: dict) -> jaxrnn.RNNParams:
    """RNNParams from PyTorch-named arrays, read by the test, not by the module."""
    fields = {"weight_ih": "w_ih", "weight_hh": "w_hh", "bias_ih": "b_ih", "bias_hh": "b_hh",
              "weight_hr": "w_hr", "leak": "leak"}
    template = model.init(jax.random.key(0), F64)
    layers = []
    for l, dirs in enumerate(template.layers):
        sfx = [f"_l{l}", f"_l{l}_reverse"]
        layers.append(tuple(p._replace(**{f: named[k + sfx[d]] for k, f in fields.items()
                                          if k + sfx[d] in named})
                            for d, p in enumerate(dirs)))
    return jaxrnn.RNNParams(tuple(layers), template.readout)


@pytest.mark.parametrize("framework,cell", [("nnx", "lstm_proj"), ("equinox", "user")])
def test_outputs_equal_rnn_features(framework, cell):
    options = dict(cell_options(cell), num_layers=2, bidirectional=True)
    T, B = 5, 3
    xs = jax.random.normal(jax.random.key(1), (T, B, D), F64)
    lengths = jnp.array([5, 2, 4])
    if framework == "nnx":
        rnn = jaxrnn.nnx.RNN(options.pop("cell"), D, H, param_dtype=F64, rngs=nnx.Rngs(0),
                             **options)
        assert rnn.model.batch_first and rnn.model.output_size is None
        model = rnn.model.time_major()  # the reference reads time-major xs
        named = {k: v[...] for k, v in nnx.state(rnn, nnx.Param).items()}
        state = jax.tree.map(lambda s: s + 0.1, model.zero_state(B, F64))
        carry, ys = nnx.jit(lambda m, x, s, n: m(x, initial_carry=s, seq_lengths=n,
                                                 return_carry=True))(
            rnn, jnp.swapaxes(xs, 0, 1), state, lengths)
        ys = jnp.swapaxes(ys, 0, 1)
    else:
        rnn = jaxrnn.equinox.RNN(options.pop("cell"), D, H, key=jax.random.key(0), **options)
        model = rnn.stack
        assert model.output_size is None
        named = dict(zip(rnn.torch_names(), jax.tree.leaves(rnn.layers)))
        state = jax.tree.map(lambda s: s + 0.1, model.zero_state(B, F64))
        ys, carry = jax.jit(jax.vmap(lambda x, s, n: rnn(x, state=s, length=n),
                                     in_axes=(1, 1, 0), out_axes=(1, 1)))(xs, state, lengths)
    expected_ys, expected_state = jax.jit(model.features)(params_from_names(model, named), xs,
                                                          state, lengths)
    assert_trees_rel_close((ys, carry), (expected_ys, expected_state), 1e-14)


# --- PyTorch state_dicts ----------------------------------------------------------------

def test_nnx_loads_a_torch_lstm():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.LSTM(D, H, num_layers=2, bidirectional=True, batch_first=True).double()
    rnn = jaxrnn.nnx.RNN("lstm", D, H, num_layers=2, bidirectional=True, param_dtype=F64,
                         rngs=nnx.Rngs(0))
    rnn.load_torch(net.state_dict())
    x = np.random.default_rng(0).standard_normal((3, 5, D))
    (h, c), ys = nnx.jit(lambda m, x: m(x, return_carry=True))(rnn, x)
    with torch.no_grad():
        ys_t, (h_t, c_t) = net(torch.from_numpy(x))
    assert_trees_rel_close((ys, h, c), (ys_t.numpy(), h_t.numpy(), c_t.numpy()), RTOL)
    with pytest.raises(ValueError, match=r"rnn_state_dict .*missing keys \['weight_ih_l1'"):
        rnn.load_torch({k: v for k, v in net.state_dict().items() if k != "weight_ih_l1"})


def test_equinox_loads_a_torch_gru():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.GRU(D, H, num_layers=2).double()
    rnn = jaxrnn.equinox.RNN("gru", D, H, num_layers=2, key=jax.random.key(0))
    rnn = rnn.from_torch(net.state_dict())
    x = np.random.default_rng(0).standard_normal((5, D))
    ys, h = eqx.filter_jit(lambda m, x: m(x))(rnn, x)
    with torch.no_grad():
        ys_t, h_t = net(torch.from_numpy(x))  # unbatched: (T, D) -> (T, H), (L, H)
    assert_trees_rel_close((ys, h), (ys_t.numpy(), h_t.numpy()), RTOL)
    with pytest.raises(ValueError, match=r"rnn_state_dict\['weight_hh_l0'\] must have shape"):
        rnn.from_torch({**net.state_dict(), "weight_hh_l0": torch.zeros(2, 2)})


# --- reverse mode runs the handwritten reverse scan -------------------------------------

@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_reverse_mode_runs_the_handwritten_reverse_scan(framework):
    tokens, targets = tokens_and_targets(B=5, T=6)
    found = {}
    for method in ("bptt", "autodiff"):
        model, loss = model_and_loss(framework, method, cell="lstm")
        if framework == "nnx":
            graphdef, state = nnx.split(model)
            fn = jax.grad(lambda s: loss(nnx.merge(graphdef, s), tokens, targets))
            jaxpr = jax.make_jaxpr(fn)(state)
        else:
            params, static = eqx.partition(model, eqx.is_inexact_array)
            fn = jax.grad(lambda p: loss(eqx.combine(p, static), tokens, targets))
            jaxpr = jax.make_jaxpr(fn)(params)
        found[method] = weight_accumulating_scans(jaxpr, batch=5)
    assert found["bptt"] == []
    assert (H, 4 * H) in found["autodiff"] or (4 * H, H) in found["autodiff"], found


def scan_carry_shapes(closed_jaxpr) -> list:
    """The shapes of every ``lax.scan``'s carry, nested jaxprs included."""
    return [v.aval.shape for eqn in scan_eqns(closed_jaxpr) for v in scan_carries(eqn)]


def test_vmap_over_examples_runs_one_layer_over_all_of_them():
    """``jax.vmap`` of the Equinox module over 5 sequences: the layer's scans carry
    (5, H), one layer over all the rows (the hijax batch rule folds the mapped axis
    into the batch), not 5 per-example layers carrying (5, 1, H); per-example
    gradients (``vmap`` of ``grad``) still equal autodiff's."""
    rnn = jaxrnn.equinox.RNN("lstm", D, H, num_layers=2, dtype=F64, key=jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (5, 6, D), F64)
    lengths = jnp.array([6, 2, 4, 1, 5])
    params, static = eqx.partition(rnn, eqx.is_inexact_array)

    def loss(p, xs, lengths):
        ys, (h, c) = jax.vmap(lambda x, n: eqx.combine(p, static)(x, length=n))(xs, lengths)
        return jnp.sum(jnp.sin(ys)) + jnp.sum(c ** 2)

    shapes = scan_carry_shapes(jax.make_jaxpr(jax.grad(loss))(params, xs, lengths))
    assert (5, H) in shapes and not [s for s in shapes if s[-2:] == (1, H)], shapes
    rnn_auto = jaxrnn.equinox.RNN("lstm", D, H, num_layers=2, dtype=F64, method="autodiff",
                                  key=jax.random.key(0))
    per_example = {}
    for name, model in (("bptt", rnn), ("autodiff", rnn_auto)):
        p, st = eqx.partition(model, eqx.is_inexact_array)
        one = lambda p, x, n: loss_one(eqx.combine(p, st), x, n)  # noqa: E731
        per_example[name] = jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0, 0)))(
            p, xs, lengths).layers  # (5, ...) each: one gradient per example
    assert_trees_rel_close(per_example["bptt"], per_example["autodiff"], RTOL)


def loss_one(model, x, n):
    ys, (h, c) = model(x, length=n)
    return jnp.sum(jnp.sin(ys)) + jnp.sum(c ** 2)


# --- ensembles by vmap -------------------------------------------------------------------

def test_nnx_ensemble_by_vmap_equals_each_member():
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(rngs):
        return jaxrnn.nnx.RNN("gru", D, H, rngs=rngs)

    ensemble = create(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, D))
    ys = nnx.vmap(lambda m, x: m(x), in_axes=(0, None))(ensemble, x)
    assert ys.shape == (3, 2, 5, H)
    graphdef, state = nnx.split(ensemble)
    run = nnx.jit(lambda m, x: m(x))
    for i in range(3):
        member = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
        np.testing.assert_allclose(ys[i], run(member, x), rtol=1e-6, atol=1e-6)
    assert not np.allclose(ys[0], ys[1])


def test_equinox_ensemble_by_filter_vmap_equals_each_member():
    keys = jax.random.split(jax.random.key(0), 3)
    ensemble = eqx.filter_vmap(lambda k: jaxrnn.equinox.RNN("gru", D, H, key=k))(keys)
    x = jax.random.normal(jax.random.key(1), (5, D), F64)
    ys, hs = eqx.filter_vmap(lambda m: m(x))(ensemble)
    assert ys.shape == (3, 5, H)
    run = eqx.filter_jit(lambda m, x: m(x))
    for i, k in enumerate(keys):
        member_ys, member_h = run(jaxrnn.equinox.RNN("gru", D, H, key=k), x)
        assert_trees_rel_close((ys[i], hs[i]), (member_ys, member_h), 1e-12)


# --- dropout, as nnx.Dropout --------------------------------------------------------------

def test_nnx_dropout_follows_train_and_eval():
    x = jax.random.normal(jax.random.key(1), (2, 5, D))
    rnn = jaxrnn.nnx.RNN("elman", D, H, num_layers=2, dropout=0.5, rngs=nnx.Rngs(0))
    run = nnx.jit(lambda m, x, deterministic: m(x, deterministic=deterministic),
                  static_argnums=2)
    a, b = run(rnn, x, None), run(rnn, x, None)  # training by default: a fresh mask per call
    assert not np.allclose(a, b)
    c = run(rnn, x, True)
    rnn.eval()
    np.testing.assert_array_equal(c, run(rnn, x, None))
    assert not np.allclose(c, run(rnn, x, False))


# --- mixed precision: the modules' compute dtype is jaxrnn.RNN's -----------------------------

def test_modules_compute_dtype_is_the_library_policy():
    """NNX's ``dtype`` and Equinox's ``compute_dtype`` run ``RNN(compute_dtype=...)``:
    the same outputs bit for bit, float32 weights, outputs and state, float32 gradients."""
    x = jax.random.normal(jax.random.key(1), (2, 5, D), jnp.float32)
    rnn = jaxrnn.nnx.RNN("gru", D, H, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    eq = jaxrnn.equinox.RNN("gru", D, H, dtype=jnp.float32, compute_dtype=jnp.bfloat16,
                            key=jax.random.key(0))
    lib = jaxrnn.RNN(cell="gru", input_size=D, hidden_size=H, output_size=None,
                     compute_dtype=jnp.bfloat16)
    f32_lib = jaxrnn.RNN(cell="gru", input_size=D, hidden_size=H, output_size=None)
    for layers, out in [(rnn.layers(), rnn(x)),
                        (eq.layers, jax.vmap(lambda xi: eq(xi)[0])(x))]:
        params = jaxrnn.RNNParams(layers, None)
        assert {a.dtype for a in jax.tree.leaves(layers)} == {jnp.dtype(jnp.float32)}
        want = jnp.swapaxes(lib.apply(params, jnp.swapaxes(x, 0, 1))[0], 0, 1)
        assert out.dtype == jnp.float32
        np.testing.assert_array_equal(out, want)
        # and not the float32 computation: the policy is on
        assert not np.array_equal(out, jnp.swapaxes(
            f32_lib.apply(params, jnp.swapaxes(x, 0, 1))[0], 0, 1))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(rnn)
    assert {a.dtype for a in jax.tree.leaves(nnx.state(grads, nnx.Param))} == {
        jnp.dtype(jnp.float32)}


# --- errors name the argument ----------------------------------------------------------------

def test_errors_name_the_argument():
    rnn = jaxrnn.nnx.RNN("lstm", D, H, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"inputs must have shape \(B, T, in_features=3\) "
                                         r".*got shape \(5, 3\)"):
        rnn(jnp.ones((5, 3)))
    with pytest.raises(ValueError, match=r"inputs must have shape .*got shape \(2, 5, 4\)"):
        rnn(jnp.ones((2, 5, 4)))
    with pytest.raises(ValueError, match=r"seq_lengths must have shape \(B,\) = \(2,\), "
                                         r"got shape \(3,\)$"):
        rnn(jnp.ones((2, 5, 3)), seq_lengths=jnp.array([5, 5, 5]))
    with pytest.raises(ValueError, match=r"seq_lengths must lie in \[1, T=5\], got values in "
                                         r"\[0, 5\]"):
        rnn(jnp.ones((2, 5, 3)), seq_lengths=jnp.array([5, 0]))
    with pytest.raises(ValueError, match=r"initial_carry of an LSTM must be a pair \(h0, c0\)"):
        rnn(jnp.ones((2, 5, 3)), initial_carry=jnp.zeros((1, 2, H)))
    with pytest.raises(ValueError, match=r"initial_carry\[1\] must have shape "
                                         r"\(num_layers\*num_directions, B, hidden_size\) = "
                                         r"\(1, 2, 4\), got shape \(1, 5, 4\)$"):
        rnn(jnp.ones((2, 5, 3)), initial_carry=(jnp.zeros((1, 2, H)), jnp.zeros((1, 5, H))))
    with pytest.raises(TypeError, match=r"dtype=float64 is wider than the parameters' dtype "
                                        r"float32"):
        jaxrnn.nnx.RNN("lstm", D, H, dtype=jnp.float64, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"method must be one of"):
        jaxrnn.nnx.RNN("lstm", D, H, method="rtrl", rngs=nnx.Rngs(0))
    eq = jaxrnn.equinox.RNN("gru", D, H, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"x must have shape \(T, input_size=3\), one sequence "
                                         r"\(jax.vmap .*got shape \(2, 5, 3\)"):
        eq(jnp.ones((2, 5, 3)))
    with pytest.raises(ValueError, match=r"x must have shape .*got shape \(5, 2\)"):
        eq(jnp.ones((5, 2)))
    with pytest.raises(ValueError, match=r"state must have shape \(num_layers\*num_directions, "
                                         r"hidden_size\) = \(1, 4\), got shape \(1, 1, 4\)"):
        eq(jnp.ones((5, 3)), state=jnp.zeros((1, 1, H)))
    with pytest.raises(TypeError, match=r"length must be an integer array"):
        eq(jnp.ones((5, 3)), length=2.0)
    with pytest.raises(ValueError, match=r"length must be a scalar \(one sequence's length\), "
                                         r"got shape \(1,\)"):
        eq(jnp.ones((5, 3)), length=jnp.array([2]))
    with pytest.raises(ValueError, match=r"length must lie in \[1, T=5\], got values in \[6, 6\]"):
        eq(jnp.ones((5, 3)), length=6)
    with pytest.raises(ValueError, match=r"proj_size"):
        jaxrnn.equinox.RNN("gru", D, H, proj_size=2, key=jax.random.key(0))
