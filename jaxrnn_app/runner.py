"""Training runs: a task, a model, an optimizer, an output directory, checkpoints and resume.

``run(config, out)`` is what ``jaxrnn train`` does:

* ``out/config.json``: the run's ``RunConfig`` (and library versions);
* ``out/metrics.jsonl``: one JSON object per logged step (``step``, ``loss``,
  ``grad_norm``, ``steps_per_s``, with ``diagnostics`` the per-step gradient
  summary ``dh_first_l0``, ``dh_last_l0``, ``dh_ratio_l0``, ... (null where not
  finite), and at evaluation steps ``eval_loss`` and, for ``charlm``,
  ``eval_bpc``), each row written whole; a resumed run drops the rows after its
  checkpoint (a torn last row is moved aside to ``metrics.jsonl.torn``) and appends;
* ``out/checkpoints/``: orbax checkpoints (params, optimizer state, step, data
  position, key) every ``checkpoint_every`` steps and at the end;
* ``out/curves.png``: the learning curves; ``out/samples.txt`` for ``charlm``.

Batches are a pure function of ``(seed, step)`` and dropout keys of
``(seed, step)``, so a resumed run computes exactly what an uninterrupted run
computes. A resumed run starts from the newest checkpoint that reads back
completely; newer, damaged ones are renamed ``<step>.damaged`` with a warning.
``--resume`` refuses options of ``RUN_DEFINING`` that differ from the run's and
applies those of ``CHANGEABLE_ON_RESUME``. A NaN or infinite loss stops the run,
naming the step, without checkpointing the bad state; Ctrl-C (SIGINT) or SIGTERM
saves a checkpoint and stops cleanly. The training itself is
``jaxrnn.train_loop``: ``run`` gives it the step, the batches and hooks that
write the rows, save the checkpoints and read the signals.

The directory (``jaxrnn_app.rundir``): a run holds an exclusive lock of ``out`` from
start to end (a second run on it is refused naming the holder's pid); everything it
reads and every check that it can write (permission, room for a checkpoint) comes
before its first write, so a refusal (``RunError``) changes nothing; ``config.json``
and the other small files are written atomically; a write that fails mid-run ends it
with ``rundir.WriteFailed``, one line naming the path, the cause and the last good
checkpoint (read back whole). A checkpoint records the run-defining settings
(``checkpoint_metadata``); ``--resume`` refuses one that contradicts ``config.json``.

Several processes (``jaxrnn_app.distributed.start`` before ``run``): the mesh spans
every process's devices (``build_mesh``), each process builds only its rows of each
batch (``batch_placer``), process 0 alone writes the files and messages
(``distributed.is_writer``), every process takes part in each checkpoint, and a
signal stops all of them at the same step (``stop_check``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import signal
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrnn import (RNN, Leaky, LoopResult, OnlineState, make_online_step,
                    make_optimizer, make_tbptt_step, make_train_step, train_loop)
from jaxrnn.estimators import get_estimator
from jaxrnn.extend import METHODS, TRAIN_METHODS, loss_fn
from jaxrnn_app import checkpoint as ckpt
from jaxrnn_app import distributed, memory, rundir, sharding
from jaxrnn_app.defaults import COMPUTE_DTYPES, TASK_DEFAULTS
from jaxrnn_app.tasks import Task, make_task

SCHEDULES = ("constant", "cosine", "warmup-cosine")

# The fields that define the model and its data: a checkpoint is resumable only
# under the same values. (The gradient method, ``compute_dtype`` and ``diagnostics``
# are not among them: they change how a step is computed or logged, not what is
# trained: the parameters keep ``dtype`` under any compute dtype. The first two are
# ``RUN_DEFINING``: ``--resume`` refuses to change them.)
MODEL_FIELDS = ("task", "text", "cell", "hidden", "layers", "bidirectional", "dropout",
                "batch", "seq_len", "seed", "dtype", "proj_size", "forget_bias", "alpha")
# Cell options added later: recorded only when set, so that runs made before them resume.
_OPTIONAL_MODEL_FIELDS = {"proj_size": 0, "forget_bias": 0.0, "alpha": None}

# The forward-in-time estimators (--method rtrl, snap1, ...): the train methods beyond
# the scan's bptt and autodiff.
ESTIMATOR_METHODS = tuple(m for m in TRAIN_METHODS if m not in METHODS)

# Every RunConfig field is in exactly one of these two (tests/test_runner.py checks it):
# the fields that define the run, which ``--resume`` refuses to change (a value given
# that differs from the stored one is an error), and those that may change between runs
# of the same directory (given on ``--resume``, they apply). A new field must be added to
# one of them.
RUN_DEFINING = ("task", "text", "cell", "hidden", "proj_size", "forget_bias", "alpha", "layers",
                "bidirectional", "dropout", "method", "online_every", "optimizer", "lr",
                "schedule", "warmup", "clip", "batch", "seq_len", "k1", "k2", "seed", "dtype",
                "compute_dtype", "reference_model")
CHANGEABLE_ON_RESUME = ("steps", "log_every", "eval_every", "checkpoint_every",
                        "diagnostics", "target_loss", "devices", "bptt_segment")


class RunError(ValueError):
    """A run that cannot start: bad options, a missing or mismatched checkpoint."""


# The library's argument names -> the ``jaxrnn train`` options that set them, for its
# messages (``option_message``).
OPTION = {"seq_len": "--seq-len", "batch_size": "--batch", "batch": "--batch",
          "text_path": "--text", "hidden_size": "--hidden", "proj_size": "--proj-size",
          "forget_bias": "--forget-bias", "num_layers": "--layers", "cell": "--cell",
          "bidirectional": "--bidirectional", "dropout": "--dropout", "method": "--method",
          "optimizer": "--optimizer", "lr": "--lr", "clip": "--clip", "k1": "--k1",
          "k2": "--k2", "bptt_segment": "--bptt-segment", "diagnostics": "--diagnostics",
          "compute_dtype": "--compute-dtype", "every": "--online-every", "alpha": "--alpha"}


def option_message(message: str, anywhere: tuple[str, ...] = ()) -> str:
    """A library message with its argument names as the command's options (``OPTION``).

    A name is replaced as a whole word where the message names an argument: at its
    start (``seq_len must be ...``), with a value (``cell='gru'`` -> ``--cell 'gru'``,
    ``hidden_size=8`` -> ``--hidden=8``, ``bidirectional=True`` -> ``--bidirectional``),
    a name with an underscore anywhere, and the names in ``anywhere`` anywhere. Plain
    words elsewhere (``an optax optimizer``) stay.
    """
    names = "|".join(sorted(OPTION, key=len, reverse=True))

    def with_value(m):
        option, value = OPTION[m.group(1)], m.group(2)
        if value == "True":
            return option
        return f"{option} {value}" if value[:1] in "'\"" else f"{option}={value}"

    message = re.sub(rf"\b({names})=('[^']*'|\"[^\"]*\"|[^\s,;:)]+)", with_value, message)
    message = re.sub(rf"^({names})\b", lambda m: OPTION[m.group(1)], message)
    loose = [n for n in OPTION if "_" in n or n in anywhere]
    return re.sub(rf"(?<![-\w/.])({'|'.join(sorted(loose, key=len, reverse=True))})\b",
                  lambda m: OPTION[m.group(1)], message)


class RunFailed(FloatingPointError):
    """A run that stopped on its own: a non-finite loss. (A write that fails mid-run is
    ``rundir.WriteFailed``; both end the command with exit status 1.)"""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run (``jaxrnn train``'s options)."""

    task: str = "example"
    text: str | None = None  # charlm: a text file (default: Python's pydoc topics)
    cell: str = "elman"
    hidden: int = 64
    proj_size: int = 0  # lstm: project h to this size (PyTorch's LSTMP); 0: none
    forget_bias: float = 0.0  # LSTM-family cells: added to the forget gate's bias at init
    alpha: float | None = None  # leaky: the leak in (0, 1] (set for --cell leaky; None: other cells)
    layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    method: str = "bptt"  # "bptt", "autodiff" or an estimator's name (ESTIMATOR_METHODS)
    online_every: int | None = None  # online training: an update every k steps (estimators)
    diagnostics: bool = False  # log per-step gradient norms (method "bptt", full BPTT only)
    optimizer: str = "adam"
    lr: float = 1e-3
    schedule: str = "constant"
    warmup: int = 0
    clip: float | None = None
    batch: int = 32
    seq_len: int = 50
    k1: int | None = None  # truncated BPTT: steps between updates (None: full BPTT)
    k2: int | None = None  # truncated BPTT: steps of backpropagation (default k1)
    bptt_segment: int | None = None  # memory-lean BPTT: store the state every N steps
    steps: int = 1000
    seed: int = 0
    devices: int | None = None  # None: choose automatically
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 500
    target_loss: float | None = None
    dtype: str = "float32"  # the parameters' and the data's
    compute_dtype: str | None = None  # mixed precision: the recurrent steps' (None: dtype)
    reference_model: bool = False  # example task: the worked example's model and weights

    def model_fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in MODEL_FIELDS
                if _OPTIONAL_MODEL_FIELDS.get(k, object()) != getattr(self, k)}

    def run_fields(self) -> dict[str, Any]:
        """The run-defining fields beyond the model's (``RUN_DEFINING`` minus
        ``MODEL_FIELDS``): the optimizer, its schedule, the gradient method, ..."""
        return {k: getattr(self, k) for k in RUN_DEFINING if k not in MODEL_FIELDS
                and _OPTIONAL_RUN_FIELDS.get(k, object()) != getattr(self, k)}


