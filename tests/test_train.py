"""The jit-compiled optax train step, and the training loop over it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_trees_rel_close
from jaxrnn import RNN, Batch, make_optimizer, make_train_step, train_loop


def problem(dtype, seed=0, T=12, B=4):
    model = RNN(cell="elman", input_size=2, hidden_size=8, output_size=1)
    k = jax.random.split(jax.random.key(seed), 2)
    xs = jax.random.normal(k[0], (T, B, 2), dtype)
    targets = jnp.cumsum(xs[..., :1], axis=0) / 4  # a running sum: needs the recurrence
    return model, model.init(k[1], dtype), Batch(xs, targets)


@pytest.mark.parametrize("method", ["bptt", "autodiff"])
def test_train_step_lowers_the_loss(method):
    model, params, batch = problem(jnp.float32)
    opt = optax.adam(1e-2)
    step = make_train_step(model, opt, loss="mse", method=method)
    opt_state = opt.init(params)
    losses = []
    for _ in range(60):
        params, opt_state, m = step(params, opt_state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert all(jnp.isfinite(jnp.array(losses)))


def test_both_methods_give_the_same_parameters_after_several_steps():
    model, params, batch = problem(jnp.float64)
    opt = optax.sgd(0.05, momentum=0.9)
    results = {}
    for method in ("bptt", "autodiff"):
        step = make_train_step(model, opt, loss="half_sse", method=method, donate=False)
        p, s = params, opt.init(params)
        for _ in range(5):
            p, s, _ = step(p, s, batch)
        results[method] = p
    assert_trees_rel_close(results["bptt"], results["autodiff"], 1e-10)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), results["bptt"], params)
    assert min(jax.tree.leaves(moved)) > 1e-4  # every parameter actually trained


def test_train_step_with_lengths_and_xent():
    model = RNN(cell="elman", input_size=3, hidden_size=6, output_size=4)
    k = jax.random.split(jax.random.key(1), 3)
    xs = jax.random.normal(k[0], (9, 5, 3), jnp.float32)
    batch = Batch(xs, jax.random.randint(k[1], (9, 5), 0, 4), jnp.array([9, 3, 1, 5, 9]))
    params = model.init(k[2])
    opt = make_optimizer("adam", 1e-2, clip=1.0)
    step = make_train_step(model, opt, loss="xent")
    s = opt.init(params)
    first = None
    for _ in range(40):
        params, s, m = step(params, s, batch)
        first = first if first is not None else float(m["loss"])
    assert float(m["loss"]) < first


def test_donated_buffers_are_consumed():
    model, params, batch = problem(jnp.float32)
    opt = optax.sgd(0.1)
    step = make_train_step(model, opt, loss="mse")
    opt_state = opt.init(params)
    new_params, _, _ = step(params, opt_state, batch)
    assert jax.tree.structure(new_params) == jax.tree.structure(params)
    deleted = [x.is_deleted() for x in jax.tree.leaves(params)]
    if jax.default_backend() != "cpu" or any(deleted):
        assert all(deleted)


def test_train_loop_stops_at_target_loss_and_reports_compile_time():
    model, params, batch = problem(jnp.float32)
    opt = optax.adam(1e-2)
    step = make_train_step(model, opt, loss="mse")
    res = train_loop(step, params, opt.init(params), batch, 5000, target_loss=0.05,
                     progress=False)
    assert res.status == "target"
    assert res.history[-1]["loss"] <= 0.05 < res.history[0]["loss"]
    assert res.history[-1]["step"] < 5000
    assert res.compile_s > 0 and res.steps_per_s > 0
    assert [h["step"] for h in res.history] == list(range(1, len(res.history) + 1))


def test_train_loop_names_the_step_where_the_loss_became_nan():
    model, params, batch = problem(jnp.float32)
    bad = Batch(batch.xs, batch.targets.at[0, 0, 0].set(jnp.nan))
    opt = optax.sgd(0.1)
    step = make_train_step(model, opt, loss="mse")
    res = train_loop(step, params, opt.init(params), bad, 10, progress=False)
    assert res.status == "nonfinite" and res.first_bad == 1 and res.step == 1
    assert res.history == []


@pytest.mark.parametrize("kw, match", [
    (dict(name="nosuchopt"), "optimizer must name an optax optimizer"),
    (dict(name="adam", lr=-1.0), "lr must be > 0"),
    (dict(name="adam", clip=0.0), "clip must be > 0"),
    (dict(name="tree"), "optimizer"),
])
def test_make_optimizer_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(**kw)


def test_make_train_step_errors():
    model, params, batch = problem(jnp.float32)
    with pytest.raises(ValueError, match="method must be one of"):
        make_train_step(model, optax.sgd(0.1), method="forward")
    with pytest.raises(ValueError, match="loss must be one of"):
        make_train_step(model, optax.sgd(0.1), loss="hinge")
    step = make_train_step(model, optax.sgd(0.1), loss="mse")
    with pytest.raises(ValueError, match="xs must have shape"):
        step(params, optax.sgd(0.1).init(params), Batch(batch.xs[..., :1], batch.targets))


@pytest.mark.parametrize("cell", ["elman", "lstm", "gru"])
def test_every_cell_trains_with_every_option(cell):
    """Two layers, two directions, dropout, lengths: the loss falls under method="bptt"."""
    model = RNN(cell=cell, input_size=2, hidden_size=8, output_size=1, num_layers=2,
                bidirectional=True, dropout=0.1)
    k = jax.random.split(jax.random.key(2), 3)
    xs = jax.random.normal(k[0], (10, 6, 2), jnp.float32)
    targets = jnp.cumsum(xs[..., :1], axis=0) / 4
    batch = Batch(xs, targets, jnp.array([10, 7, 3, 1, 10, 5]))
    params = model.init(k[1])
    opt = optax.adam(1e-2)
    step = make_train_step(model, opt, loss="mse", method="bptt")
    s = opt.init(params)
    losses = []
    for i in range(80):
        params, s, m = step(params, s, batch, jax.random.fold_in(k[2], i))
        losses.append(float(m["loss"]))
    assert np.mean(losses[-5:]) < 0.5 * losses[0]


# --- clip_recurrent: the IndRNN's |u| <= r as a projection in the optax chain --------

def test_clip_recurrent_projects_w_hh_and_leaves_the_rest_to_the_optimizer():
    from jaxrnn import IndRNN
    from jaxrnn._src.train import clip_recurrent

    r = 2.0 ** (1 / 10)
    model = RNN(cell=IndRNN("relu", recurrent_max=r), input_size=2, hidden_size=6,
                output_size=1, num_layers=2)
    params = model.init(jax.random.key(0), jnp.float64)
    grads = jax.tree.map(lambda p: jnp.linspace(-3.0, 3.0, p.size).reshape(p.shape), params)
    plain = optax.sgd(0.5)  # steps of up to 1.5: most of u leaves [-r, r]
    chained = optax.chain(plain, clip_recurrent(r))

    @jax.jit
    def both(params, grads):  # one compile for the two optimizers
        want = optax.apply_updates(params, plain.update(grads, plain.init(params), params)[0])
        updates, _ = chained.update(grads, chained.init(params), params)
        return want, optax.apply_updates(params, updates)

    want, got = both(params, grads)
    for lw, lg in zip(want.layers, got.layers):
        (pw,), (pg,) = lw, lg
        u = np.asarray(pw.w_hh)
        assert np.any(np.abs(u) > r), "the test needs updates that leave the bound"
        np.testing.assert_allclose(np.asarray(pg.w_hh), np.clip(u, -r, r), rtol=0, atol=4e-16)
        for name in ("w_ih", "b_ih", "b_hh"):  # untouched by the projection
            np.testing.assert_array_equal(getattr(pg, name), getattr(pw, name))
    np.testing.assert_array_equal(got.readout.weight, want.readout.weight)
    with pytest.raises(ValueError, match="needs params"):
        chained.update(grads, chained.init(params))
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="max_abs must be a finite number > 0"):
            clip_recurrent(bad)
