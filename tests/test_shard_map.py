"""``jax.shard_map`` with its default checks (``check_vma=True``) over a data axis.

Inside ``shard_map`` the batch is split over the mesh axis ``"data"`` and the
parameters are replicated. The handwritten BPTT must then return gradients of
exactly ``method="autodiff"``'s types (a replicated parameter's gradient does not
vary over ``"data"``) and values (the sum of every shard's term, as JAX's own
transpose gives it), and the default zero state must work without marking.

The test process has one CPU device; the checks run in subprocesses with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` running this file as a
script (``_worker``), one on a mesh of 2 devices and one on 4, which print their
results as JSON for the tests below.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrnn import RNN, Batch, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, B, D, H, O = 5, 8, 3, 6, 2  # T=5 with bptt_segment=2 pads the last segment
TOL = 1e-10
STEPS = 3


# --- the worker: runs in the 4-device subprocess -------------------------------------

def _data(seed: int):
    """xs (T, B, D), targets (T, B, O), lengths (B,): float64 numpy."""
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((T, B, D))
    return xs, np.cumsum(xs[..., :O], axis=0) / 4, np.array([5, 2, 4, 1, 5, 3, 5, 2], np.int32)


def _rel_err(actual, expected) -> float:
    """Max over leaves of max|a - e| / max|e|, after checking structure, shapes and dtypes."""
    la, ta = jax.tree.flatten(actual)
    le, te = jax.tree.flatten(expected)
    assert ta == te, (ta, te)
    worst = 0.0
    for a, e in zip(la, le):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, e.shape, a.dtype, e.dtype)
        err = float(np.max(np.abs(a - e)) / max(float(np.max(np.abs(e))), 1e-300))
        worst = max(worst, err if np.all(np.isfinite(a)) else float("inf"))
    return worst


def _types(tree) -> list[str]:
    """Each leaf's type with its varying axes, as JAX prints it: ``float64[6,3]{V:data}``."""
    return [str(jax.typeof(leaf)) for leaf in jax.tree.leaves(tree)]


def _gradients(mesh, model, loss, xs, ys, lengths, state=None):
    """bptt's and autodiff's loss and gradients inside ``shard_map``, and the full batch's.

    Inside, each shard computes ``model.loss_and_grad`` on its B/n sequences; the
    loss is combined as a user would (``pmean`` of a mean loss, ``psum`` of a sum)
    and the gradients come back already summed over the shards (replicated
    params), so the mean loss's are divided by n. With ``state``, the gradient is
    taken with respect to ``(params, state)`` through ``model.loss``.
    """
    n = mesh.shape["data"]
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    specs = (P(), P(None, "data"), P(None, "data"), P("data"))
    args = [put(model_params(model), specs[0]), put(xs, specs[1]), put(ys, specs[2]),
            put(lengths, specs[3])]
    if state is not None:
        specs += (P(),)  # a learned initial state (H,), replicated as the params are
        args.append(put(state, P()))
    types = {}

    def local(method, params, x, y, n_, *st):
        if st:  # d/d(params, h0) of the local loss, every sequence starting from h0
            value, grads = jax.value_and_grad(
                lambda p, h0: model.loss(p, x, y, loss=loss, method=method,
                                         state=_broadcast(h0, x), lengths=n_),
                argnums=(0, 1))(params, st[0])
        else:
            value, grads = model.loss_and_grad(params, x, y, loss=loss, method=method,
                                               lengths=n_)
        types[method] = _types(grads)
        if loss == "mse":  # a mean over the local batch: the batch's mean is their mean
            return jax.lax.pmean(value, "data"), jax.tree.map(lambda g: g / n, grads)
        return jax.lax.psum(value, "data"), grads

    def both(*a):
        return {m: local(m, *a) for m in ("bptt", "autodiff")}

    out = jax.jit(jax.shard_map(both, mesh=mesh, in_specs=specs, out_specs=P()))(*args)
    full_args = [model_params(model), jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(lengths)]
    if state is None:
        full = jax.jit(lambda p, x, y, n_: model.loss_and_grad(
            p, x, y, loss=loss, method="autodiff", lengths=n_))(*full_args)
    else:
        full = jax.jit(jax.value_and_grad(lambda p, h0, x, y, n_: model.loss(
            p, x, y, loss=loss, method="autodiff", state=_broadcast(h0, x), lengths=n_),
            argnums=(0, 1)))(full_args[0], jnp.asarray(state), *full_args[1:])
    return {"bptt_vs_autodiff": _rel_err(out["bptt"], out["autodiff"]),
            "bptt_vs_full": _rel_err(out["bptt"], full),
            "autodiff_vs_full": _rel_err(out["autodiff"], full),
            "types_bptt": types["bptt"], "types_autodiff": types["autodiff"]}