# Run-defining fields added to RUN_DEFINING after checkpoints recorded their run: name
# each here with its default, so that it is recorded only when set and the checkpoints
# made before it resume (as ``_OPTIONAL_MODEL_FIELDS``).
_OPTIONAL_RUN_FIELDS: dict[str, Any] = {"online_every": None}


# Recorded in every checkpoint (``checkpoint_metadata``): "model" since the first
# checkpoints, "run" since after jaxrnn 0.2.0; a checkpoint without "run" (made before)
# stays resumable, one whose "run" contradicts config.json is refused.
METADATA_ADDED_LATER = ("run",)


def checkpoint_metadata(cfg: RunConfig) -> dict[str, Any]:
    """What a checkpoint of ``cfg`` records about its run, checked on every restore:
    ``{"model": cfg.model_fields(), "run": cfg.run_fields()}``."""
    return {"model": cfg.model_fields(), "run": cfg.run_fields()}


def build_config(**given) -> RunConfig:
    """A ``RunConfig`` from the options given, completed by the task's defaults.

    Raises:
        RunError: an unknown task, schedule or option.
    """
    task = given.get("task") or "example"
    if task not in TASK_DEFAULTS:
        raise RunError(f"task must be one of {sorted(TASK_DEFAULTS)}, got {task!r}")
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise RunError(f"unknown run options {unknown}")
    values = dict(TASK_DEFAULTS[task])
    values.update({k: v for k, v in given.items() if v is not None})
    values["task"] = task
    if task == "example":
        model_opts = ("cell", "hidden", "layers", "bidirectional")
        values["reference_model"] = all(given.get(k) in (None, False) for k in model_opts)
    if values.get("cell") == "leaky" and values.get("alpha") is None:
        values["alpha"] = Leaky().alpha  # recorded in config.json: the run's own value
    cfg = RunConfig(**values)
    validate(cfg)
    _check_no_silent_options(cfg)
    return cfg


def _check_no_silent_options(cfg: RunConfig) -> None:
    """Refuses options that would do nothing in this run. Checked for new runs only
    (``build_config``), not in ``validate``: runs stored before it stay resumable."""
    if cfg.warmup > 0 and cfg.schedule != "warmup-cosine":
        raise RunError(f"--warmup {cfg.warmup} applies to --schedule warmup-cosine only "
                       f"(--schedule {cfg.schedule} has no warm-up): drop --warmup or pass "
                       f"--schedule warmup-cosine")
    if cfg.dropout > 0 and cfg.layers == 1:
        raise RunError(f"--dropout {cfg.dropout:g} acts between stacked layers, and --layers 1 "
                       f"has none (nothing would be dropped): pass --layers 2 or more, or "
                       f"drop --dropout")


