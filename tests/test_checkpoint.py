"""Checkpoints: exact round trips, resuming, pruning, atomicity, metadata and structure checks."""

import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxrnn_app import checkpoint
from jaxrnn_app.checkpoint import (CheckpointState, Checkpointer, MetadataMismatch,
                                   check_metadata)
from jaxrnn._src.model import RNN, RNNParams
from jaxrnn_app.tasks import SineTask

MODEL = RNN(cell="lstm", input_size=1, hidden_size=4, output_size=1, num_layers=2,
            bias=False, readout_bias=False)  # every bias absent: None leaves
CONFIG = {"cell": "lstm", "hidden_size": 4, "num_layers": 2, "sizes": (1, 4, 1)}
OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
TASK = SineTask(batch_size=4, seq_len=6, seed=0, dtype="float64")


def train(params, opt_state, key, start, steps):
    """Plain optax steps on TASK's batches ``start, start + 1, ...``; splits the key each step."""
    for step in range(start, start + steps):
        key, _ = jax.random.split(key)
        batch = TASK.batch(step)
        _, grads = MODEL.loss_and_grad(params, batch.xs, batch.targets, loss="mse")
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, opt_state, key


def fresh(seed=0, metadata=CONFIG) -> CheckpointState:
    params = MODEL.init(jax.random.key(seed), dtype=jnp.float64)
    return CheckpointState(params, OPTIMIZER.init(params), 0, jax.random.key(seed), 0, metadata)


@pytest.fixture(scope="module")
def trained() -> CheckpointState:
    """A state after 2 steps: non-zero adam moments, count 2, a split key."""
    s = fresh(seed=1)
    params, opt_state, key = train(s.params, s.opt_state, s.key, 0, 2)
    return CheckpointState(params, opt_state, 2, key, 2, CONFIG)


