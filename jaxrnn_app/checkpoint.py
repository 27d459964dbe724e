"""Checkpoints: save, restore and resume a training run, with orbax.

A checkpoint directory holds one sub-directory per saved step, ``<directory>/<step>/``,
written by orbax's ``CheckpointManager``, synchronously. Each save is written to a
temporary ``<step>.orbax-checkpoint-tmp`` directory and renamed into place only once
complete, so a crash mid-save never leaves a half-written checkpoint as the latest:
``latest_step`` lists finished steps only. Each step holds two items:

* ``state``: the arrays (parameters, optimizer state, the PRNG key as its raw key
  data), through orbax's ``StandardCheckpointHandler``;
* ``meta``: JSON: the step, the data position, the caller's ``metadata`` (e.g. the
  model configuration) and a manifest of every array (tree path, shape, dtype, key
  implementation), checked against the state to restore into before anything is read.

A checkpoint is *readable* when orbax finalized it (``ocp.path.step.is_path_finalized``
and its commit marker, ``commit_success.txt`` or a ``commit_timestamp_nsecs`` in
``_CHECKPOINT_METADATA``), its ``meta`` item parses, every byte of its ``state`` item
reads back (tensorstore checks the OCDBT nodes' CRC-32C and decompresses every chunk)
and the restored arrays have the structure, shapes and dtypes of the manifest.
``restore()`` with ``step=None`` falls back to the newest readable checkpoint, telling
its ``on_skip`` callback about each newer one it skipped and why; a checkpoint of another
model is an error, never a fallback (``MetadataMismatch``, naming the keys).

Saves (with their pruning) and set-asides hold an exclusive ``flock`` of the directory,
reads a shared one (``jaxrnn_app.rundir.lock``): a process reading checkpoints while
another trains into the directory never has the one it reads pruned or renamed under it.
A failed save (a full disk) raises once, quietly: ``_quiet_save`` keeps the rest of
orbax's threads from printing the same error again.

Typical use in a training loop::

    ckpt = Checkpointer(directory, keep=3)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(like=CheckpointState(params, opt_state, 0, key, 0, config))
    ...
    ckpt.save(CheckpointState(params, opt_state, step, key, data_step, config))
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxrnn_app import rundir

FORMAT_VERSION = 1  # of the ``meta`` item's layout
DAMAGED_SUFFIX = ".damaged"  # ``set_aside`` renames ``<step>`` to ``<step>.damaged``

# What orbax and tensorstore raise for a checkpoint whose files are truncated, garbled
# or missing: JSON (JSONDecodeError, UnicodeDecodeError) and tensorstore errors
# (OUT_OF_RANGE, DATA_LOSS, NOT_FOUND) are ValueErrors, a missing file an OSError, a
# missing item a KeyError. Only the reads are guarded by them; the model checks
# (``check_metadata``, the manifest) are outside, so another model stays an error.
_READ_ERRORS = (OSError, ValueError, KeyError)


class CheckpointUnreadable(ValueError):
    """A checkpoint that does not read back completely: truncated, garbled, missing files.

    Attributes:
        step: the checkpoint's step.
        reason: what is wrong, e.g. ``"meta: 'utf-8' codec can't decode byte 0x97 ..."``.
    """

    def __init__(self, directory: Path, step: int, reason: str):
        super().__init__(f"checkpoint {step} in {directory} is unreadable ({reason})")
        self.step, self.reason = step, reason


class NoReadableCheckpoint(ValueError):
    """Every checkpoint of a directory is unreadable; ``skipped`` lists ``(step, reason)``."""

    def __init__(self, directory: Path, skipped: list[tuple[int, str]]):
        why = "; ".join(f"{step}: {_short(reason)}" for step, reason in skipped)
        super().__init__(f"no readable checkpoint in {directory} ({why})")
        self.skipped = skipped


def _fmt(shape_dtype) -> str:
    return "absent" if shape_dtype is None else f"{shape_dtype[1]}{shape_dtype[0]}"


def _short(reason: str, n: int = 120) -> str:
    return rundir.one_line(reason, n)


class CheckpointState(NamedTuple):
    """Everything a training run needs to resume."""

    params: Any  # e.g. RNNParams; None leaves (absent biases) are kept
    opt_state: Any  # an optax state pytree
    step: int  # optimizer steps taken so far; the checkpoint's number
    key: jax.Array | None  # a typed PRNG key from jax.random.key (any shape), or None
    data_step: int  # the position in the data: the next batch is task.batch(data_step)
    metadata: Mapping[str, Any] | None = None  # JSON-serialisable, e.g. the model config


# --- helpers -------------------------------------------------------------------

@contextlib.contextmanager
def _quiet():
    """Orbax logs through absl at INFO and WARNING; keep it to errors while we call it.

    Never lowers the level: after a failed save (``_quiet_save``) absl stays at CRITICAL,
    since the failed save's threads may still be logging while the run reads its last
    good checkpoint back (a race seen once in the suite: their tracebacks on stderr)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _quiet_save():
    """Keeps a save quiet, and the rest of a failed one. When a write fails (a full
    disk), orbax's other threads fail too, before and after the error reaches the
    caller (who reports it once): absl logs each with its traceback, asyncio logs its
    tasks' "exception was never retrieved", and tensorstore's callbacks into closed
    event loops raise "Event loop is closed" as unraisable exceptions (measured: about
    100 lines of stderr for one full disk). During the save those loggers keep to
    CRITICAL and that one unraisable exception is dropped (others reach the previous
    hook); after a failed save, for the rest of the process."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [logger.level for logger in loggers]
    previous = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and "Event loop is closed" in str(unraisable.exc_value)):
            previous(unraisable)

    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    sys.unraisablehook = hook
    yield  # an exception leaves all of it in place
    sys.unraisablehook = previous
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


def _check_step(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (
            hasattr(value, "dtype") and jnp.ndim(value) == 0
            and jnp.issubdtype(value.dtype, jnp.integer)):
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value}")
    return value


def _jsonable(value, name: str) -> dict:
    """``value`` as it reads back from JSON (tuples become lists), or a ValueError."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping (a dict), got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be JSON-serialisable: {e}") from None