def _broadcast(h0, xs):
    """A one-layer GRU's state (1, B, H): the same learned ``h0 (H,)`` for every sequence."""
    return jnp.broadcast_to(h0, (1, xs.shape[1], h0.shape[0]))


def model_params(model):
    return model.init(jax.random.key(0), dtype=jnp.float64)


def _train(mesh, model):
    """A hand-written train step with optax inside ``shard_map`` vs ``make_train_step``.

    The mean loss is ``pmean``-ed inside the differentiated function (as JAX's
    shard_map guide writes data parallelism), so its gradient is the batch's.
    """
    opt = optax.adam(1e-2)
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731

    def local_step(params, opt_state, x, y, n_):
        def loss(p):
            return jax.lax.pmean(model.loss(p, x, y, loss="mse", lengths=n_), "data")

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    step = jax.jit(jax.shard_map(
        local_step, mesh=mesh, in_specs=(P(), P(), P(None, "data"), P(None, "data"), P("data")),
        out_specs=P()))
    params = model_params(model)
    p, s = put(params, P()), put(opt.init(params), P())
    q, r = params, opt.init(params)
    reference = make_train_step(model, opt, loss="mse", method="bptt", donate=False)
    losses, ref_losses = [], []
    for i in range(STEPS):
        x, y, _ = _data(10 + i)
        n_ = np.full((B,), T, np.int32)  # full length: each shard's mean has as many terms
        p, s, value = step(p, s, put(x, P(None, "data")), put(y, P(None, "data")),
                           put(n_, P("data")))
        q, r, metrics = reference(q, r, Batch(jnp.asarray(x), jnp.asarray(y), jnp.asarray(n_)))
        losses.append(float(value))
        ref_losses.append(float(metrics["loss"]))
    return {"params_vs_single": _rel_err(p, q), "losses": losses, "ref_losses": ref_losses,
            "replicated": all(a.sharding.is_fully_replicated for a in jax.tree.leaves(p))}


def _worker(n: int) -> dict:
    """The checks on a mesh of ``n`` devices (of the 4 the subprocess has)."""
    jax.config.update("jax_enable_x64", True)
    mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
    xs, ys, lengths = _data(0)
    full = np.full((B,), T, np.int32)
    lstm = RNN(cell="lstm", input_size=D, hidden_size=H, output_size=O)
    deep = RNN(cell="lstm", input_size=D, hidden_size=H, output_size=O, num_layers=2,
               bidirectional=True)
    out = {"device_count": jax.device_count(), "mesh_size": mesh.size,
           "lstm": _gradients(mesh, lstm, "mse", xs, ys, full)}  # the default zero state
    if n == 2:  # the two workers' shares of the cases balanced, as they run in parallel
        gru = RNN(cell="gru", input_size=D, hidden_size=H, output_size=O)
        state = np.random.default_rng(1).standard_normal(H) / 2
        out["state"] = _gradients(mesh, gru, "half_sse", xs, ys, lengths, state=state)
        lean = RNN(cell="lstm", input_size=D, hidden_size=H, output_size=O, bptt_segment=2)
        out["lean"] = _gradients(mesh, lean, "half_sse", xs, ys, lengths)
    else:
        deep = RNN(cell="lstm", input_size=D, hidden_size=H, output_size=O, num_layers=2,
                   bidirectional=True)
        out["deep"] = _gradients(mesh, deep, "half_sse", xs, ys, lengths)
        out["train"] = _train(mesh, lstm)
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(_worker(int(sys.argv[1]))))