def assert_exactly_equal(actual, expected):
    """Same tree structure (NamedTuple types and None leaves included), dtypes and bits."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        if jax.dtypes.issubdtype(e.dtype, jax.dtypes.prng_key):
            assert a.dtype == e.dtype and jax.random.key_impl(a) == jax.random.key_impl(e)
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        assert a.shape == e.shape and a.dtype == e.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


# --- round trips ---------------------------------------------------------------

def test_round_trip_is_exact(tmp_path, trained):
    path = checkpoint.save(tmp_path, trained)
    assert path == tmp_path / "2" and path.is_dir()
    restored = checkpoint.restore(tmp_path, like=fresh(seed=7))  # other values, same structure
    assert_exactly_equal(restored.params, trained.params)
    assert_exactly_equal(restored.opt_state, trained.opt_state)
    assert_exactly_equal(restored.key, trained.key)
    assert type(restored.params) is RNNParams and restored.params.readout.bias is None
    assert restored.params.layers[1][0].b_ih is None
    assert isinstance(restored.opt_state[1][0], optax.ScaleByAdamState)
    assert int(restored.opt_state[1][0].count) == 2
    assert (restored.step, restored.data_step) == (2, 2)
    assert restored.metadata == {**CONFIG, "sizes": [1, 4, 1]}  # as JSON reads it back


def test_keys_of_any_shape_and_implementation(tmp_path):
    keys = jax.random.split(jax.random.key(3, impl="rbg"), (2, 3))
    s = fresh()._replace(key=keys)
    checkpoint.save(tmp_path, s)
    restored = checkpoint.restore(tmp_path, like=s._replace(key=jax.random.split(
        jax.random.key(0, impl="rbg"), (2, 3))))
    assert_exactly_equal(restored.key, keys)
    # the restored key draws the same numbers
    np.testing.assert_array_equal(jax.random.normal(restored.key[1, 2], (3,)),
                                  jax.random.normal(keys[1, 2], (3,)))


def test_restore_into_an_abstract_like(tmp_path, trained):
    checkpoint.save(tmp_path, trained)
    s = fresh()
    params, opt_state, key = jax.eval_shape(lambda: (s.params, s.opt_state, s.key))
    assert isinstance(key, jax.ShapeDtypeStruct)
    restored = checkpoint.restore(tmp_path, CheckpointState(params, opt_state, 0, key, 0))
    assert_exactly_equal(restored.params, trained.params)
    assert_exactly_equal(restored.key, trained.key)


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    s = fresh(seed=2)
    straight = train(s.params, s.opt_state, s.key, 0, 4)
    params, opt_state, key = train(s.params, s.opt_state, s.key, 0, 2)
    checkpoint.save(tmp_path, CheckpointState(params, opt_state, 2, key, 2, CONFIG))
    r = checkpoint.restore(tmp_path, like=fresh(seed=9))
    resumed = train(r.params, r.opt_state, r.key, r.data_step, 4 - r.step)
    assert_exactly_equal(resumed, straight)


# --- steps, pruning, atomicity -------------------------------------------------

def test_latest_step_and_explicit_steps(tmp_path, trained):
    assert checkpoint.latest_step(tmp_path / "absent") is None
    assert checkpoint.latest_step(tmp_path) is None
    with Checkpointer(tmp_path, keep=None) as ckpt:
        for step in (1, 5, 10):
            ckpt.save(trained._replace(step=step, data_step=step + 100))
        assert ckpt.all_steps() == [1, 5, 10] and ckpt.latest_step() == 10
        assert ckpt.restore(fresh(), step=5).data_step == 105
        with pytest.raises(ValueError, match=r"no checkpoint for step 4 in .*steps \[1, 5, 10\]"):
            ckpt.restore(fresh(), step=4)
    assert checkpoint.latest_step(tmp_path) == 10
    assert checkpoint.restore(tmp_path, fresh()).data_step == 110


def test_keep_prunes_the_oldest(tmp_path, trained):
    with Checkpointer(tmp_path / "a", keep=2) as ckpt:
        for step in range(1, 5):
            ckpt.save(trained._replace(step=step))
        assert ckpt.all_steps() == [3, 4]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["3", "4"]
    for step in range(1, 5):  # one Checkpointer per save: pruning still applies
        checkpoint.save(tmp_path / "b", trained._replace(step=step), keep=2)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["3", "4"]


def test_steps_must_increase(tmp_path, trained):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(trained._replace(step=5))
        for step in (5, 3):  # orbax itself would return False silently
            with pytest.raises(ValueError, match=rf"cannot save step {step}: .* already has a "
                                                 r"checkpoint at step 5"):
                ckpt.save(trained._replace(step=step))
        assert ckpt.all_steps() == [5]


def test_an_interrupted_save_never_becomes_the_latest(tmp_path, trained, monkeypatch):
    """Orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it last: kill it before."""
    checkpoint.save(tmp_path, trained._replace(step=1))

    async def crash(self):
        raise RuntimeError("killed mid-save")

    with monkeypatch.context() as m:
        m.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", crash)
        with pytest.raises(RuntimeError, match="killed mid-save"):
            checkpoint.save(tmp_path, trained._replace(step=2))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["1", "2.orbax-checkpoint-tmp"]  # everything written, nothing final
    assert checkpoint.latest_step(tmp_path) == 1
    assert checkpoint.restore(tmp_path, fresh()).step == 1
    assert (tmp_path / "2.orbax-checkpoint-tmp").exists()  # readers delete nothing
    with Checkpointer(tmp_path) as ckpt:  # a writer clears the leftover
        assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]
        ckpt.save(trained._replace(step=2))
        assert ckpt.all_steps() == [1, 2]


def test_a_half_written_directory_is_ignored(tmp_path, trained):
    checkpoint.save(tmp_path, trained._replace(step=3))
    junk = tmp_path / "9.orbax-checkpoint-tmp" / "state"
    junk.mkdir(parents=True)
    (junk / "manifest.ocdbt").write_bytes(b"\0" * 10)
    assert checkpoint.latest_step(tmp_path) == 3
    assert checkpoint.read_metadata(tmp_path) == checkpoint.read_metadata(tmp_path, step=3)
    assert checkpoint.restore(tmp_path, fresh()).step == 3


def test_orbax_logging_is_quiet(tmp_path, trained, caplog):
    level = logging.getLogger("absl").level
    with caplog.at_level(logging.INFO):
        with Checkpointer(tmp_path, keep=1) as ckpt:
            ckpt.save(trained._replace(step=4))
            ckpt.save(trained._replace(step=5))
        checkpoint.restore(tmp_path, fresh())
        checkpoint.latest_step(tmp_path)
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == []
    assert logging.getLogger("absl").level == level  # restored afterwards


# --- metadata and structure checks ---------------------------------------------

def test_metadata_mismatch_names_the_keys(tmp_path, trained):
    checkpoint.save(tmp_path, trained)
    assert checkpoint.read_metadata(tmp_path) == {**CONFIG, "sizes": [1, 4, 1]}
    other = {**CONFIG, "hidden_size": 8}
    del other["num_layers"]
    with pytest.raises(ValueError, match=r"checkpoint .*/2 is of another model: hidden_size is 4 "
                                         r"in the checkpoint but 8 here; num_layers is 2 in the "
                                         r"checkpoint but absent here"):
        checkpoint.restore(tmp_path, fresh(metadata=other))
    # None skips the check; tuples and lists compare equal
    assert checkpoint.restore(tmp_path, fresh(metadata=None)).metadata["hidden_size"] == 4
    check_metadata({"sizes": [1, 2]}, {"sizes": (1, 2)})


def test_metadata_nested_keys_and_keys_recorded_only_by_newer_versions():
    """Nested records compare key by key (``run.lr``); a key in ``absent_ok`` that a
    checkpoint lacks (made before it was recorded) passes; one that differs does not."""
    here = {"model": {"hidden": 8}, "run": {"lr": 0.05, "optimizer": "adam"}}
    check_metadata({"model": {"hidden": 8}}, here, absent_ok=("run",))  # an older checkpoint
    with pytest.raises(MetadataMismatch, match=r"^the checkpoint is of another model: run is "
                                               r"absent in the checkpoint but"):
        check_metadata({"model": {"hidden": 8}}, here)
    with pytest.raises(MetadataMismatch) as e:
        check_metadata({"model": {"hidden": 8}, "run": {"lr": 0.01, "optimizer": "adam"}},
                       here, "checkpoint 3", absent_ok=("run",))
    assert str(e.value) == ("checkpoint 3 is of another model: run.lr is 0.01 in the "
                            "checkpoint but 0.05 here")
    assert e.value.where == "checkpoint 3" and e.value.differences == [("run.lr", 0.01, 0.05)]


def test_a_save_waits_for_a_reader_and_never_prunes_under_it(tmp_path, trained):
    """Reads hold a shared lock of the directory, saves (with their pruning) an exclusive
    one: a save started while another process reads waits for the read to end."""
    import threading
    import time

    from jaxrnn_app import rundir

    with Checkpointer(tmp_path, keep=1) as ckpt:
        ckpt.save(trained._replace(step=1))
        reader = rundir.lock(tmp_path, shared=True)  # another open file: as another process
        saver = threading.Thread(target=ckpt.save, args=(trained._replace(step=2),))
        saver.start()
        time.sleep(0.5)
        assert saver.is_alive() and sorted(p.name for p in tmp_path.iterdir()) == ["1"]
        reader.release()
        saver.join(timeout=60)
        assert ckpt.all_steps() == [2]  # saved, and 1 pruned, once the reader was done


def test_structure_shape_and_dtype_mismatches_name_the_leaf(tmp_path, trained):
    checkpoint.save(tmp_path, trained)
    with_bias = RNN(cell="lstm", input_size=1, hidden_size=4, output_size=1, num_layers=2,
                    readout_bias=False)
    p = with_bias.init(jax.random.key(0), dtype=jnp.float64)
    like = CheckpointState(p, OPTIMIZER.init(p), 0, jax.random.key(0), 0)
    with pytest.raises(ValueError, match=r"leaves only here: \['params'\]\.layers\[0\]\[0\]\.b_ih"):
        checkpoint.restore(tmp_path, like)
    wider = RNN(cell="lstm", input_size=1, hidden_size=5, output_size=1, num_layers=2,
                bias=False, readout_bias=False).init(jax.random.key(0), dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"\['params'\]\.layers\[0\]\[0\]\.w_ih is "
                                         r"float64\(16, 1\) in the checkpoint but "
                                         r"float64\(20, 1\) here"):
        checkpoint.restore(tmp_path, fresh(metadata=None)._replace(
            params=wider, opt_state=OPTIMIZER.init(wider)))
    # orbax alone would cast float64 -> float32 silently
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), fresh().params)
    with pytest.raises(ValueError, match=r"float64\(16, 1\) in the checkpoint but "
                                         r"float32\(16, 1\) here"):
        checkpoint.restore(tmp_path, fresh()._replace(params=f32))
    with pytest.raises(ValueError, match=r"key<threefry2x32> \(data uint32\(2,\)\) in the "
                                         r"checkpoint but key<rbg> \(data uint32\(4,\)\) here"):
        checkpoint.restore(tmp_path, fresh()._replace(key=jax.random.key(0, impl="rbg")))
    with pytest.raises(ValueError, match=r"leaves only in the checkpoint: \['key'\]"):
        checkpoint.restore(tmp_path, fresh()._replace(key=None))


# --- argument errors -----------------------------------------------------------

def test_argument_errors(tmp_path, trained):
    with pytest.raises(ValueError, match="keep must be an integer >= 1 or None, got 0"):
        Checkpointer(tmp_path, keep=0)
    with pytest.raises(ValueError, match="step must be an integer >= 0, got -1"):
        checkpoint.save(tmp_path, trained._replace(step=-1))
    with pytest.raises(ValueError, match="data_step must be an integer >= 0, got 2.0"):
        checkpoint.save(tmp_path, trained._replace(data_step=2.0))
    with pytest.raises(ValueError, match="metadata must be JSON-serialisable"):
        checkpoint.save(tmp_path, trained._replace(metadata={"dtype": jnp.float32}))
    with pytest.raises(TypeError, match="key must be a typed PRNG key"):
        checkpoint.save(tmp_path, trained._replace(key=jax.random.PRNGKey(0)))
    with pytest.raises(TypeError, match="state must be a CheckpointState"):
        checkpoint.save(tmp_path, tuple(trained))
    assert checkpoint.latest_step(tmp_path) is None  # nothing was written
    with pytest.raises(ValueError, match="no checkpoint in"):
        checkpoint.restore(tmp_path, fresh())
    with pytest.raises(ValueError, match="no checkpoint in .*no such directory"):
        checkpoint.read_metadata(tmp_path / "absent")
    checkpoint.save(tmp_path, trained._replace(step=np.int64(3)))  # numpy integers are fine
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert ckpt.latest_step() == 3
        with pytest.raises(ValueError, match="is read-only"):
            ckpt.save(trained._replace(step=4))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="directory must be a directory, got a file"):
        Checkpointer(tmp_path / "file")


# --- damaged checkpoints: fallback ---------------------------------------------

def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _largest_data_file(step_dir):
    """The largest file of the state's OCDBT database (``state/d/``): the arrays."""
    return max((step_dir / "state" / "d").iterdir(), key=lambda p: p.stat().st_size)