def validate(cfg: RunConfig) -> None:
    """Checks the options that no lower layer checks; raises ``RunError`` naming them.

    The library's own rules (``--method``'s names, ``--k1`` >= 1, ``--k2`` >= ``--k1``,
    the models RTRL supports, diagnostics needing bptt) are its step constructors' to
    check: ``run`` makes the step first (``make_step``). What stays here is the
    command's own: its options' ranges, and how ``--k1`` (which picks truncated BPTT)
    combines with ``--method rtrl`` and ``--diagnostics``.
    """
    if cfg.task not in TASK_DEFAULTS:
        raise RunError(f"task must be one of {sorted(TASK_DEFAULTS)}, got {cfg.task!r}")
    if cfg.schedule not in SCHEDULES:
        raise RunError(f"--schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    for name in ("hidden", "layers", "batch", "seq_len", "steps", "log_every"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise RunError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
    for name in ("eval_every", "checkpoint_every", "warmup", "seed"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise RunError(f"--{name.replace('_', '-')} must be an integer >= 0, got {v!r}")
    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise RunError(f"--lr must be a finite number > 0, got {cfg.lr!r}")
    for name in ("forget_bias", "target_loss"):
        v = getattr(cfg, name)
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise RunError(f"--{name.replace('_', '-')} must be a finite number, got {v!r}")
    if cfg.k2 is not None and cfg.k1 is None:
        raise RunError("--k2 needs --k1 (truncated BPTT: k1 steps between updates)")
    if cfg.method in ESTIMATOR_METHODS and cfg.k1 is not None:
        raise RunError(f"--method {cfg.method} computes the gradient forward in time; "
                       f"truncated BPTT (--k1/--k2) is not supported with it (online "
                       f"updates: --online-every)")
    _validate_online(cfg)
    _validate_alpha(cfg)
    if cfg.diagnostics and cfg.k1 is not None:
        raise RunError("--diagnostics is not supported with truncated BPTT (--k1/--k2)")
    if cfg.bptt_segment is not None:
        v = cfg.bptt_segment
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise RunError(f"--bptt-segment must be an integer >= 1, got {v!r}")
        if cfg.method != "bptt":
            raise RunError(f"--bptt-segment is memory-lean handwritten BPTT: it needs "
                           f"--method bptt, got --method {cfg.method}")
        if cfg.k1 is not None:
            raise RunError("--bptt-segment needs full BPTT: it is not supported with "
                           "truncated BPTT (--k1/--k2)")
        if cfg.diagnostics:
            raise RunError("--diagnostics reads the full reverse scan: it is not supported "
                           "with --bptt-segment")
    if cfg.compute_dtype is not None:
        _validate_compute_dtype(cfg)
    if cfg.devices is not None and cfg.devices < 1:
        raise RunError(f"--devices must be an integer >= 1, got {cfg.devices}")
    if cfg.reference_model and cfg.task != "example":
        raise RunError("reference_model applies to --task example only")


def _validate_online(cfg: RunConfig) -> None:
    """``--online-every k``: an integer >= 1, with an estimator's ``--method`` only (bptt
    and autodiff need the whole sequence before their gradient)."""
    k = cfg.online_every
    if k is None:
        return
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise RunError(f"--online-every must be an integer >= 1, got {k!r}")
    if cfg.method not in ESTIMATOR_METHODS:
        raise RunError(f"--online-every updates while the sequence runs, which needs a "
                       f"forward-in-time --method ({', '.join(ESTIMATOR_METHODS)}); --method "
                       f"{cfg.method} has its gradient only at the sequence's end")


def _validate_alpha(cfg: RunConfig) -> None:
    """``--alpha``: the leaky cell's leak, a number in (0, 1], with ``--cell leaky`` only."""
    a = cfg.alpha
    if a is None:
        return
    if cfg.cell != "leaky":
        raise RunError(f"--alpha is the leaky cell's leak: it needs --cell leaky, got "
                       f"--cell {cfg.cell}")
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a <= 1:
        raise RunError(f"--alpha must be a number in (0, 1], got {a!r}")


def _validate_compute_dtype(cfg: RunConfig) -> None:
    """``--compute-dtype``: one of ``COMPUTE_DTYPES``, with a gradient that honours it.

    The estimators (RTRL, ...) compute in the parameters' dtype (the library refuses a
    compute dtype with them too): refused here, before anything is written. The diagnostics' scans follow
    the model's compute dtype.
    Whether it is narrower than the parameters is the library's rule
    (``check_compute_dtype``, on shapes in ``_build``).
    """
    if cfg.compute_dtype not in COMPUTE_DTYPES:
        raise RunError(f"--compute-dtype must be one of {COMPUTE_DTYPES} or none, got "
                       f"{cfg.compute_dtype!r}")
    if cfg.method in ESTIMATOR_METHODS:
        raise RunError(f"--compute-dtype {cfg.compute_dtype} is not supported with --method "
                       f"{cfg.method} (it computes in the parameters' dtype); use --method bptt")


def build_task(cfg: RunConfig) -> Task:
    """The task of ``cfg``; its errors name the option (``--seq-len``, ``--text``...)."""
    kw: dict[str, Any] = {}
    if cfg.task != "example":
        kw = dict(seed=cfg.seed, batch_size=cfg.batch, seq_len=cfg.seq_len, dtype=cfg.dtype)
    if cfg.task == "charlm":
        kw["text_path"] = cfg.text
    elif cfg.text is not None:
        raise RunError(f"--text applies to --task charlm only, not --task {cfg.task}")
    try:
        return make_task(cfg.task, **kw)
    except ValueError as e:
        raise RunError(option_message(str(e))) from None


def make_model(cfg: RunConfig, task: Task) -> RNN:
    """The model of ``cfg`` (a static configuration: no parameters are made)."""
    try:
        if cfg.reference_model:
            return dataclasses.replace(task.example().model, compute_dtype=cfg.compute_dtype)
        cell = Leaky(alpha=cfg.alpha) if cfg.cell == "leaky" and cfg.alpha is not None else cfg.cell
        return RNN(cell=cell, input_size=task.input_size, hidden_size=cfg.hidden,
                   output_size=task.output_size, num_layers=cfg.layers,
                   bidirectional=cfg.bidirectional, dropout=cfg.dropout,
                   proj_size=cfg.proj_size, forget_bias=cfg.forget_bias,
                   bptt_segment=cfg.bptt_segment, compute_dtype=cfg.compute_dtype)
    except (ValueError, TypeError) as e:  # TypeError: the library's dtype messages
        raise RunError(option_message(str(e))) from None


def check_dtypes(cfg: RunConfig, task: Task, model: RNN) -> None:
    """The library's dtype rules for ``model`` on the task's inputs (a ``--compute-dtype``
    no wider than the parameters' dtype), checked on shapes: ``jax.eval_shape`` of
    ``model.apply`` over one step, where the layer checks them (nothing is computed).

    Raises:
        RunError: the library's message, naming ``--compute-dtype``.
    """
    if model.compute_dtype is None:  # the parameters' dtype throughout: nothing to check
        return
    params = jax.eval_shape(lambda: init_params(cfg, task, model))  # shapes: none made
    xs = jax.ShapeDtypeStruct((1, 1, model.input_size), task.dtype)  # (T, B, D), time-major
    try:
        jax.eval_shape(model.apply, params, xs)
    except (ValueError, TypeError) as e:
        raise RunError(option_message(str(e))) from None


def init_params(cfg: RunConfig, task: Task, model: RNN) -> Any:
    """The initial parameters of ``model = make_model(cfg, task)``."""
    if cfg.reference_model:
        return task.example().params
    return model.init(jax.random.key(cfg.seed), jnp.dtype(cfg.dtype))


def build_model(cfg: RunConfig, task: Task) -> tuple[RNN, Any]:
    """The model of ``cfg`` and its initial parameters."""
    model = make_model(cfg, task)
    return model, init_params(cfg, task, model)


def check_memory(cfg: RunConfig, task: Task, model: RNN, optimizer,
                 available: int | None = None) -> memory.MemoryEstimate:
    """Refuses a run whose estimated peak memory exceeds what the machine has.

    Nothing is allocated: the estimate (``jaxrnn_app.memory.estimate_run``) works on
    shapes. Call it before the parameters are made and the batches drawn.

    Args:
        cfg: the run's configuration.
        task: its task (built: ``charlm`` needs its text's vocabulary).
        model: ``make_model(cfg, task)``.
        optimizer: ``build_optimizer(cfg)``.
        available: bytes the run may use; None reads the machine
            (``jaxrnn_app.memory.available_memory``: an accelerator's free memory, else
            ``MemAvailable`` capped by a cgroup limit); ``math.inf`` skips the check.

    Returns:
        The ``MemoryEstimate``.

    Raises:
        RunError: one line with the estimate, what is available, and the option to change.
    """
    def estimate(m, method=cfg.method):
        return memory.estimate_run(m, optimizer, task, method, cfg.k1, cfg.k2,
                                   evaluate=cfg.eval_every > 0)

    est = estimate(model)
    if available is None:
        avail = memory.available_memory()
    else:
        avail = memory.Available(available, "given") if available != math.inf else None
    try:
        memory.check_fits(est, avail)
    except MemoryError as e:
        raise RunError(f"{e}: {_memory_advice(cfg, model, est, avail, estimate)}") from None
    return est


def _memory_advice(cfg: RunConfig, model: RNN, est: memory.MemoryEstimate,
                   avail: memory.Available, estimate) -> str:
    """The option to change, by the part of the estimate that dominates."""
    part = est.dominant()
    if part in ("parameters", "optimizer", "gradients"):
        return "lower --hidden (or --layers)"
    if part == "data" and cfg.task == "charlm":
        return "lower --seq-len or --batch, or give a shorter --text"
    if cfg.method in ESTIMATOR_METHODS:  # its state grows with B and H, not with T
        return "lower --hidden or --batch, or use --method bptt"
    advice = "lower --seq-len or --batch"
    if cfg.k1 is None and cfg.bptt_segment is None and cfg.method in ("bptt", "autodiff"):
        k = max(1, math.isqrt(cfg.seq_len))
        lean = estimate(dataclasses.replace(model, bptt_segment=k), "bptt")
        if k > 1 and lean.total <= avail.bytes:  # suggest it only where it makes the run fit
            how = "pass" if cfg.method == "bptt" else "use --method bptt with"
            advice += (f", or {how} --bptt-segment {k} (memory-lean BPTT: about "
                       f"{memory.format_gb(lean.total)})")
    return advice


def build_optimizer(cfg: RunConfig) -> optax.GradientTransformation:
    """The optax chain: optional global-norm clipping, then the optimizer on a schedule."""
    if cfg.schedule == "constant":
        lr = cfg.lr
    elif cfg.schedule == "cosine":
        lr = optax.cosine_decay_schedule(cfg.lr, max(cfg.steps, 1))
    else:
        lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup, 1),
                                                max(cfg.steps, cfg.warmup + 1))
    try:
        return make_optimizer(cfg.optimizer, lr, cfg.clip)
    except ValueError as e:
        raise RunError(option_message(str(e))) from None