def _is_key(x) -> bool:
    """Whether ``x`` is a typed PRNG key array (concrete or a ShapeDtypeStruct)."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_info(key) -> tuple[str, jax.ShapeDtypeStruct]:
    """The implementation name of a typed key (concrete or abstract), and its key data
    as a ShapeDtypeStruct."""
    impl = []

    def data(k):
        impl.append(str(jax.random.key_impl(k)))  # runs once, while tracing
        return jax.random.key_data(k)

    abstract_data = jax.eval_shape(data, key)
    return impl[0], abstract_data


def _shape_dtype(x) -> tuple[tuple[int, ...], Any]:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return tuple(x.shape), x.dtype
    x = jnp.asarray(x)  # a Python scalar, saved (and restored) as a 0-d array
    return x.shape, x.dtype


def _manifest(tree) -> dict[str, dict]:
    """Tree path -> ``{"shape", "dtype"[, "key_impl"]}`` of each leaf as it is stored."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if _is_key(leaf):
            impl, data = _key_info(leaf)
            entry = {"shape": list(data.shape), "dtype": str(data.dtype), "key_impl": impl}
        else:
            shape, dtype = _shape_dtype(leaf)
            entry = {"shape": list(shape), "dtype": str(jnp.dtype(dtype))}
        out[jax.tree_util.keystr(path)] = entry
    return out


def _describe(entry: dict) -> str:
    data = f"{entry['dtype']}{tuple(entry['shape'])}"
    return f"key<{entry['key_impl']}> (data {data})" if "key_impl" in entry else data


def _check_manifest(saved: dict, here: dict, where: str) -> None:
    """Raises a ValueError naming the (first few) leaves that differ between two manifests."""
    def ordered(paths):  # params, then opt_state, then key; tree order within each (stable)
        return sorted(paths, key=lambda p: (not p.startswith("['params']"),
                                            not p.startswith("['opt_state']")))

    def listing(paths, n=3):
        return ", ".join(paths[:n]) + (f" (and {len(paths) - n} more)" if len(paths) > n else "")

    problems = []
    if only_saved := ordered(p for p in saved if p not in here):
        problems.append(f"leaves only in the checkpoint: {listing(only_saved)}")
    if only_here := ordered(p for p in here if p not in saved):
        problems.append(f"leaves only here: {listing(only_here)}")
    if differ := ordered(p for p in saved if p in here and saved[p] != here[p]):
        problems += [f"{p} is {_describe(saved[p])} in the checkpoint but {_describe(here[p])} "
                     f"here" for p in differ[:3]]
        if len(differ) > 3:
            problems.append(f"and {len(differ) - 3} more leaves differ")
    if problems:
        raise ValueError(f"{where} does not match the state to restore into: "
                         + "; ".join(problems))


