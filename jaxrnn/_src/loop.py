"""The training loop: one loop for the library, ``jaxrnn train`` and the experiments.

``train_loop`` runs a train step (``make_train_step``, ``make_tbptt_step``,
``sharding.make_sharded_train_step`` or any function of the same signature)
from a start step to a final step and calls hooks on cadences, as Keras' ``fit``
calls its callbacks::

    result = jaxrnn.train_loop(step, params, opt_state, task.batch, steps=1000,
                               log_every=10, eval_every=100,
                               evaluate=lambda p: {"eval_loss": float(eval_loss(p))})
    result.status, result.history[-1]      # "finished", {"step": 1000, "loss": ...}

Everything a run directory needs (configuration, files, checkpoints on disk,
signals) stays with the caller (``jaxrnn_app.runner``): the loop only calls
``checkpoint``, ``on_row`` and ``should_stop``.

The NaN guard. The loop tracks, on the device, the first step whose guarded
metrics (``finite``, by default the loss) are not finite, and reads that
tracker only at its cadence points (a logged, evaluated or checkpoint step) and
at the end, so it never adds a host sync per step. It stops at the first cadence
point after a bad step and reports that step (``first_bad``); no row at or after
it is logged, and ``checkpoint`` is never called with parameters that are not
finite (they are checked before every call). A non-finite run is not an
exception here: the loop returns with ``status="nonfinite"``, because to an
experiment a divergence is a result to record; ``jaxrnn_app.runner`` turns it
into an error.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn._src.train import Batch
from jaxrnn._src.validation import check_int

STATUSES = ("finished", "target", "interrupted", "nonfinite")


class _NoBar:
    """A silent stand-in for a tqdm bar (``progress=False``)."""

    def __init__(self, initial: int):
        self.n = initial

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, k: int) -> None:
        self.n += k

    def set_postfix(self, **kwargs) -> None:
        pass

    def unpause(self) -> None:
        pass


def _progress_bar(total: int, initial: int, desc: str, show: bool):
    """A tqdm bar of ``total`` steps, or a silent stand-in: tqdm is imported only when shown."""
    if not show:
        return _NoBar(initial)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


class LoopResult(NamedTuple):
    """What ``train_loop`` returns."""

    params: Any  # the parameters at ``step``
    opt_state: Any  # the optimizer state at ``step``
    history: list  # the logged rows (dicts), in step order; see ``train_loop``
    compile_s: float  # wall time of the first step run (compilation plus one step)
    steps_per_s: float  # throughput of the steps after the first (0.0 if fewer than 2)
    status: str  # "finished", "target", "interrupted" or "nonfinite"
    step: int  # the last step run (``start`` if none was)
    first_bad: int | None  # status "nonfinite": the first step that was not finite
    metrics: dict  # the last step's metrics, on the host ({} if no step was run)


def _check_loop_args(start: int, steps: int, log_every: int, eval_every: int,
                     checkpoint_every: int, evaluate) -> None:
    """Raises ``ValueError`` for a bad step range or cadence (see ``train_loop``)."""
    check_int("start", start, 0)
    check_int("steps", steps, max(start, 1))
    check_int("log_every", log_every, 1)
    check_int("eval_every", eval_every, 0)
    check_int("checkpoint_every", checkpoint_every, 0)
    if eval_every and evaluate is None:
        raise ValueError("eval_every > 0 needs an evaluate(params) -> dict hook")


def _batch_source(batches) -> Callable[[int], Batch]:
    """``step -> Batch`` from a function, one ``Batch`` or an iterable of batches."""
    if isinstance(batches, Batch):
        return lambda step: batches
    if callable(batches):
        return batches
    try:
        it = iter(batches)
    except TypeError:
        raise TypeError(f"batches must be a Batch, a function step -> Batch or an iterable "
                        f"of batches, got {type(batches).__name__}") from None

    def next_batch(step):
        try:
            return next(it)
        except StopIteration:
            raise ValueError(f"batches ran out at step {step + 1}: the iterable must yield "
                             f"a batch for every step to run") from None

    return next_batch


def _call_step(step_fn: Callable[..., Any], params, opt_state, batch: Batch,
               key: jax.Array | None, index: int):
    """``step_fn`` on the step of 0-based ``index``, given its dropout key if ``key`` is set.

    Returns:
        ``(params, opt_state, metrics)``, as ``step_fn`` returns them.
    """
    if key is None:
        return step_fn(params, opt_state, batch)
    return step_fn(params, opt_state, batch, jax.random.fold_in(key, index))


def _check_guarded(finite: tuple, metrics: dict) -> None:
    """Raises ``ValueError`` if the NaN guard watches a metric the step does not return."""
    missing = [k for k in finite if k not in metrics]
    if missing:
        raise ValueError(f"finite names metrics the step does not return: "
                         f"{missing} (it returns {sorted(metrics)})")


@jax.jit
def _first_bad(bad: jax.Array, values: tuple, step) -> jax.Array:
    """``step`` if one of ``values`` is the first non-finite value seen, else ``bad``."""
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in values]))
    return jnp.where((bad < 0) & ~ok, step, bad)


def all_finite(tree) -> bool:
    """Whether every leaf of ``tree`` is finite (one host sync)."""
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _nonfinite_at(first_bad: int | None, bad: jax.Array, params, step: int) -> int | None:
    """The run's first non-finite step once the loop has stopped at ``step``.

    ``first_bad`` if the loop found one; else the guard's step ``bad`` (a scalar,
    -1 for none) if a guarded metric went non-finite since the last cadence point;
    else ``step`` if ``params`` are not finite; else None.
    """
    if first_bad is None and int(bad) >= 0:
        first_bad = int(bad)
    if first_bad is None and not all_finite(params):
        first_bad = step
    return first_bad


def _due(step: int, steps: int, log_every: int, eval_every: int,
         checkpoint_every: int) -> tuple[bool, bool, bool]:
    """Whether step ``step`` is logged, evaluated and checkpointed (a cadence of 0: never)."""
    logged = step % log_every == 0 or step == steps
    evaluated = bool(eval_every) and (step % eval_every == 0 or step == steps)
    checkpointed = bool(checkpoint_every) and step % checkpoint_every == 0
    return logged, evaluated, checkpointed


def _host(value):
    """A 0-d array (jax or numpy) as a Python float; anything else as it is."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic)) and np.ndim(value) == 0:
        return float(value)
    return value