def _versions() -> dict[str, str]:
    import jaxlib
    from jaxrnn import __version__

    return {"jaxrnn": __version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "optax": optax.__version__, "backend": jax.default_backend()}


def read_config(out: Path) -> RunConfig:
    """The ``RunConfig`` saved in ``out/config.json``.

    Raises:
        RunError: no ``config.json``, or one that cannot be the run's configuration
            (not a readable file, not JSON, not an object, a field of the wrong type or
            value), naming the file.
    """
    path = Path(out) / "config.json"
    if not path.exists() and not path.is_symlink():
        raise RunError(f"--out {out} holds no run (no config.json)")
    damaged = "the run's configuration is damaged: restore it, or start a new run"
    if path.is_dir():
        raise RunError(f"{path} is a directory, not a JSON file: {damaged}")
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise RunError(f"cannot read {rundir.describe(e, path)}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise RunError(f"{path} is not JSON ({e}): {damaged}") from None
    if not isinstance(data, dict):
        raise RunError(f"{path} holds a JSON {_json_kind(data)}, not an object: {damaged}")
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for name, value in data.items():
        if name in fields and not _has_type(value, fields[name].type):
            raise RunError(f"{path}: {name} is {value!r}, not of type {fields[name].type}: "
                           f"{damaged}")
    try:
        cfg = RunConfig(**{k: v for k, v in data.items() if k in fields})
        validate(cfg)
    except RunError as e:
        raise RunError(f"{path}: {e}: {damaged}") from None
    return cfg


def _json_kind(value) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _has_type(value, annotation: str) -> bool:
    """Whether a JSON value fits a ``RunConfig`` field's annotation (``"int | None"``...)."""
    kinds = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
             "None": (type(None),)}
    allowed = tuple(t for name in annotation.split("|") for t in kinds.get(name.strip(), ()))
    if isinstance(value, bool) and bool not in allowed:
        return False
    return isinstance(value, allowed)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show(value) -> str:
    """An option's value as the user would type it (None: "none")."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _same(name: str, given, stored) -> bool:
    """Whether a given option equals the stored one: numbers by value (0.01 == 1e-2,
    1 == 1.0), ``--text`` by the file it names."""
    if given is None or stored is None or isinstance(given, bool) or isinstance(stored, bool):
        return given == stored
    if isinstance(given, (int, float)) and isinstance(stored, (int, float)):
        return float(given) == float(stored)
    if name == "text" and given != stored:
        return Path(given).expanduser().resolve() == Path(stored).expanduser().resolve()
    return given == stored


def prepare_resume(out: Path, given: dict[str, Any]) -> RunConfig:
    """The saved run's config, with the options of ``CHANGEABLE_ON_RESUME`` from ``given``.

    Args:
        out: the run's directory (it holds ``config.json``).
        given: option name -> value as the user gave it; None means not given.

    Raises:
        RunError: no run in ``out``; an unknown option; or options of
            ``RUN_DEFINING`` given with values other than the run's (one message
            naming each, with both values). Nothing is written.
    """
    try:
        saved = read_config(out)
    except RunError as e:  # "--resume: --out DIR holds no run"
        raise RunError(f"--resume: {e}") from None
    unknown = sorted(set(given) - set(RUN_DEFINING) - set(CHANGEABLE_ON_RESUME))
    if unknown:
        raise RunError(f"unknown run options {unknown}")
    conflicts = [f"{_flag(k)} {_show(given[k])} (the run has {_show(getattr(saved, k))})"
                 for k in RUN_DEFINING
                 if given.get(k) is not None and not _same(k, given[k], getattr(saved, k))]
    if conflicts:
        raise RunError(f"--resume: these options differ from the run in {out}: "
                       + "; ".join(conflicts))
    changes = {k: given[k] for k in CHANGEABLE_ON_RESUME if given.get(k) is not None}
    cfg = dataclasses.replace(saved, **changes)
    validate(cfg)  # e.g. --diagnostics given to a run of another method
    return cfg


def _restore_for_resume(ckpt_dir: Path, like: ckpt.CheckpointState, out: Path
                        ) -> tuple[ckpt.CheckpointState, list[tuple[int, str]]]:
    """The newest readable checkpoint of ``ckpt_dir`` and the newer ones skipped,
    ``(step, reason)``; read-only: nothing in the directory changes.

    Raises:
        RunError: no readable checkpoint (naming the directory and each reason), a
            checkpoint of another model, or one whose record of its run contradicts
            ``out/config.json`` (naming the settings).
    """
    skipped: list[tuple[int, str]] = []
    try:
        with ckpt.Checkpointer(ckpt_dir, read_only=True) as reader:
            restored = reader.restore(like, on_skip=lambda s, why: skipped.append((s, why)),
                                      absent_ok=METADATA_ADDED_LATER)
    except ckpt.MetadataMismatch as e:
        raise RunError(f"--resume: {_contradiction(e, out)}") from None
    except ValueError as e:  # NoReadableCheckpoint, or another model (never a fallback)
        raise RunError(f"--resume: {e}") from None
    return restored, skipped


def _contradiction(e: ckpt.MetadataMismatch, out: Path) -> str:
    """A checkpoint's record of its run against the run's ``config.json``, in options:
    ``checkpoint DIR/10 was made by another run: --lr 0.01 in the checkpoint, 0.05 in
    DIR/config.json``."""
    def setting(key: str) -> str:  # "run.lr" -> "--lr"; "model.dtype" -> "dtype" (no option)
        name = key.split(".")[-1]
        return name if name in ("dtype", "reference_model") else _flag(name)

    parts = []
    for key, saved, expected in e.differences:
        if e.absent.get(key) == "checkpoint":
            parts.append(f"{setting(key)} not recorded in the checkpoint, {_show(expected)} "
                         f"in config.json")
        elif e.absent.get(key) == "here":
            parts.append(f"{setting(key)} {_show(saved)} in the checkpoint, not in config.json")
        else:
            parts.append(f"{setting(key)} {_show(saved)} in the checkpoint, {_show(expected)} "
                         f"in config.json")
    return f"{e.where} was made by another run than {out}: " + "; ".join(parts)


class _Stop:

    """Turns SIGINT/SIGTERM into a flag the training loop checks between steps."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclasses.dataclass