def _sharding(x):
    sharding = getattr(x, "sharding", None)
    return sharding if sharding is not None else jax.sharding.SingleDeviceSharding(
        jax.devices()[0])


def _to_stored(tree):
    """Typed keys -> their raw key data; everything else -> arrays."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else jnp.asarray(x), tree)


def _target(like):
    """The abstract tree orbax restores into: shapes, dtypes and shardings of ``like``."""
    def leaf(x):
        shape, dtype = _shape_dtype(_key_info(x)[1] if _is_key(x) else x)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=_sharding(x))
    return jax.tree.map(leaf, like)


def _from_stored(like, tree):
    """Raw key data -> typed keys of ``like``'s implementation."""
    return jax.tree.map(
        lambda l, x: jax.random.wrap_key_data(x, impl=_key_info(l)[0]) if _is_key(l) else x,
        like, tree)


_ABSENT = object()  # a metadata key one side lacks


class MetadataMismatch(ValueError):
    """A checkpoint's metadata differs from the run's (``check_metadata``).

    Attributes:
        where: the checkpoint, as the message names it.
        differences: ``(key, saved, expected)`` for each key that differs, nested keys
            dotted (``"run.lr"``); a side that lacks the key holds ``None`` and the key
            is listed in ``absent``.
        absent: ``{key: "checkpoint" | "here"}`` for keys only one side has.
    """

    def __init__(self, where: str, differences: list, absent: dict, problems: list[str]):
        super().__init__(f"{where} is of another model: " + "; ".join(problems))
        self.where, self.differences, self.absent = where, differences, absent