def _row(step: int, metrics: dict, steps_per_s: float | None) -> dict:
    """The row logged after step ``step``, without the evaluation (keys: see ``train_loop``).

    Args:
        step: the step just run.
        metrics: its metrics: ``loss`` and optionally ``grad_norm``, scalars, and others.
        steps_per_s: the throughput since the previous row (None: the loop's first step).
    """
    row = {"step": step, "loss": float(metrics["loss"])}
    if "grad_norm" in metrics:
        row["grad_norm"] = float(metrics["grad_norm"])
    row["steps_per_s"] = steps_per_s
    for k in sorted(set(metrics) - {"loss", "grad_norm"}):
        if isinstance(metrics[k], (jax.Array, np.ndarray, np.generic)):
            v = float(metrics[k])  # e.g. the diagnostics' scalars
            row[k] = v if math.isfinite(v) else None  # NaN is not JSON
    return row


class _Clock:
    """The loop's wall times: the first step (compile plus run), between rows, after the first."""

    def __init__(self, start: int):
        self.start, self.compile_s, self.t_steady = start, 0.0, None
        self.t_log, self.step_log = None, start

    def first_step_done(self, t0: float, step: int) -> None:
        """The first step, begun at ``t0``, has finished: its time is the compile time."""
        self.t_steady = self.t_log = time.perf_counter()
        self.compile_s, self.step_log = self.t_steady - t0, step

    def rate(self, step: int) -> float | None:
        """Steps per second since the previous row; None for the loop's first step."""
        now = time.perf_counter()
        return (step - self.step_log) / (now - self.t_log) if step > self.start + 1 else None

    def lap(self, step: int) -> None:
        """A row was logged after ``step``: the next rate counts from here."""
        self.t_log, self.step_log = time.perf_counter(), step

    def steps_per_s(self, step: int) -> float:
        """The throughput of the steps after the first, up to ``step`` (0.0 if none)."""
        wall = time.perf_counter() - self.t_steady if self.t_steady is not None else 0.0
        steady = step - self.start - 1
        return steady / wall if steady > 0 and wall > 0 else 0.0