class RunResult:
    """What ``run`` reports."""

    out: Path
    start_step: int
    final_step: int
    history: list
    compile_s: float
    steps_per_s: float
    status: str  # "finished", "target", "interrupted", "already-finished"
    samples: str | None = None


def _warn(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr)


def run(cfg: RunConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
        log=print, warn=_warn, memory_available: int | None = None) -> RunResult:
    """Runs (or resumes) a training run, writing into ``out``.

    The parts, in order: ``_claim`` (the directory made and locked: one writer),
    ``_prepare`` (what reads: the directory's state, the task, model, optimizer and
    step, the initial or the restored state, the metrics rows, and the checks that the
    run can write: nothing is written before them), then ``_write_run``:
    ``_resume_directory`` (the files of a resumed run), ``_train`` (``train_loop`` with
    its hooks) and ``_finish`` (figures, samples).

    Args:
        cfg: the run's configuration (``build_config`` or ``prepare_resume``).
        out: the output directory. A new run refuses a directory that already holds
            a run; a resumed run requires one.
        resume: continue from the newest readable checkpoint in ``out/checkpoints``;
            each newer, unreadable one is moved aside to ``<step>.damaged`` (never
            deleted) with one ``warn`` line naming it and why; a torn last row of
            ``metrics.jsonl`` is moved aside to ``metrics.jsonl.torn`` (one ``warn``
            line). A run with no checkpoint yet starts again from step 0 (one line).
        progress: show a tqdm progress bar.
        log: where to print one-line messages.
        warn: where to print warnings (default: stderr).
        memory_available: bytes the run may use (``check_memory``); None reads the
            machine, ``math.inf`` skips the check.

    Returns:
        A ``RunResult``.

    Raises:
        RunError: bad options, an existing run without ``resume``, a directory another
            run holds (naming its pid), no readable checkpoint to resume, a checkpoint
            of another model or run, a run that does not fit in memory, an ``out``
            that cannot be made or written or lacks the space for a checkpoint
            (refused before anything is allocated or written). Nothing in ``out``
            has changed then.
        RunFailed: the loss became NaN or infinite (the message names the step).
        rundir.WriteFailed: a write failed mid-run (a full disk...): one line naming
            the path, the cause and the last good checkpoint, which was read back whole.
    """
    out = Path(out)
    if not distributed.is_writer():  # process 0 alone shows progress and messages
        progress, log, warn = False, _quiet, _quiet
    claim = _claim(out, resume, warn)
    try:
        try:
            prepared = _prepare(cfg, out, resume, memory_available)
        except BaseException:
            claim.undo()  # a refusal: leave no directory we made behind
            raise
        return _write_run(cfg, out, resume, prepared, progress, log, warn)
    finally:
        claim.release()


def _quiet(*args, **kwargs) -> None:
    """``log`` and ``warn`` of the processes other than process 0."""


class _Claim(NamedTuple):
    """``out`` made (``created``: the directories this run made) and locked."""

    held: rundir.DirectoryLock | None  # None: not process 0
    created: list[Path]

    def undo(self) -> None:
        self.release()
        rundir.remove_created(self.created)

    def release(self) -> None:
        if self.held is not None:
            self.held.release()


def _claim(out: Path, resume: bool, warn) -> _Claim:
    """Makes ``out`` (a new run) and takes its exclusive lock for the whole run: one
    writer at a time. Process 0 decides; every process gets its refusal.

    Raises:
        RunError: another process holds the lock (naming its pid), or ``out`` cannot
            be made or opened. Nothing is left behind.
    """
    refusal, held, created = None, None, []
    if distributed.is_writer():
        try:
            if not resume:
                created = rundir.make_directory(out)
            held = rundir.lock(out)
        except rundir.Locked as e:
            created = []  # made here or not, the holder uses it now: never removed
            holder = f"pid {e.pid}" if e.pid is not None else "another process"
            refusal = (f"--out {out} is in use: another run ({holder}) holds its lock; wait "
                       f"for it to end, or choose another --out")
        except OSError as e:
            if out.exists() and not out.is_dir():
                refusal = f"--out {out} is a file, not a directory: choose a directory"
            elif resume and not out.exists():
                refusal = f"--resume: --out {out} holds no run (no such directory)"
            else:
                refusal = f"cannot {'open' if resume else 'create'} --out: {rundir.describe(e)}"
        if held is not None and held.unsupported:
            warn(f"warning: cannot lock {out} ({held.unsupported}): make sure no other run "
                 f"writes into it")
    refusal = distributed.from_writer("run-directory-lock", refusal)
    if refusal:
        _Claim(held, created).undo()
        raise RunError(refusal)
    return _Claim(held, created)


class _Prepared(NamedTuple):
    """What a run read before writing anything."""

    built: _Built
    start: _State
    resumable: bool  # resume: a finished checkpoint exists (else: from step 0)
    rows: rundir.Rows | None  # resume: metrics.jsonl as read back (process 0)


def _prepare(cfg: RunConfig, out: Path, resume: bool, memory_available) -> _Prepared:
    """Everything a run reads, and the checks that it can write, before it writes.

    Raises:
        RunError: a refusal (see ``run``), also for any OSError here, naming the path.
    """
    try:
        resumable = _check_out(out, resume)
        built = _build(cfg, memory_available)
        start = _start(cfg, built, out, resume and resumable)
    except OSError as e:
        raise RunError(rundir.describe(e)) from None
    refusal, rows = None, None
    if distributed.is_writer():  # what process 0 alone reads and writes
        try:
            rows = _read_metrics(out) if resume else None
            refusal = _preflight(out, start)
        except RunError as e:
            refusal = str(e)
        except OSError as e:
            refusal = rundir.describe(e)
    refusal = distributed.from_writer("preflight", refusal)  # every process stops with it
    if refusal:
        raise RunError(refusal)
    return _Prepared(built, start, resumable, rows)


# What a checkpoint writes beside its arrays (orbax's metadata files, each rounded up to
# the file system's block): a tiny run's checkpoint takes 92 kB on ext4.
CHECKPOINT_OVERHEAD = 256 * 1024


def _preflight(out: Path, start: _State) -> str | None:
    """Process 0's checks before anything is written: ``out`` and ``out/checkpoints``
    take a file, and their file system has room for one checkpoint (the arrays'
    bytes plus ``CHECKPOINT_OVERHEAD``, counting unfinished saves, which the run
    removes, as free). Returns the refusal, or None."""
    ckpt_dir = out / "checkpoints"
    for d in (out, ckpt_dir):
        if not d.exists():
            continue
        try:
            rundir.check_writable(d)
        except OSError as e:
            return f"cannot write in {rundir.describe(e, d)}"
    arrays = sum(getattr(x, "nbytes", 0)
                 for x in jax.tree.leaves((start.params, start.opt_state)))
    need = arrays + CHECKPOINT_OVERHEAD
    where = ckpt_dir if ckpt_dir.exists() else out
    free = rundir.free_bytes(where)
    if ckpt_dir.exists():
        free += sum(rundir.disk_usage(ckpt_dir / name)
                    for name in os.listdir(ckpt_dir) if ".orbax-checkpoint-tmp" in name)
    if free < need:
        return (f"no space for a checkpoint in {where}: {rundir.format_bytes(free)} free on "
                f"its file system, a checkpoint needs about {rundir.format_bytes(need)}; "
                f"free some space, or choose another --out")
    return None