# damage -> what the skip reason says (each found by trying it; see _READ_ERRORS)
DAMAGE = {
    "truncated array data": (lambda d: _truncate(_largest_data_file(d)),
                             r"^state: OUT_OF_RANGE: .* is not valid for value of size"),
    "array data bytes flipped": (lambda d: (lambda p, b: p.write_bytes(
        b[:40] + bytes(x ^ 0xFF for x in b[40:48]) + b[48:]))(
            _largest_data_file(d), _largest_data_file(d).read_bytes()),
        r"^state: .*(checksum|ZSTD|corrupt|DATA_LOSS)"),
    "garbled meta JSON": (lambda d: (d / "meta" / "metadata").write_bytes(
        b'{"\x97' + (d / "meta" / "metadata").read_bytes()[3:]),
        r"^meta: 'utf-8' codec can't decode byte 0x97"),
    "truncated meta JSON": (lambda d: _truncate(d / "meta" / "metadata"),
                            r"^meta: Unterminated string|^meta: Expecting"),
    "deleted meta file": (lambda d: (d / "meta" / "metadata").unlink(), r"^meta: .*not found"),
    "deleted state manifest": (lambda d: (d / "state" / "manifest.ocdbt").unlink(),
                               r"^state: state/manifest\.ocdbt is missing"),
    "no commit marker": (lambda d: [(d / n).unlink() for n in ("commit_success.txt",
                                                                "_CHECKPOINT_METADATA")],
                         r"^no commit marker"),
}


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory, trained) -> "Path":
    """Checkpoints 1, 2, 3 of ``trained`` (distinct data_steps), to copy and damage."""
    d = tmp_path_factory.mktemp("three")
    with Checkpointer(d, keep=None) as c:
        for step in (1, 2, 3):
            c.save(trained._replace(step=step, data_step=10 * step))
    return d


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped(tmp_path, three_steps, trained, damage):
    d = _copy(three_steps, tmp_path / "c")
    hurt, reason = DAMAGE[damage]
    hurt(d / "3")
    before = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
    skipped = []
    with Checkpointer(d, read_only=True) as c:
        assert c.all_steps() == [1, 2, 3]  # orbax itself still lists it
        r = c.restore(fresh(seed=5), on_skip=lambda s, why: skipped.append((s, why)))
        assert (r.step, r.data_step) == (2, 20)
        assert_exactly_equal(r.params, trained.params)
        assert [s for s, _ in skipped] == [3]
        assert re.search(reason, skipped[0][1]), skipped[0][1]
        # an explicit step is never a fallback; nor is fallback=False
        for kw in ({"step": 3}, {"fallback": False}):
            with pytest.raises(checkpoint.CheckpointUnreadable,
                               match=rf"checkpoint 3 in {re.escape(str(d))} is unreadable "
                                     rf"\((meta|state|no commit)") as e:
                c.restore(fresh(), **kw)
            assert e.value.step == 3 and re.search(reason, e.value.reason)
        assert c.restore(fresh(), step=1).data_step == 10
    assert sorted(str(p.relative_to(d)) for p in d.rglob("*")) == before  # reading deletes nothing