def _differences(saved, expected, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved, expected)`` of every leaf that differs between two JSON
    mappings, descending into the keys both hold as mappings."""
    out = []
    for k in sorted(set(saved) | set(expected), key=str):
        a, b = saved.get(k, _ABSENT), expected.get(k, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((f"{prefix}{k}", a, b))
    return out


def check_metadata(saved: Mapping[str, Any], expected: Mapping[str, Any],
                   where: str = "the checkpoint", *, absent_ok: tuple[str, ...] = ()) -> None:
    """Checks that a checkpoint's metadata equals this run's.

    Args:
        saved: the metadata read from a checkpoint (``read_metadata``).
        expected: this run's metadata (e.g. the model configuration); compared as it
            reads back from JSON, so tuples equal lists. Nested mappings are compared
            key by key.
        where: how to name the checkpoint in the message.
        absent_ok: top-level keys of ``expected`` that ``saved`` may lack: what newer
            versions record and older checkpoints do not (they stay readable).

    Raises:
        MetadataMismatch (a ValueError): naming every key whose value differs or that
            one side lacks (nested keys dotted, ``run.lr``).
    """
    expected = _jsonable(expected, "metadata")
    expected = {k: v for k, v in expected.items() if k in saved or k not in absent_ok}
    differences, absent, problems = [], {}, []
    for k, a, b in _differences(dict(saved), expected):
        if a is _ABSENT:
            absent[k] = "checkpoint"
            problems.append(f"{k} is absent in the checkpoint but {b!r} here")
        elif b is _ABSENT:
            absent[k] = "here"
            problems.append(f"{k} is {a!r} in the checkpoint but absent here")
        else:
            problems.append(f"{k} is {a!r} in the checkpoint but {b!r} here")
        differences.append((k, None if a is _ABSENT else a, None if b is _ABSENT else b))
    if problems:
        raise MetadataMismatch(where, differences, absent, problems)


# --- the checkpointer ----------------------------------------------------------

class Checkpointer:
    """Saves and restores ``CheckpointState``s in one directory, keeping the last ``keep``.

    A writer (``read_only=False``) creates the directory and removes the temporary
    directories of saves that never finished (a crash mid-save); it assumes it is the
    only writer. A reader creates, prunes and removes nothing. With several processes
    (``jax.distributed``), every process opens the same directory and takes part in
    every ``save`` and ``restore`` (orbax writes each array's shards once, the primary
    process 0 the metadata and the final rename); process 0 alone creates the
    directory and removes unfinished saves, so make it first and wait for it.

    Args:
        directory: the checkpoint directory (one sub-directory per step).
        keep: how many of the most recent checkpoints to keep (an integer >= 1),
            or None to keep all.
        read_only: open for ``latest_step``/``restore``/``read_metadata`` only.

    Raises:
        ValueError: a bad ``keep``, or ``directory`` is a file.
    """

    def __init__(self, directory, *, keep: int | None = 3, read_only: bool = False):
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep must be an integer >= 1 or None, got {keep!r}")
        self.directory = Path(directory).expanduser().absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"directory must be a directory, got a file: {self.directory}")
        self.keep = keep
        self.read_only = read_only
        if not read_only and jax.process_index() == 0:  # of several processes, the primary
            self.directory.mkdir(parents=True, exist_ok=True)
            for name in ocp.path.step.tmp_checkpoints(self.directory):
                shutil.rmtree(self.directory / name)  # a save that never finished
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            create=False,
            enable_async_checkpointing=False,  # save() returns once the step is on disk
        )
        with _quiet():
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_names=("state", "meta"))

    # --- context manager ---------------------------------------------------------
    def close(self) -> None:
        """Releases orbax's resources."""
        with _quiet():
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Checkpointer({str(self.directory)!r}, keep={self.keep}"
                + (", read_only=True)" if self.read_only else ")"))

    def _lock(self, shared: bool):
        """The directory's lock for one operation: a save, a set-aside (process 0, the
        one that renames and prunes) or a read (every process). Another process's saves
        and reads wait for it; readers never see a step pruned or renamed mid-read."""
        if not shared and jax.process_index() != 0:
            return contextlib.nullcontext()
        return rundir.locked(self.directory, shared=shared)

    # --- queries -------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """The steps of the finished checkpoints, ascending."""
        with _quiet():
            return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The step of the most recent finished checkpoint, or None if there is none."""
        with _quiet():
            return self._manager.latest_step()

    def _resolve(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise ValueError(f"no checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        step = _check_step("step", step)
        if step not in steps:
            raise ValueError(f"no checkpoint for step {step} in {self.directory}; "
                             f"it has steps {steps}")
        return step

    def _unreadable(self, step: int, reason: str) -> CheckpointUnreadable:
        return CheckpointUnreadable(self.directory, step, _short(reason, 300))

    def _check_complete(self, step: int) -> None:
        """Orbax's finalization: not a temporary directory, and its commit marker."""
        path = self.directory / str(step)
        with _quiet():
            finalized = ocp.path.step.is_path_finalized(path)
        if not finalized:
            raise self._unreadable(step, "orbax did not finalize it")
        if (path / "commit_success.txt").exists():
            return
        try:  # orbax versions that write no marker on a local disk: the commit time
            committed = json.loads((path / "_CHECKPOINT_METADATA").read_text()).get(
                "commit_timestamp_nsecs")
        except (OSError, ValueError, AttributeError):
            committed = None
        if committed is None:
            raise self._unreadable(step, "no commit marker: neither commit_success.txt nor a "
                                         "commit time in _CHECKPOINT_METADATA")

    def _meta(self, step: int) -> dict:
        self._check_complete(step)
        try:
            with _quiet():
                meta = self._manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))["meta"]
        except _READ_ERRORS as e:
            raise self._unreadable(step, f"meta: {e}") from None
        if not isinstance(meta, dict):
            raise self._unreadable(step, f"meta: a JSON {type(meta).__name__}, not an object")
        if meta.get("format") != FORMAT_VERSION:  # another jaxrnn's layout: not a fallback
            raise ValueError(f"checkpoint {self.directory / str(step)} has format "
                             f"{meta.get('format')!r}; this jaxrnn reads format {FORMAT_VERSION}")
        for name, kind in (("step", int), ("data_step", int), ("metadata", dict),
                           ("leaves", dict)):
            if not isinstance(meta.get(name), kind):
                raise self._unreadable(step, f"meta: {name!r} is missing or not a "
                                             f"{kind.__name__}")
        if meta["step"] != step:
            raise self._unreadable(step, f"meta: it says step {meta['step']}")
        return meta

    def _verify_state_files(self, step: int) -> None:
        """Reads every byte of the ``state`` item once, one key at a time.

        Orbax writes it as an OCDBT database; tensorstore checks each b-tree node's
        CRC-32C and decompresses each chunk on reading. (Reading a damaged database
        through orbax's concurrent restore also fails, but leaves tensorstore callbacks
        that print "Event loop is closed" tracebacks on stderr afterwards.)
        """
        import tensorstore as ts  # orbax's own dependency

        state = self.directory / str(step) / "state"
        if not (state / "manifest.ocdbt").exists():
            raise self._unreadable(step, "state: state/manifest.ocdbt is missing")
        try:
            kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state}/"}).result()
            keys = kv.list().result()
            for k in keys:
                kv.read(k).result()
        except _READ_ERRORS as e:
            raise self._unreadable(step, f"state: {e}") from None
        if not keys:
            raise self._unreadable(step, "state: its database holds no arrays")

    def read_metadata(self, step: int | None = None) -> dict:
        """The ``metadata`` saved with a checkpoint (the latest if ``step`` is None).

        Raises:
            ValueError: no checkpoint (for ``step``) in the directory;
                ``CheckpointUnreadable`` if its ``meta`` item does not read back.
        """
        return self._meta(self._resolve(step))["metadata"]

    def reload(self) -> None:
        """Re-lists the checkpoints, after another process changed the directory (e.g. a
        ``set_aside`` by process 0 of a multi-process run)."""
        with _quiet():
            self._manager.reload()

    def set_aside(self, step: int) -> Path:
        """Renames checkpoint ``step`` to ``<step>.damaged`` (``.damaged-2``, ... if taken).

        Orbax then no longer lists it, prunes it or refuses to save ``step`` again, and
        nothing is deleted. For a writer only.

        Returns:
            The checkpoint's new path.

        Raises:
            ValueError: a read-only checkpointer, or no checkpoint ``step``.
        """
        if self.read_only:
            raise ValueError(f"{self!r} is read-only: open it with read_only=False to set a "
                             f"checkpoint aside")
        step = self._resolve(step)
        new = self.directory / f"{step}{DAMAGED_SUFFIX}"
        n = 1
        while new.exists():
            n += 1
            new = self.directory / f"{step}{DAMAGED_SUFFIX}-{n}"
        with self._lock(shared=False):
            (self.directory / str(step)).rename(new)
        with _quiet():
            self._manager.reload()
        return new

    # --- save / restore ------------------------------------------------------------
    def save(self, state: CheckpointState) -> Path:
        """Writes ``state`` as checkpoint number ``state.step`` and waits until it is on disk.

        Older checkpoints beyond the last ``keep`` are then deleted.

        Args:
            state: a ``CheckpointState``; ``key`` a typed key (``jax.random.key``) or
                None; ``metadata`` JSON-serialisable.

        Returns:
            The checkpoint's directory, ``directory / str(step)``.

        Raises:
            ValueError: a bad ``step``/``data_step``/``metadata``, or ``step`` not after
                the latest checkpoint already in the directory (steps must increase;
                start a fresh directory to start over).
            TypeError: ``state`` is not a ``CheckpointState`` or ``key`` is not a typed key.
        """
        if self.read_only:
            raise ValueError(f"{self!r} is read-only: open it with read_only=False to save")
        if not isinstance(state, CheckpointState):
            raise TypeError(f"state must be a CheckpointState, got {type(state).__name__}")
        step = _check_step("step", state.step)
        data_step = _check_step("data_step", state.data_step)
        if state.key is not None and not _is_key(state.key):
            raise TypeError(f"key must be a typed PRNG key from jax.random.key (or None), got "
                            f"dtype {getattr(state.key, 'dtype', type(state.key).__name__)}; "
                            f"wrap raw uint32 keys with jax.random.wrap_key_data")
        metadata = _jsonable({} if state.metadata is None else state.metadata, "metadata")
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(f"cannot save step {step}: {self.directory} already has a "
                             f"checkpoint at step {latest}, and steps must increase")
        tree = {"params": state.params, "opt_state": state.opt_state, "key": state.key}
        meta = {"format": FORMAT_VERSION, "step": step, "data_step": data_step,
                "metadata": metadata, "leaves": _manifest(tree)}
        with self._lock(shared=False), _quiet_save():  # readers wait: no step pruned mid-read
            saved = self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_stored(tree)), meta=ocp.args.JsonSave(meta)))
            self._manager.wait_until_finished()
        if not saved:  # orbax returns False, silently, for steps it decides not to save
            raise RuntimeError(f"orbax did not save step {step} in {self.directory}")
        return self.directory / str(step)

    def restore(self, like: CheckpointState, step: int | None = None, *,
                fallback: bool = True,
                on_skip: Callable[[int, str], None] | None = None,
                absent_ok: tuple[str, ...] = ()) -> CheckpointState:
        """Reads a checkpoint back into the structure of ``like``.

        Args:
            like: a ``CheckpointState`` of this run (freshly initialised, say): its
                ``params``, ``opt_state`` and ``key`` give the tree structure (None
                leaves and NamedTuple types included), shapes, dtypes, shardings and
                key implementation (arrays or ``jax.ShapeDtypeStruct``s); its
                ``metadata``, if not None, must equal the saved one. ``step`` and
                ``data_step`` are ignored.
            step: the checkpoint to read; None for the newest readable one.
            fallback: with ``step=None``, skip unreadable checkpoints (newest first)
                until one reads back; False: the newest or an error.
            on_skip: called as ``on_skip(step, reason)`` for each checkpoint skipped;
                nothing is printed.
            absent_ok: top-level keys of ``like.metadata`` that a checkpoint may lack
                (recorded only by newer versions; see ``check_metadata``).

        Returns:
            The saved ``CheckpointState``: arrays exactly as saved, in ``like``'s
            structure, with the saved ``step``, ``data_step`` and ``metadata``.

        Raises:
            CheckpointUnreadable: ``step`` given (or ``fallback=False``) and that
                checkpoint does not read back completely (naming it and why).
            NoReadableCheckpoint: ``step=None`` and no checkpoint reads back (each
                one's reason in the message).
            ValueError: no checkpoint (for ``step``); the metadata differs
                (``MetadataMismatch``, "of another model", naming the keys); or a leaf
                is missing, extra, or has another shape, dtype or key implementation
                (naming the leaf). These are never skipped: a checkpoint of another
                model is not a fallback.

        It reads under a shared lock of the directory (``save`` writes under an
        exclusive one), so a save running in another process, with its pruning, never
        removes the checkpoint being read.
        """
        if not isinstance(like, CheckpointState):
            raise TypeError(f"like must be a CheckpointState, got {type(like).__name__}")
        with self._lock(shared=True):
            if self.read_only:  # another process may have saved or pruned since we listed
                self.reload()
            return self._restore(like, step, fallback, on_skip, absent_ok)

    def _restore(self, like, step, fallback, on_skip, absent_ok) -> CheckpointState:
        if step is not None or not fallback:
            return self._restore_step(like, self._resolve(step), absent_ok)
        steps = self.all_steps()
        if not steps:
            raise ValueError(f"no checkpoint in {self.directory}")
        skipped = []
        for s in reversed(steps):
            try:
                restored = self._restore_step(like, s, absent_ok)
            except CheckpointUnreadable as e:
                skipped.append((s, e.reason))
                continue
            for s_bad, reason in skipped:
                if on_skip is not None:
                    on_skip(s_bad, reason)
            return restored
        raise NoReadableCheckpoint(self.directory, skipped)

    def verify(self, step: int) -> None:
        """Checks that checkpoint ``step`` reads back completely, without restoring it:
        finalized, its ``meta`` parses, and every byte of its arrays reads back.

        Raises:
            CheckpointUnreadable: naming the step and what is wrong.
        """
        with self._lock(shared=True):
            self._meta(step)
            self._verify_state_files(step)

    def _check_stored_arrays(self, step: int, target) -> None:
        """The state item's own array metadata (shapes, dtypes) against ``target``, before
        orbax reads it: orbax would cast a float32 array into a float64 target silently."""
        def dotted(path):  # orbax's array names: "params.layers.0.0.w_ih"
            return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                            for k in path)

        want = {dotted(p): (tuple(x.shape), str(x.dtype))
                for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
        try:
            with _quiet():
                tree = ocp.StandardCheckpointHandler().metadata(
                    self.directory / str(step) / "state")
            stored = {m.name: (tuple(m.shape), str(m.dtype)) for m in jax.tree.leaves(tree)}
        except (*_READ_ERRORS, AttributeError, TypeError) as e:
            raise self._unreadable(step, f"state: its array metadata: {e}") from None
        if stored != want:
            bad = sorted(set(stored) ^ set(want)) or sorted(
                k for k in want if stored[k] != want[k])
            k = bad[0]
            raise self._unreadable(
                step, f"state: its arrays do not match its manifest: {k} is "
                      f"{_fmt(stored.get(k))} in the state but {_fmt(want.get(k))} in the "
                      f"manifest" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))

    def _restore_step(self, like: CheckpointState, step: int,
                      absent_ok: tuple[str, ...] = ()) -> CheckpointState:
        meta = self._meta(step)
        where = f"checkpoint {self.directory / str(step)}"
        if like.metadata is not None:
            check_metadata(meta["metadata"], like.metadata, where, absent_ok=absent_ok)
        like_tree = {"params": like.params, "opt_state": like.opt_state, "key": like.key}
        _check_manifest(meta["leaves"], _manifest(like_tree), where)
        target = _target(like_tree)
        self._verify_state_files(step)
        self._check_stored_arrays(step, target)
        try:
            with _quiet():
                stored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target)))["state"]
        except _READ_ERRORS as e:
            raise self._unreadable(step, f"state: {e}") from None
        # The arrays themselves, against the manifest the model was checked with.
        if jax.tree.structure(stored) != jax.tree.structure(target):
            raise self._unreadable(step, "state: its tree structure is not its manifest's")
        for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(stored)[0],
                                     jax.tree.leaves(target)):
            if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
                raise self._unreadable(
                    step, f"state: {jax.tree_util.keystr(path)} reads back as "
                          f"{got.dtype}{tuple(got.shape)}, its manifest says "
                          f"{want.dtype}{tuple(want.shape)}")
        tree = _from_stored(like_tree, stored)
        return CheckpointState(tree["params"], tree["opt_state"], meta["step"], tree["key"],
                               meta["data_step"], meta["metadata"])