def _check_out(out: Path, resume: bool) -> bool:
    """Refuses a new run into a directory that holds one; process 0 decides, under the
    run's lock (``_claim``), before anything is written.

    Returns:
        Whether ``out`` holds a finished checkpoint (``resume``; without one the run
        starts again from step 0).
    """
    refusal = None
    try:
        if distributed.is_writer() and not resume and any(out.iterdir()):
            refusal = (f"--out {out} already holds a run; pass --resume to continue it, or "
                       f"choose another directory")
    except OSError as e:  # decided by process 0 alone: every process gets it
        refusal = f"cannot read --out: {rundir.describe(e)}"
    refusal = distributed.from_writer("out-holds-a-run", refusal)
    if refusal:
        raise RunError(refusal)
    ckpt_dir = out / "checkpoints"
    return resume and ckpt_dir.is_dir() and ckpt.latest_step(ckpt_dir) is not None


def _read_metrics(out: Path) -> rundir.Rows | None:
    """``out/metrics.jsonl`` as read back (None if absent), every row with a step.

    Raises:
        RunError: a damaged row before the last line, naming the file and the line.
    """
    path = out / "metrics.jsonl"
    if not path.exists():
        return None
    try:
        rows = rundir.read_rows(path)
    except ValueError as e:
        raise RunError(f"--resume: {e}") from None
    for i, row in enumerate(rows.rows):
        if isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
            raise RunError(f"--resume: {path}: row {i + 1} has no integer step "
                           f"({rows.lines[i][:60]}): repair or remove the row")
    return rows


def _write_run(cfg: RunConfig, out: Path, resume: bool, prepared: _Prepared, progress: bool,
               log, warn) -> RunResult:
    """The writing part of ``run``: the directory's files, the training, the figures.

    Raises:
        rundir.WriteFailed: any write failing (an OSError, a checkpoint that cannot be
            saved), with the last good checkpoint named (``_write_failed``).
        RunFailed: a NaN or infinite loss.
    """
    built, start = prepared.built, prepared.start
    checkpointer, ended = None, False
    try:
        if distributed.is_writer():
            (out / "checkpoints").mkdir(exist_ok=True)
        distributed.barrier("run-directory")  # every process has read what it needed; made
        checkpointer = ckpt.Checkpointer(out / "checkpoints", keep=3)
        if resume:
            _resume_directory(out, checkpointer, prepared, warn)
            if start.step >= cfg.steps:
                log(f"{out}: the run already reached step {start.step} (>= --steps "
                    f"{cfg.steps}); pass a larger --steps to continue it")
                ended = True
                return RunResult(out, start.step, start.step, [], 0.0, 0.0,
                                 "already-finished")
        if distributed.is_writer():
            config = dataclasses.asdict(cfg) | {"versions": _versions(),
                                                "devices_used": built.n_dev,
                                                "processes_used": jax.process_count()}
            rundir.write_atomic(out / "config.json", json.dumps(config, indent=2) + "\n")
        res = _train(cfg, built, start, out, checkpointer, progress, warn)
        result = RunResult(out, start.step, res.step, res.history, res.compile_s,
                           res.steps_per_s, res.status)
        if distributed.is_writer():
            _finish(cfg, built.task, built.model, host_local(res.params), out, result, log)
        ended = True
        return result
    except OSError as e:
        raise _write_failed(f"cannot write {rundir.describe(e)}", out) from None
    except rundir.WriteFailed as e:
        raise _write_failed(str(e), out) from None
    finally:
        if checkpointer is not None:
            if ended:
                checkpointer.close()
            else:  # after a failure, which is the error to report
                with contextlib.suppress(Exception):
                    checkpointer.close()


def _write_failed(what: str, out: Path) -> rundir.WriteFailed:
    """``what`` failed mid-run: the error, naming the last good checkpoint (read back
    whole now) from which ``--resume`` continues."""
    last = _last_good_checkpoint(out / "checkpoints")
    if last is None:
        then = "there is no checkpoint yet (--resume starts the run again from step 0)"
    else:
        then = (f"the last good checkpoint is step {last} in {out / 'checkpoints'} (read "
                f"back whole; --resume continues from it)")
    return rundir.WriteFailed(f"{what}; stopped: {then}")


def _last_good_checkpoint(ckpt_dir: Path) -> int | None:
    """The newest checkpoint of ``ckpt_dir`` that reads back whole (``Checkpointer.verify``)."""
    try:
        with ckpt.Checkpointer(ckpt_dir, read_only=True) as reader:
            for step in reversed(reader.all_steps()):
                try:
                    reader.verify(step)
                except ValueError:
                    continue
                return step
    except (OSError, ValueError):
        pass
    return None


class _Built(NamedTuple):
    """What a run trains: built once, before any state is made or restored."""

    task: Task
    model: RNN
    optimizer: optax.GradientTransformation
    step_fn: Any  # ``step(params, opt_state, batch, key) -> (params, opt_state, metrics)``
    mesh: sharding.Mesh | None  # None: one device
    n_dev: int
    place_batch: Any  # ``place(step) -> Batch`` on the mesh
    online_init: Any = None  # online runs: ``OnlineStep.init`` (None: one update per batch)


class OnlineTrain(NamedTuple):
    """What an online run (``--online-every``) carries in the loop's optimizer-state slot,
    and so in its checkpoints."""

    opt_state: Any  # the optax state
    online: OnlineState | None  # a stream's place (network and estimator state); None: the
    # task's sequences are independent, and each batch starts from a fresh OnlineState


def _build(cfg: RunConfig, memory_available: int | None) -> _Built:
    """The task, model, optimizer and train step of ``cfg``, and the process layout.

    The library's constructors check their options (``make_step``) before the memory
    check, which comes before the parameters are made or a batch is drawn.
    """
    task = build_task(cfg)
    model = make_model(cfg, task)
    check_dtypes(cfg, task, model)
    optimizer = build_optimizer(cfg)
    if cfg.online_every is not None:
        online = make_online(cfg, task, model, optimizer)
        step_fn = online_train_step(online, task, cfg.batch)
    else:
        online, step_fn = None, make_step(cfg, task, model, optimizer)
    if task.last_step_only and (cfg.k1 is not None or online is not None):
        what = "--k1/--k2 (truncated BPTT)" if online is None else "--online-every"
        raise RunError(f"{what} need a loss at every step; task {cfg.task!r} scores only "
                       f"the last step")
    if cfg.k1 is not None and cfg.k1 > cfg.seq_len:
        raise RunError(f"--k1 ({cfg.k1}) must be <= --seq-len ({cfg.seq_len})")
    if cfg.method in ESTIMATOR_METHODS:
        check_estimator_size(cfg, task, model)
    # Before the parameters are made, a batch drawn or the run directory written.
    check_memory(cfg, task, model, optimizer, memory_available)
    batch_size = task.batch(0).xs.shape[1]
    if online is not None:  # one device: the stream's state lives on it
        if distributed.is_multiprocess() or cfg.devices not in (None, 1):
            raise RunError("--online-every runs on one device: leave --devices out (or "
                           "give 1) and run one process")
        return _Built(task, model, optimizer, step_fn, None, 1, task.batch, online.init)
    n_dev, mesh = build_mesh(cfg, batch_size)
    if mesh is not None:
        step_fn = make_step(cfg, task, model, optimizer, mesh)
    return _Built(task, model, optimizer, step_fn, mesh, n_dev,
                  batch_placer(task, mesh, batch_size))