def train_loop(step_fn: Callable[..., Any], params: Any, opt_state: Any,
               batches: Batch | Callable[[int], Batch] | Iterable[Batch], steps: int, *,
               start: int = 0, key: jax.Array | None = None, log_every: int = 1,
               eval_every: int = 0, evaluate: Callable[[Any], dict] | None = None,
               checkpoint_every: int = 0,
               checkpoint: Callable[[int, Any, Any], None] | None = None,
               target_loss: float | None = None,
               should_stop: Callable[[], bool] | None = None,
               on_row: Callable[[dict], None] | None = None,
               on_step: Callable[[int, dict], None] | None = None,
               finite: Sequence[str] = ("loss",), progress: bool = True,
               desc: str = "train") -> LoopResult:
    """Runs ``step_fn`` from step ``start`` to step ``steps``, calling the hooks on cadences.

    Steps are counted from 1: running step ``i`` takes the state after ``i - 1``
    steps to the state after ``i``. After step ``i`` the loop, in this order:

    * calls ``on_step(i, metrics)`` with the step's metrics as the step returned
      them (device arrays: keeping them costs nothing, reading them syncs);
    * at a cadence point (``i`` is logged, evaluated or checkpointed), stops with
      ``status="nonfinite"`` if a step so far had a non-finite guarded metric;
    * if ``i % log_every == 0``, or ``i % eval_every == 0`` (``eval_every > 0``),
      or ``i == steps``, builds a row: ``step``, ``loss``, ``grad_norm`` (if the
      step returns it), ``steps_per_s`` (steps since the previous row over their
      wall time; ``None`` for the first step of the loop), then the step's other
      array metrics in name order (floats; ``None`` where not finite; plain
      Python values, such as ``make_tbptt_step``'s ``updates`` count, are left
      out), then, at evaluation steps (``eval_every > 0`` and ``i % eval_every
      == 0`` or ``i == steps``), the dict ``evaluate(params)`` returns. The row
      goes to ``history`` and ``on_row(row)``; the bar shows its loss. A loss at
      or below ``target_loss`` then stops the loop (``status="target"``);
    * if ``i % checkpoint_every == 0`` (``checkpoint_every > 0``), checks that
      the parameters are finite (else stops, ``first_bad = i``) and calls
      ``checkpoint(i, params, opt_state)``.

    Before each step, ``should_stop()`` returning true stops the loop
    (``status="interrupted"``; ``jaxrnn_app.runner`` feeds it from SIGINT/SIGTERM).
    At the end the parameters are checked once more; a run that stops with
    finite parameters (any status but ``"nonfinite"``) calls ``checkpoint`` for
    its last step unless that step was just checkpointed.

    Args:
        step_fn: ``step_fn(params, opt_state, batch[, key]) -> (params, opt_state,
            metrics)``, jit-compiled or a plain Python function (``make_tbptt_step``);
            ``metrics`` a dict holding at least ``loss`` (a scalar). Its buffers may
            be donated: the loop never reuses the arrays it passed in.
        params, opt_state: the state after ``start`` steps.
        batches: the training data: a function ``step -> Batch`` called with the
            0-based index of the step to run (``start``, ``start + 1``, ...; e.g.
            ``task.batch``, which makes a resumed run see the batches an
            uninterrupted one sees), one ``Batch`` used at every step, or an
            iterable yielding one batch per step run.
        steps: the step to stop at (the total count from 0, as Keras' ``epochs``
            with ``initial_epoch``): the loop runs ``steps - start`` steps.
        start: the number of steps already run (a resumed run).
        key: a PRNG key for dropout; step ``i`` gets ``jax.random.fold_in(key, i - 1)``
            as ``step_fn``'s fourth argument. ``None``: ``step_fn`` is called with
            three arguments.
        log_every: log a row (and sync with the device) every this many steps.
        eval_every: call ``evaluate`` every this many steps and at the last step
            (0: never).
        evaluate: ``evaluate(params) -> dict`` of held-out numbers, merged into
            the row (0-d arrays become floats).
        checkpoint_every: call ``checkpoint`` every this many steps (0: only at the end).
        checkpoint: ``checkpoint(step, params, opt_state)``; never called with
            parameters that are not finite.
        target_loss: stop once a logged loss is at or below this.
        should_stop: checked before each step; true stops the loop.
        on_row: called with every logged row (after it joins ``history``).
        on_step: called after every step with ``(step, metrics)``, e.g. to average
            the training loss between evaluations without a sync per step.
        finite: the metrics the NaN guard watches (``()``: no guard on metrics; the
            parameters are still checked before ``checkpoint`` and at the end).
        progress: show a tqdm bar (steps, loss) labelled ``desc``.
        desc: the bar's label.

    Returns:
        A ``LoopResult``. ``status`` is ``"finished"`` (reached ``steps``),
        ``"target"``, ``"interrupted"`` or ``"nonfinite"``; with ``"nonfinite"``,
        ``first_bad`` is the first step whose guarded metrics were not finite (or
        whose parameters were found not finite) and ``params`` are the broken ones.

    Raises:
        ValueError: ``steps < start``, a negative or non-integer cadence, a guarded
            metric the step does not return, or an iterable ``batches`` that ran out.
        TypeError: ``batches`` of another kind.
    """
    _check_loop_args(start, steps, log_every, eval_every, checkpoint_every, evaluate)
    finite = tuple(finite)
    batch_at, clock = _batch_source(batches), _Clock(start)
    history: list[dict] = []
    status, first_bad, last_ckpt, metrics = "finished", None, None, {}
    bad = jnp.asarray(-1)  # the NaN guard's first non-finite step, on the device (-1: none)
    step = start
    with _progress_bar(steps, start, desc, progress) as bar:
        while step < steps:
            if should_stop is not None and should_stop():
                status = "interrupted"
                break
            batch = batch_at(step)
            t0 = time.perf_counter()
            params, opt_state, metrics = _call_step(step_fn, params, opt_state, batch, key, step)
            step += 1
            if step == start + 1:  # the first step: compile + run
                _check_guarded(finite, metrics)
                jax.block_until_ready(params)
                clock.first_step_done(t0, step)
                bar.unpause()  # the bar's elapsed time and ETA start here, after the compile
            if on_step is not None:
                on_step(step, metrics)
            if finite:  # the first non-finite step, tracked on the device (no sync)
                bad = _first_bad(bad, tuple(metrics[k] for k in finite), step)
            logged, evaluated, ckpt_due = _due(
                step, steps, log_every, eval_every, 0 if checkpoint is None else checkpoint_every)
            if (logged or evaluated or ckpt_due) and int(bad) >= 0:
                first_bad = int(bad)
                break
            if logged or evaluated:
                row = _row(step, metrics, clock.rate(step))
                if evaluated:
                    row.update({k: _host(v) for k, v in evaluate(params).items()})
                history.append(row)
                if on_row is not None:
                    on_row(row)
                bar.set_postfix(loss=f"{row['loss']:.4g}", refresh=False)
                clock.lap(step)  # evaluation time not counted
                if target_loss is not None and row["loss"] <= target_loss:
                    status = "target"
            bar.update(step - bar.n)
            if status == "target":
                break
            if ckpt_due:
                if not all_finite(params):  # never checkpoint a broken state
                    first_bad = step
                    break
                checkpoint(step, params, opt_state)
                last_ckpt = step
    first_bad = _nonfinite_at(first_bad, bad, params, step)
    steps_per_s = clock.steps_per_s(step)
    if first_bad is not None:
        status = "nonfinite"
    elif checkpoint is not None and last_ckpt != step:
        checkpoint(step, params, opt_state)
    return LoopResult(params, opt_state, history, clock.compile_s, steps_per_s, status, step,
                      first_bad, jax.device_get(metrics))