def test_no_readable_checkpoint_names_the_directory_and_each_reason(tmp_path, three_steps):
    d = _copy(three_steps, tmp_path / "c")
    DAMAGE["truncated array data"][0](d / "3")
    DAMAGE["garbled meta JSON"][0](d / "2")
    DAMAGE["deleted state manifest"][0](d / "1")
    with pytest.raises(checkpoint.NoReadableCheckpoint,
                       match=rf"^no readable checkpoint in {re.escape(str(d))} \(3: state: "
                             rf"OUT_OF_RANGE.*; 2: meta: 'utf-8' codec.*; 1: state: "
                             rf"state/manifest\.ocdbt is missing\)$") as e:
        checkpoint.restore(d, fresh())
    assert [s for s, _ in e.value.skipped] == [3, 2, 1]


def test_another_model_is_an_error_not_a_fallback(tmp_path, three_steps):
    d = _copy(three_steps, tmp_path / "c")
    skipped = []
    with pytest.raises(ValueError, match=r"checkpoint .*/3 is of another model: hidden_size"):
        checkpoint.restore(d, fresh(metadata={**CONFIG, "hidden_size": 8}),
                           on_skip=lambda *a: skipped.append(a))
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), fresh().params)
    with pytest.raises(ValueError, match=r"checkpoint .*/3 does not match .*float64\(16, 1\) "
                                         r"in the checkpoint but float32\(16, 1\) here"):
        checkpoint.restore(d, fresh()._replace(params=f32), on_skip=lambda *a: skipped.append(a))
    assert skipped == []