def check_estimator_size(cfg: RunConfig, task: Task, model: RNN) -> None:
    """Refuses an estimator (``--method rtrl``, ...) whose state would be too large for
    this model and batch (the library's ``check_estimator``, on the parameters' shapes).

    Raises:
        RunError: the library's one line, naming the options.
    """
    params = jax.eval_shape(lambda: init_params(cfg, task, model))  # shapes: none made
    try:
        model.check_estimator(get_estimator(cfg.method), params, cfg.batch)
    except ValueError as e:
        raise RunError(option_message(str(e), anywhere=("batch",))) from None


def make_online(cfg: RunConfig, task: Task, model: RNN, optimizer):
    """``make_online_step`` for ``cfg`` (``--online-every``).

    Raises:
        RunError: the library's message (a bidirectional model, a cell the estimator is
            not defined on), naming the options.
    """
    try:
        return make_online_step(model, optimizer, method=cfg.method, every=cfg.online_every,
                                loss=task.loss)
    except ValueError as e:
        raise RunError(option_message(str(e))) from None


def online_train_step(online, task: Task, batch_size: int):
    """The loop's step for an online run: ``step(params, OnlineTrain, batch, key=None)``.

    A stream task (``task.stream``) carries the ``OnlineState`` from batch to batch (it
    is in the checkpoints); otherwise each batch's sequences start afresh: a new
    ``OnlineState`` (zero network state, the estimator's initial state) per batch.
    ``key`` (stochastic estimators): the loop's ``fold_in(run key, step)``; the stream's
    step ``t`` draws from ``fold_in(key, t)`` (``make_online_step``).
    """
    def step(params, state: OnlineTrain, batch, key=None):
        carried = state.online if task.stream else online.init(params, batch_size, key)
        params, opt_state, carried, metrics = online.step(params, state.opt_state, carried,
                                                          batch, key)
        return params, OnlineTrain(opt_state, carried if task.stream else None), metrics

    return step


def make_step(cfg: RunConfig, task: Task, model: RNN, optimizer,
              mesh: sharding.Mesh | None = None):
    """The train step of ``cfg`` (one update per batch): full BPTT or an estimator (on
    ``mesh``, if given), or truncated BPTT. Online runs: ``make_online``.

    Raises:
        RunError: the library's message on a ``--method``, ``--diagnostics``, ``--k1``
            or ``--k2`` it refuses, naming the options (``option_message``).
    """
    try:
        if cfg.k1 is not None:
            return make_tbptt_step(model, optimizer, k1=cfg.k1, k2=cfg.k2, loss=task.loss,
                                   method=cfg.method)
        if mesh is None:
            return make_train_step(model, optimizer, loss=task.loss, method=cfg.method,
                                   last_only=task.last_step_only,
                                   diagnostics=cfg.diagnostics)
        return sharding.make_sharded_train_step(
            model, optimizer, mesh, loss=task.loss, method=cfg.method,
            last_only=task.last_step_only, diagnostics=cfg.diagnostics)
    except ValueError as e:
        raise RunError(option_message(str(e), anywhere=("k1",))) from None


class _State(NamedTuple):
    """Where the training starts: fresh, or a checkpoint read back."""

    params: Any
    opt_state: Any
    key: jax.Array
    step: int
    metadata: dict  # stored with each checkpoint: ``checkpoint_metadata(cfg)``
    skipped: list  # resume: the newer, unreadable checkpoints, ``(step, why)``


def uses_key(cfg: RunConfig) -> bool:
    """Whether the steps draw random numbers: dropout, or a stochastic estimator (UORO,
    KF-RTRL): step ``i`` gets ``fold_in(key(seed), i - 1)`` (``train_loop``), so a
    resumed run draws what an uninterrupted one draws."""
    stochastic = cfg.method in ESTIMATOR_METHODS and get_estimator(cfg.method).stochastic
    return cfg.dropout > 0 or stochastic


def initial_opt_state(cfg: RunConfig, task: Task, optimizer, params, online_init=None):
    """What the loop carries beside the parameters: the optax state, or for an online run
    ``OnlineTrain(optax state, the stream's first OnlineState or None)``."""
    opt_state = optimizer.init(params)
    if cfg.online_every is None:
        return opt_state
    key = jax.random.key(cfg.seed) if uses_key(cfg) else None
    online = online_init(params, cfg.batch, key) if task.stream else None
    return OnlineTrain(opt_state, online)


def _start(cfg: RunConfig, built: _Built, out: Path, resume: bool) -> _State:
    """The initial parameters, optimizer state and key, or those of the newest readable
    checkpoint in ``out/checkpoints`` (``resume``); replicated on the mesh. Nothing is
    written."""
    params = init_params(cfg, built.task, built.model)
    key = jax.random.key(cfg.seed)
    opt_state = initial_opt_state(cfg, built.task, built.optimizer, params, built.online_init)
    if built.mesh is not None:  # before a restore: it restores onto the same (global) layout
        params, opt_state, key = sharding.replicate((params, opt_state, key), built.mesh)
    metadata = checkpoint_metadata(cfg)
    if not resume:
        return _State(params, opt_state, key, 0, metadata, [])
    restored, skipped = _restore_for_resume(
        out / "checkpoints", ckpt.CheckpointState(params, opt_state, 0, key, 0, metadata), out)
    return _State(restored.params, restored.opt_state, restored.key, int(restored.step),
                  metadata, skipped)


def _resume_directory(out: Path, checkpointer: ckpt.Checkpointer, prepared: _Prepared,
                      warn) -> None:
    """A resumed run's files: damaged checkpoints and a torn last row moved aside (with a
    warning each), the metrics rows after the checkpoint dropped (atomically)."""
    start = prepared.start
    if distributed.is_writer():
        since = f"checkpoint {start.step}" if prepared.resumable else "step 0"
        for bad_step, why in start.skipped:  # never deleted, never in the way of a save
            moved = checkpointer.set_aside(bad_step)
            warn(f"warning: checkpoint {bad_step} is unreadable ({why}): resuming "
                 f"from {since}; moved it aside to {moved}")
        if not prepared.resumable:
            warn(f"--resume: {out} has no checkpoint yet (the run stopped before its first): "
                 f"starting it from step 0 with its stored configuration")
        rows, path = prepared.rows, out / "metrics.jsonl"
        if rows is not None:
            if rows.torn:  # a write cut short (a full disk, a kill): kept, never deleted
                aside = rundir.side_path(path, "torn")
                rundir.write_atomic(aside, rows.torn)
                warn(f"warning: the last row of {path} is torn ({len(rows.torn)} bytes "
                     f"without a newline: a write cut short): resuming from {since}; moved it "
                     f"aside to {aside}")
            kept = [line for line, row in zip(rows.lines, rows.rows) if row["step"] <= start.step]
            rundir.write_atomic(path, "".join(line + "\n" for line in kept))
    if start.skipped and distributed.is_multiprocess():  # process 0 moved them: re-list
        distributed.barrier("set-aside")
        checkpointer.reload()