# --- one-call functions --------------------------------------------------------

def save(directory, state: CheckpointState, *, keep: int | None = 3) -> Path:
    """Saves ``state`` in ``directory``, keeping the last ``keep`` checkpoints.

    See ``Checkpointer.save``; a training loop that saves often should keep one
    ``Checkpointer`` open instead.
    """
    with Checkpointer(directory, keep=keep) as ckpt:
        return ckpt.save(state)


def latest_step(directory) -> int | None:
    """The step of the latest finished checkpoint in ``directory``; None if there is none
    (or no such directory)."""
    if not Path(directory).expanduser().is_dir():
        return None
    with Checkpointer(directory, read_only=True) as ckpt:
        return ckpt.latest_step()


def restore(directory, like: CheckpointState, step: int | None = None, *,
            fallback: bool = True,
            on_skip: Callable[[int, str], None] | None = None,
            absent_ok: tuple[str, ...] = ()) -> CheckpointState:
    """Reads checkpoint ``step`` (default: the newest readable one) of ``directory`` into
    ``like``'s structure; see ``Checkpointer.restore``."""
    if not Path(directory).expanduser().is_dir():
        raise ValueError(f"no checkpoint in {directory}: no such directory")
    with Checkpointer(directory, read_only=True) as ckpt:
        return ckpt.restore(like, step, fallback=fallback, on_skip=on_skip,
                            absent_ok=absent_ok)


def read_metadata(directory, step: int | None = None) -> dict:
    """The ``metadata`` saved with checkpoint ``step`` (default: the latest) of ``directory``."""
    if not Path(directory).expanduser().is_dir():
        raise ValueError(f"no checkpoint in {directory}: no such directory")
    with Checkpointer(directory, read_only=True) as ckpt:
        return ckpt.read_metadata(step)
