"""The training loop: cadences, hooks, the NaN guard, stopping, batch sources.

A toy step (no model to compile) keeps these fast: the parameter halves every
step and takes on the batch's value, ``p_i = p_{i-1} / 2 + x``, its loss is
``p_i ** 2``, and the optimizer state counts the steps; with ``x = 0`` from
``p_0 = 4``, ``p_i = 4 / 2**i`` exactly. (The loop over a real train step, and
the runner over the loop, are tested in test_train.py and test_runner.py.)
"""

import jax
import jax.numpy as jnp
import pytest

from jaxrnn import Batch, train_loop

P0 = jnp.array(4.0, jnp.float32)


def toy_step(params, opt_state, batch, key=None):
    p = params / 2 + batch.xs[0, 0, 0]
    return p, opt_state + 1, {"loss": p * p, "grad_norm": jnp.abs(p)}


def zeros(nan_at=None):
    """A batch function: ``x = 0``, NaN at the 0-based step index ``nan_at``."""
    return lambda i: Batch(jnp.full((1, 1, 1), jnp.nan if i == nan_at else 0.0), None)


class Recorder:
    def __init__(self):
        self.checkpoints, self.evaluated, self.rows, self.steps = [], [], [], []

    def on_step(self, step, metrics):
        self.steps.append((step, float(metrics["loss"])))

    def checkpoint(self, step, params, opt_state):
        assert bool(jnp.isfinite(params))
        self.checkpoints.append((step, float(params), int(opt_state)))

    def evaluate(self, params):
        self.evaluated.append(float(params))
        return {"eval_p": params}


def test_hooks_run_on_their_cadences():
    r = Recorder()
    res = train_loop(toy_step, P0, jnp.array(0), zeros(), 10, log_every=3, eval_every=4,
                     evaluate=r.evaluate, checkpoint_every=5, checkpoint=r.checkpoint,
                     on_row=r.rows.append, on_step=r.on_step, progress=False)
    assert res.status == "finished" and res.step == 10 and res.first_bad is None
    assert r.steps == [(i, (4 / 2 ** i) ** 2) for i in range(1, 11)]
    assert [row["step"] for row in res.history] == [3, 4, 6, 8, 9, 10]  # logs 3, 6, 9, 10; evals 4, 8, 10
    assert r.rows == res.history
    for row in res.history:
        assert row["loss"] == (4 / 2 ** row["step"]) ** 2 and row["steps_per_s"] > 0
        assert ("eval_p" in row) == (row["step"] in (4, 8, 10))
        if "eval_p" in row:
            assert type(row["eval_p"]) is float and row["eval_p"] == 4 / 2 ** row["step"]
    assert r.evaluated == [4 / 2 ** 4, 4 / 2 ** 8, 4 / 2 ** 10]
    # every 5 steps; the last step (10) is on the cadence, so it is not saved twice
    assert r.checkpoints == [(5, 4 / 2 ** 5, 5), (10, 4 / 2 ** 10, 10)]


def test_resume_sees_the_steps_batches_and_keys_of_an_uninterrupted_run(key):
    seen, keys = [], []

    def batch_at(i):
        seen.append(i)
        return zeros()(i)

    def step(params, opt_state, batch, k):
        keys.append(k)
        return toy_step(params, opt_state, batch)

    res = train_loop(step, P0 / 2 ** 4, jnp.array(4), batch_at, 8, start=4, key=key,
                     progress=False)
    assert seen == [4, 5, 6, 7]  # the 0-based index of the step being run
    assert all(jnp.array_equal(jax.random.key_data(k),
                               jax.random.key_data(jax.random.fold_in(key, i)))
               for k, i in zip(keys, seen))
    assert [row["step"] for row in res.history] == [5, 6, 7, 8]
    assert res.history[0]["steps_per_s"] is None  # the first step of the loop: compiling
    assert float(res.params) == 4 / 2 ** 8 and int(res.opt_state) == 8


def test_nan_guard_reports_the_first_bad_step_and_never_checkpoints_it():
    r = Recorder()
    # step 6 is bad; the guard is read at the cadence points 4 and 8 only
    res = train_loop(toy_step, P0, jnp.array(0), zeros(nan_at=5), 12, log_every=4,
                     checkpoint_every=4, checkpoint=r.checkpoint, on_row=r.rows.append,
                     progress=False)
    assert res.status == "nonfinite" and res.first_bad == 6 and res.step == 8
    assert [row["step"] for row in res.history] == [4] and r.rows == res.history
    assert r.checkpoints == [(4, 4 / 2 ** 4, 4)]  # not at 8, not at the end
    # With the metric guard off, the parameters are still checked before a checkpoint.
    r = Recorder()
    res = train_loop(toy_step, P0, jnp.array(0), zeros(nan_at=5), 12, log_every=100,
                     checkpoint_every=4, checkpoint=r.checkpoint, finite=(), progress=False)
    assert res.status == "nonfinite" and res.first_bad == 8
    assert r.checkpoints == [(4, 4 / 2 ** 4, 4)]


@pytest.mark.parametrize("log_every, stop_at", [(1, 9), (2, 10)])
def test_target_loss_is_checked_on_logged_steps_and_the_end_is_checkpointed(log_every, stop_at):
    r = Recorder()  # loss 16 / 4**i: 2.4e-4 at 8, 6.1e-5 at 9, 1.5e-5 at 10
    res = train_loop(toy_step, P0, jnp.array(0), zeros(), 100, log_every=log_every,
                     target_loss=1e-4, checkpoint=r.checkpoint, progress=False)
    assert res.status == "target" and res.step == stop_at
    assert r.checkpoints == [(stop_at, 4 / 2 ** stop_at, stop_at)]


def test_should_stop_interrupts_before_a_step():
    r, calls = Recorder(), []

    def should_stop():
        calls.append(1)
        return len(calls) > 3

    one = Batch(jnp.zeros((1, 1, 1)), None)  # one Batch for every step
    res = train_loop(toy_step, P0, jnp.array(0), one, 100, should_stop=should_stop,
                     checkpoint=r.checkpoint, progress=False)
    assert res.status == "interrupted" and res.step == 3 and len(calls) == 4
    assert r.checkpoints == [(3, 4 / 2 ** 3, 3)]


@pytest.mark.parametrize("kw, error, match", [
    (dict(batches=iter([Batch(jnp.zeros((1, 1, 1)), None)] * 2)), ValueError,
     "batches ran out at step 3"),
    (dict(batches=3), TypeError, "batches must be a Batch"),
    (dict(start=5, steps=4), ValueError, "steps must be an integer >= 5"),
    (dict(eval_every=2), ValueError, "eval_every > 0 needs an evaluate"),
    (dict(finite=("loss", "acc")), ValueError, r"finite names metrics .*\['acc'\]"),
])
def test_bad_arguments_are_named(kw, error, match):
    kw = {"batches": zeros(), "steps": 4, **kw}
    with pytest.raises(error, match=match):
        train_loop(toy_step, P0, jnp.array(0), kw.pop("batches"), kw.pop("steps"),
                   progress=False, **kw)