def _evaluator(task: Task, model: RNN, mesh: sharding.Mesh | None):
    """``evaluate(params) -> {"eval_loss", ["eval_bpc"]}`` on the task's eval batch."""
    # The eval batch is whole in every process (it is computed once per run): each
    # device scores all of it, as in a one-process run, so the eval loss is the same.
    eval_batch = task.eval_batch()
    if mesh is not None:
        eval_batch = sharding.replicate(eval_batch, mesh)
    eval_loss = jax.jit(lambda p, b: loss_fn(model, task.loss, "autodiff", p, b.xs,
                                              b.targets, None, b.lengths, None,
                                              task.last_step_only))

    def evaluate(params):
        ev = float(eval_loss(params, eval_batch))
        return {"eval_loss": ev, **({"eval_bpc": ev / math.log(2)}
                                    if task.loss == "xent" else {})}

    return evaluate


def _train(cfg: RunConfig, built: _Built, start: _State, out: Path,
           checkpointer: ckpt.Checkpointer, progress: bool, warn) -> LoopResult:
    """``train_loop`` from ``start`` with the run's hooks: rows to ``metrics.jsonl``
    (each written whole, ``rundir.RowWriter``), checkpoints, evaluation, the stop signals.

    Raises:
        RunFailed: a NaN or infinite loss (nothing saved after the last good checkpoint).
        rundir.WriteFailed: a row or a checkpoint could not be written (naming which and
            why; the checkpoint being saved is left unfinished, never the latest).
    """
    key, metadata = start.key, start.metadata

    def save(step, params, opt_state):
        if checkpointer.latest_step() == step:  # resumed, stopped before a step
            return
        try:
            checkpointer.save(ckpt.CheckpointState(params, opt_state, step, key, step,
                                                   metadata))
        except Exception as e:  # orbax's and tensorstore's errors: OSError, ValueError...
            raise rundir.WriteFailed(f"cannot save checkpoint {step} in "
                                     f"{checkpointer.directory}: {rundir.cause(e)}") from None

    evaluate = _evaluator(built.task, built.model, built.mesh)
    rows_to = out / "metrics.jsonl" if distributed.is_writer() else None
    with _Stop() as stop, rundir.RowWriter(rows_to) as rows:
        if progress:  # the first step compiles (seconds to minutes): say so
            warn(f"{cfg.task}: compiling the training step (the first step; the "
                 f"progress bar's ETA starts after it)...")
        res = train_loop(
            built.step_fn, start.params, start.opt_state, built.place_batch, cfg.steps,
            start=start.step, key=key if uses_key(cfg) else None, log_every=cfg.log_every,
            eval_every=cfg.eval_every, evaluate=evaluate,
            checkpoint_every=cfg.checkpoint_every, checkpoint=save,
            target_loss=cfg.target_loss, should_stop=stop_check(stop, cfg.log_every),
            on_row=lambda row: rows.write(_whole_counts(row)), progress=progress,
            desc=cfg.task)
    if res.status == "nonfinite":
        last, where = checkpointer.latest_step(), out / "checkpoints"
        raise RunFailed(f"the loss or the parameters became NaN or infinite at step "
                        f"{res.first_bad}; stopped without saving; "
                        + (f"the last good checkpoint is step {last} in {where}"
                           if last is not None else f"there is no checkpoint yet in {where}"))
    return res


def _whole_counts(row: dict) -> dict:
    """The row with the online step's ``updates`` as an integer (the loop logs its array
    metrics as floats); changed in place, so ``history`` shows the same."""
    if isinstance(row.get("updates"), float):
        row["updates"] = int(row["updates"])
    return row


# --- the process layout (small helpers, so that the training loop needs no more) ----

def build_mesh(cfg: RunConfig, batch_size: int) -> tuple[int, sharding.Mesh | None]:
    """The number of devices and the mesh of a run (None: one device, no mesh).

    One process: ``--devices`` or as many local devices as divide the batch. Several
    processes (``jax.distributed``): every device of every process, which must
    divide the batch; ``--devices``, if given, must be that number.

    Raises:
        RunError: a ``--devices`` or ``--batch`` that does not fit.
    """
    if not distributed.is_multiprocess():
        try:
            n_dev = sharding.choose_devices(cfg.devices, batch_size)
        except ValueError as e:
            raise RunError(str(e)) from None
        return n_dev, sharding.make_mesh(n_dev) if n_dev > 1 else None
    total, procs = jax.device_count(), jax.process_count()
    if cfg.devices is not None and cfg.devices != total:
        raise RunError(f"--devices {cfg.devices}: a run of {procs} processes uses all their "
                       f"{total} devices; leave --devices out or give {total}")
    if batch_size % total:
        raise RunError(f"--batch {batch_size} must be divisible by the {total} devices of the "
                       f"{procs} processes")
    return total, sharding.make_mesh(total)


def batch_placer(task: Task, mesh: sharding.Mesh | None, batch_size: int):
    """``place(step) -> Batch``: training batch ``step`` laid out on ``mesh``.

    Several processes: each produces only its own rows (``task.batch(step,
    part=...)``, the rows of its devices) and they are assembled into the global
    batch (``shard_batch(..., process_local=True)``), equal to the whole
    ``task.batch(step)`` of a one-process run.
    """
    if mesh is None:
        return task.batch
    if not distributed.is_multiprocess():
        return lambda step: sharding.shard_batch(task.batch(step), mesh)
    try:
        part = sharding.process_part(mesh, batch_size)
    except ValueError as e:
        raise RunError(str(e)) from None
    return lambda step: sharding.shard_batch(task.batch(step, part=part), mesh,
                                             process_local=True)


def stop_check(stop: _Stop, every: int):
    """``should_stop()`` for the loop, after SIGINT/SIGTERM (``stop.signal``).

    Several processes must stop at the same step (a step or a checkpoint is a
    collective of all of them): the loop asks before every step, in step with the
    other processes, and every ``every``-th time they agree (a small collective)
    on whether any of them was signalled. One process: at once.
    """
    if not distributed.is_multiprocess():
        return lambda: stop.signal is not None
    calls = itertools.count()
    return lambda: next(calls) % every == 0 and distributed.any_process(stop.signal is not None)


def host_local(tree):
    """A pytree of replicated arrays as host numpy arrays in a multi-process run (process 0
    alone then computes with them, e.g. samples text); unchanged with one process."""
    return jax.device_get(tree) if distributed.is_multiprocess() else tree


def _finish(cfg: RunConfig, task: Task, model: RNN, params, out: Path, result: RunResult,
            log) -> None:
    """Writes the learning-curve figure (and samples) from the whole metrics file, each
    atomically (a temporary file renamed into place)."""
    from jaxrnn_app.plots import learning_curves

    rows = rundir.read_rows(out / "metrics.jsonl").rows
    if rows:
        with rundir.atomic_path(out / "curves.png") as tmp:
            learning_curves(rows, tmp,
                            title=f"{cfg.task}: "
                                  f"{cfg.cell if not cfg.reference_model else 'elman'}"
                                  f" ({cfg.method}), loss {task.loss}",
                            baseline=task.baseline)
    if cfg.task == "charlm":
        from jaxrnn import sample

        prompt = "The " if set("The ") <= set(task.vocab) else task.decode(task.train_ids[:4])
        ids = sample(model, params, task.encode(prompt), 400, jax.random.key(cfg.seed + 1),
                     temperature=0.8)
        result.samples = prompt + task.decode(np.asarray(ids))
        rundir.write_atomic(out / "samples.txt", result.samples + "\n")