# --- the tests (this process) ----------------------------------------------------------

def _run_worker(n: int) -> dict:
    """The worker's results for a mesh of ``n`` devices, from a subprocess with four."""
    from conftest import xla_flags

    env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=4"),
           "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(n)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["device_count"] == 4 and out["mesh_size"] == n
    return out


def _check_gradients(r: dict, case: str) -> None:
    """bptt == autodiff == the full batch (float64), with autodiff's types; replicated
    params' gradients (and a replicated state's) do not vary over the data axis."""
    g = r[case]
    assert g["bptt_vs_autodiff"] <= TOL, (case, g)
    assert g["bptt_vs_full"] <= TOL, (case, g)
    assert g["autodiff_vs_full"] <= TOL, (case, g)
    assert g["types_bptt"] == g["types_autodiff"], (case, g)
    assert g["types_bptt"] and not any("V:" in t for t in g["types_bptt"]), (case, g)
    assert all(t.startswith("float64[") for t in g["types_bptt"]), (case, g)


# One test per mesh size, each one subprocess (the two run in parallel under xdist).
def test_shard_map_on_two_devices():
    """lstm: the default zero state, mse; state: a GRU started from a learned,
    replicated h0, differentiated too; lean: bptt_segment=2 (T=5: a padded segment)."""
    r = _run_worker(2)
    for case in ("lstm", "state", "lean"):
        _check_gradients(r, case)
    # the GRU's params (4 leaves and the readout's 2) and h0's gradient, not varying
    assert len(r["state"]["types_bptt"]) == 7
    assert r["state"]["types_bptt"][-1] == f"float64[{H}]"


def test_shard_map_on_four_devices():
    """lstm as on two; deep: 2 bidirectional layers with lengths; train: a hand-written
    optax step inside shard_map == make_train_step on the whole batch."""
    r = _run_worker(4)
    for case in ("lstm", "deep"):
        _check_gradients(r, case)
    t = r["train"]
    assert t["params_vs_single"] <= 1e-9
    np.testing.assert_allclose(t["losses"], t["ref_losses"], rtol=1e-12)
    assert t["losses"][-1] < t["losses"][0]
    assert t["replicated"]


# --- one device (this process): outside shard_map nothing is added --------------------

@pytest.mark.parametrize("segment", [None, 2])
def test_casts_and_sums_only_inside_shard_map(segment):
    """Inside shard_map (a 1-device mesh here) the bptt gradient casts the state to
    varying and sums the weight gradients; outside, neither appears in the program."""
    model = RNN(cell="peephole_lstm", input_size=D, hidden_size=H, output_size=O,
                bptt_segment=segment)
    params = model_params(model)
    xs, ys, lengths = (jnp.asarray(a) for a in _data(0))
    grad = lambda p, x, y, n_: model.loss_and_grad(p, x, y, lengths=n_)[1]  # noqa: E731
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    inside = jax.shard_map(grad, mesh=mesh, in_specs=(P(), P(None, "data"), P(None, "data"),
                                                      P("data")), out_specs=P())
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    jaxpr_in = str(jax.make_jaxpr(inside)(put(params, P()), put(xs, P(None, "data")),
                                          put(ys, P(None, "data")), put(lengths, P("data"))))
    jaxpr_out = str(jax.make_jaxpr(grad)(params, xs, ys, lengths))
    for name in ("pvary", "psum"):
        assert name in jaxpr_in
        assert name not in jaxpr_out