def test_arrays_that_contradict_their_manifest_are_unreadable(tmp_path, three_steps, trained):
    """The state item of a float32 copy (5 weight arrays: 2 layers x w_ih, w_hh, and the
    readout; no biases) under checkpoint 3's float64 meta: the manifest
    check passes, but the arrays stored do not match it (orbax alone would cast them)."""
    import shutil

    d = _copy(three_steps, tmp_path / "c")
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), trained.params)
    checkpoint.save(tmp_path / "w", trained._replace(params=f32, step=3))
    shutil.rmtree(d / "3" / "state")
    shutil.copytree(tmp_path / "w" / "3" / "state", d / "3" / "state")
    skipped = []
    r = checkpoint.restore(d, fresh(), on_skip=lambda s, why: skipped.append((s, why)))
    assert r.step == 2 and [s for s, _ in skipped] == [3]
    assert re.fullmatch(r"state: its arrays do not match its manifest: params\.layers\.0\.0\."
                        r"w_hh is float32\(16, 4\) in the state but float64\(16, 4\) in the "
                        r"manifest \(and 4 more\)", skipped[0][1]), skipped[0][1]


def test_set_aside_moves_a_checkpoint_out_of_orbax_s_way(tmp_path, three_steps, trained):
    d = _copy(three_steps, tmp_path / "c")
    files = sorted(p.relative_to(d / "3") for p in (d / "3").rglob("*"))
    with Checkpointer(d, keep=2) as c:
        assert c.set_aside(3) == d / "3.damaged"
        assert c.all_steps() == [1, 2] and c.latest_step() == 2
        c.save(trained._replace(step=3))  # the step can be saved again
        assert c.set_aside(3) == d / "3.damaged-2"  # a second one does not overwrite
        c.save(trained._replace(step=3))
        c.save(trained._replace(step=4))  # pruning (keep=2) leaves the damaged ones alone
        assert c.all_steps() == [3, 4]
    assert sorted(p.name for p in d.iterdir()) == ["3", "3.damaged", "3.damaged-2", "4"]
    assert sorted(p.relative_to(d / "3.damaged") for p in (d / "3.damaged").rglob("*")) == files
    with Checkpointer(d, read_only=True) as c:
        with pytest.raises(ValueError, match="is read-only"):
            c.set_aside(3)
    with Checkpointer(d) as c:  # a new writer does not take them for unfinished saves
        assert c.all_steps() == [3, 4]
    assert (d / "3.damaged").is_dir() and (d / "3.damaged-2").is_dir()
