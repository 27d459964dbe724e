"""Data-parallel training over a device mesh (``jaxrnn_app.sharding``).

The test process has one CPU device; the multi-device checks run once, in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``, which
prints its results as JSON for the tests below to check.
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

from conftest import assert_trees_rel_close, xla_flags
from jaxrnn import RNN, Batch, make_train_step, train_loop
from jaxrnn_app.sharding import (choose_devices, make_mesh, make_sharded_train_step, replicate,
                             shard_batch)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20

FOUR_DEVICES = r'''
import json
import jax, jax.numpy as jnp, numpy as np, optax
import jaxrnn
from jaxrnn import make_train_step
from jaxrnn_app.sharding import (choose_devices, make_mesh, make_sharded_train_step, replicate,
                             shard_batch)

STEPS = %(steps)d
T, B = 10, 8
out = {"device_count": jax.device_count()}
mesh = make_mesh(4)
lengths = np.array([10, 3, 7, 10, 1, 5, 9, 10], np.int32)

def batch_at(i, loss, batch=B):
    """A different batch at every step (numpy: no eager JAX ops to compile)."""
    rng = np.random.default_rng(i)
    xs = rng.standard_normal((T, batch, 3), np.float32)
    if loss == "xent":
        classes = (np.cumsum(xs[..., 0], axis=0) > 0).astype(np.int32)  # sign of a running sum
        return jaxrnn.Batch(xs, classes, lengths[:batch])
    return jaxrnn.Batch(xs, np.cumsum(xs[..., :2], axis=0) / 4, lengths[:batch])

def leaves(tree):
    return [np.asarray(x).tolist() for x in jax.tree.leaves(tree)]

def sharding_facts(x):
    return {"spec": list(x.sharding.spec), "devices": len(x.sharding.device_set),
            "replicated": bool(x.sharding.is_fully_replicated),
            "shards": [list(s.data.shape) for s in x.addressable_shards]}

def run(model, loss, method, key=None):
    opt = optax.adam(1e-2)
    params = model.init(jax.random.key(0))
    step = make_train_step(model, opt, loss=loss, method=method, donate=False)
    sstep = make_sharded_train_step(model, opt, mesh, loss=loss, method=method)
    p, s = params, opt.init(params)
    ps, ss = replicate((params, opt.init(params)), mesh)
    skey = None if key is None else replicate(key, mesh)
    single, sharded = [], []
    for i in range(STEPS):
        k = None if key is None else jax.random.fold_in(key, i)
        sk = None if key is None else jax.random.fold_in(skey, i)
        p, s, m = step(p, s, batch_at(i, loss), k)
        ps, ss, ms = sstep(ps, ss, shard_batch(batch_at(i, loss), mesh), key=sk)
        single.append(float(m["loss"]))
        sharded.append(float(ms["loss"]))
    res = {"single_losses": single, "sharded_losses": sharded,
           "single_params": leaves(p), "sharded_params": leaves(ps),
           "params_intact": not any(x.is_deleted() for x in jax.tree.leaves(params))}
    return res, (ps, ss, ms, sstep)

# Dropout acts only when a key is passed: the bptt run has none, the autodiff run one.
lstm = jaxrnn.RNN(cell="lstm", input_size=3, hidden_size=16, output_size=2, num_layers=2,
                  dropout=0.3)
out["bptt"], (ps, ss, ms, sstep) = run(lstm, "mse", "bptt")
out["autodiff"], _ = run(lstm, "xent", "autodiff", key=jax.random.key(7))

batch = shard_batch(batch_at(0, "mse"), mesh)
out["params"] = [sharding_facts(x) for x in jax.tree.leaves(ps)]
out["opt_state"] = [sharding_facts(x) for x in jax.tree.leaves(ss)]
out["metrics"] = [sharding_facts(x) for x in jax.tree.leaves(ms)]
out["batch"] = {name: sharding_facts(getattr(batch, name))
                for name in ("xs", "targets", "lengths")}
xent_batch = shard_batch(batch_at(0, "xent"), mesh)
out["xent_targets"] = sharding_facts(xent_batch.targets)
hlo = sstep.lower(ps, ss, batch, key=None).compile().as_text()  # cached: same call
out["hlo"] = {"all_reduce": hlo.count("all-reduce"), "all_gather": hlo.count("all-gather")}

local = shard_batch(batch_at(0, "mse"), mesh, process_local=True)
out["process_local"] = {
    "same_values": all(bool(jnp.array_equal(a, b)) for a, b in
                       zip(jax.tree.leaves(local), jax.tree.leaves(batch))),
    "same_shardings": all(a.sharding == b.sharding for a, b in
                          zip(jax.tree.leaves(local), jax.tree.leaves(batch)))}

def error(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None

out["errors"] = {
    "make_mesh_5": error(lambda: make_mesh(5)),
    "shard_batch_6": error(lambda: shard_batch(batch_at(0, "mse", batch=6), mesh)),
    "step_batch_6": error(lambda: sstep(ps, ss, batch_at(0, "mse", batch=6))),
    "choose_3_of_8": error(lambda: choose_devices(3, 8)),
    "choose_5_of_10": error(lambda: choose_devices(5, 10)),
}
out["choose"] = {"none_6": choose_devices(None, 6), "none_8": choose_devices(None, 8),
                 "none_7": choose_devices(None, 7), "none_2": choose_devices(None, 2),
                 "two_6": choose_devices(2, 6)}
out["mesh_sizes"] = [make_mesh().size, make_mesh(3).size]
print("RESULT " + json.dumps(out))
''' % {"steps": STEPS}


@pytest.fixture(scope="module")
def four():
    """Results of the 4-device subprocess."""
    env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=4"),
           "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", FOUR_DEVICES], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["device_count"] == 4
    return out


# --- four devices ------------------------------------------------------------
@pytest.mark.parametrize("run", ["bptt", "autodiff"])
def test_sharded_training_matches_single_device(four, run):
    """bptt with mse and lengths; autodiff with xent, lengths and a dropout key per step."""
    r = four[run]
    single, sharded = np.array(r["single_losses"]), np.array(r["sharded_losses"])
    assert single.shape == sharded.shape == (STEPS,)
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    assert single[-1] < single[0]  # it trained
    assert len(r["sharded_params"]) == len(r["single_params"])
    for a, e in zip(r["sharded_params"], r["single_params"]):
        np.testing.assert_allclose(np.array(a), np.array(e), rtol=1e-4, atol=1e-6)
    assert r["params_intact"]  # replicate copied, so donation left the originals alone


def test_params_and_opt_state_stay_replicated_on_four_devices(four):
    for facts in four["params"] + four["opt_state"] + four["metrics"]:
        assert facts["devices"] == 4
        assert facts["replicated"]
        assert len(facts["shards"]) == 4
    assert len(four["params"]) == 2 * 4 + 2  # 2 layers x (w_ih, w_hh, b_ih, b_hh) + readout
    assert all(f["spec"] == [] for f in four["params"] + four["metrics"])  # PartitionSpec()


def test_batch_is_split_along_the_batch_axis(four):
    b = four["batch"]
    assert b["xs"]["spec"] == b["targets"]["spec"] == [None, "data"]
    assert b["xs"]["shards"] == [[10, 2, 3]] * 4  # (T, B/4, D) per device
    assert b["targets"]["shards"] == [[10, 2, 2]] * 4
    assert b["lengths"]["spec"] == ["data"]
    assert b["lengths"]["shards"] == [[2]] * 4
    assert four["xent_targets"]["shards"] == [[10, 2]] * 4  # (T, B) class targets
    assert all(not f["replicated"] and f["devices"] == 4 for f in b.values())
    assert four["process_local"] == {"same_values": True, "same_shardings": True}


def test_compiled_step_reduces_gradients_without_gathering_the_batch(four):
    assert four["hlo"]["all_reduce"] > 0
    assert four["hlo"]["all_gather"] == 0


def test_errors_and_device_choice_with_four_devices(four):
    e = four["errors"]
    assert "devices" in e["make_mesh_5"] and "4 available" in e["make_mesh_5"]
    assert "B=6" in e["shard_batch_6"] and "4 devices" in e["shard_batch_6"]
    assert "B=6" in e["step_batch_6"]
    assert "--devices" in e["choose_3_of_8"] and "batch size 8" in e["choose_3_of_8"]
    assert "--devices" in e["choose_5_of_10"] and "4 available" in e["choose_5_of_10"]
    assert four["choose"] == {"none_6": 3, "none_8": 4, "none_7": 1, "none_2": 2, "two_6": 2}
    assert four["mesh_sizes"] == [4, 3]


# --- one device (this process) -----------------------------------------------
def test_make_mesh_on_one_device():
    mesh = make_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.shape["data"] == jax.device_count() == 1
    for bad in (0, 2, -1, True, 1.0):
        with pytest.raises(ValueError, match=r"devices must be an integer in \[1, 1\]"):
            make_mesh(bad)


def test_choose_devices_on_one_device():
    assert choose_devices(None, 7) == 1
    assert choose_devices(1, 7) == 1
    with pytest.raises(ValueError, match="--devices.*1 available"):
        choose_devices(2, 8)
    with pytest.raises(ValueError, match="batch_size"):
        choose_devices(None, 0)


def test_shard_batch_checks_its_arguments():
    mesh = make_mesh(1)
    xs = jnp.zeros((5, 4, 3))
    with pytest.raises(TypeError, match="batch must be a jaxrnn.Batch"):
        shard_batch((xs, xs), mesh)
    with pytest.raises(ValueError, match=r"batch.xs must have shape \(T, B, D\)"):
        shard_batch(Batch(xs[0], xs[0]), mesh)
    with pytest.raises(ValueError, match=r"batch.targets must have shape \(T, B=4"):
        shard_batch(Batch(xs, jnp.zeros((5, 3, 1))), mesh)
    with pytest.raises(ValueError, match=r"batch.lengths must have shape \(B,\) = \(4,\)"):
        shard_batch(Batch(xs, xs, jnp.ones(3, int)), mesh)
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
        shard_batch(Batch(xs, xs), "cpu")


def test_replicate_keeps_none_leaves_and_key_arrays_and_copies():
    model = RNN(cell="elman", input_size=2, hidden_size=3, output_size=1, bias=False,
                readout_bias=False)
    params = model.init(jax.random.key(0))
    key = jax.random.key(1)
    mesh = make_mesh(1)
    rparams, rkey = replicate((params, key), mesh)
    assert jax.tree.structure(rparams) == jax.tree.structure(params)
    assert rparams.readout.bias is None and rparams.layers[0][0].b_ih is None
    assert jax.dtypes.issubdtype(rkey.dtype, jax.dtypes.prng_key)
    assert jnp.array_equal(jax.random.key_data(rkey), jax.random.key_data(key))
    assert rkey.sharding.spec == jax.sharding.PartitionSpec()
    opt = optax.sgd(0.1)
    step = make_sharded_train_step(model, opt, mesh, loss="mse", donate=True)
    xs = jnp.ones((4, 2, 2), jnp.float32)
    step(rparams, replicate(opt.init(params), mesh), shard_batch(Batch(xs, xs[..., :1]), mesh))
    assert all(x.is_deleted() for x in jax.tree.leaves(rparams))  # donated ...
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))  # ... but a copy


def test_one_device_mesh_equals_make_train_step_and_works_with_train_loop():
    model = RNN(cell="gru", input_size=2, hidden_size=5, output_size=1)
    k = jax.random.split(jax.random.key(3), 2)
    xs = jax.random.normal(k[0], (7, 4, 2), jnp.float64)
    batch = Batch(xs, jnp.cumsum(xs[..., :1], axis=0), jnp.array([7, 2, 5, 7]))
    params = model.init(k[1], jnp.float64)
    opt = optax.adam(1e-2)
    mesh = make_mesh(1)
    plain = train_loop(make_train_step(model, opt, "mse", donate=False), params,
                       opt.init(params), batch, 5, progress=False)
    sharded = train_loop(make_sharded_train_step(model, opt, mesh, "mse"),
                         *replicate((params, opt.init(params)), mesh),
                         shard_batch(batch, mesh), 5, progress=False)
    assert plain.status == sharded.status == "finished"
    assert [h["loss"] for h in sharded.history] == pytest.approx(
        [h["loss"] for h in plain.history], rel=1e-12)
    assert_trees_rel_close(sharded.params, plain.params, 1e-12)
