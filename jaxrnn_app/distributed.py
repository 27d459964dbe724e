"""Runs over several processes: starting JAX's multi-controller runtime, process 0, barriers.

One program runs in every process (JAX's multi-controller model): each process
owns its local devices, ``jax.devices()`` lists the devices of all processes,
and a jit-compiled step over a mesh of them runs in every process at once, the
collectives (the gradient all-reduce) going between processes (on CPU through
gloo, over TCP).

``start`` is what ``jaxrnn train --num-processes N --process-id I --coordinator
HOST:PORT`` calls before anything touches a JAX backend:

* all three given with ``N > 1``: ``jax.distributed.initialize`` with them (process
  ``0`` also runs the coordinator service on ``HOST:PORT``);
* none given: JAX's own cluster detection (SLURM, Open MPI's ``mpirun``, Cloud TPU
  VMs and GKE, Kubernetes with the ``kubernetes`` package), and only if it finds a
  cluster of more than one process; on a plain machine nothing is started;
* ``N == 1``: nothing is started (a one-process run, exactly as without the flags).

After it, ``is_writer()`` says whether this process writes the run's files
(process 0), ``barrier(name)`` waits for every process, ``from_writer`` hands
process 0's decision (e.g. "this directory already holds a run") to all, and
``any_process`` tells every process whether any of them was asked to stop.
With one process all three are trivial, so callers need no special case.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import NamedTuple

import jax

# The flags as the command line spells them, in the order they are named in messages.
FLAGS = ("--num-processes", "--process-id", "--coordinator")
BARRIER_TIMEOUT_S = 600  # a process that never arrives fails the barrier instead of hanging

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):([0-9]{1,5})$")
_barrier_ids = itertools.count()


class StartError(ConnectionError):
    """The processes of a multi-process run did not connect (the command line: exit 1)."""


class Layout(NamedTuple):
    """Where this process stands: its index and the number of processes."""

    process_id: int  # in [0, num_processes)
    num_processes: int  # >= 1
    how: str  # "single", "flags" or the detected cluster's name ("slurm", "ompi", ...)


def check_flags(num_processes: int | None, process_id: int | None,
                coordinator: str | None) -> None:
    """Checks the three process flags together, before anything is started.

    Args:
        num_processes: ``--num-processes``, N >= 1, or None.
        process_id: ``--process-id``, in ``[0, N)``, or None.
        coordinator: ``--coordinator``, ``HOST:PORT`` (an IPv6 host in brackets), or None.

    Raises:
        ValueError: some but not all three given (naming the missing ones), N < 1,
            a process id outside ``[0, N)``, or a coordinator that is not
            ``HOST:PORT`` with a port in ``[1, 65535]``.
    """
    given = dict(zip(FLAGS, (num_processes, process_id, coordinator)))
    missing = [f for f, v in given.items() if v is None]
    if missing and len(missing) < len(FLAGS):
        present = [f for f, v in given.items() if v is not None]
        raise ValueError(f"{', '.join(present)} also need{'s' if len(present) == 1 else ''} "
                         f"{' and '.join(missing)}: give all three process flags or none")
    if missing:
        return
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"--num-processes must be an integer >= 1, got {num_processes!r}")
    if (isinstance(process_id, bool) or not isinstance(process_id, int)
            or not 0 <= process_id < num_processes):
        raise ValueError(f"--process-id must be an integer in [0, {num_processes}) for "
                         f"--num-processes {num_processes}, got {process_id!r}")
    m = _HOST_PORT.match(coordinator) if isinstance(coordinator, str) else None
    if m is None or not 1 <= int(m.group(2)) <= 65535:
        raise ValueError(f"--coordinator must be HOST:PORT (e.g. 10.0.0.1:1234, a port in "
                         f"[1, 65535]), got {coordinator!r}")


def detected_cluster() -> tuple[str, int] | None:
    """The multi-process cluster JAX's ``jax.distributed.initialize()`` would detect.

    Asks the cluster environments that ``jax.distributed.initialize()`` itself
    tries when given no arguments (jax 0.10: ``jax._src.clusters``: SLURM, Open
    MPI, Cloud TPU GCE/GKE, Kubernetes; the opt-in mpi4py one is not tried), in
    its order.

    Returns:
        ``(name, process_count)`` of the first environment present with more than
        one process, or None (a plain machine, or a one-process job).
    """
    # Private in jax 0.10 (orbax reaches into jax._src.distributed the same way); if a
    # later jax moves it, no cluster is detected and the flags still work.
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:
        return None
    for env in ClusterEnv._cluster_types:
        if env.opt_in_only_method:
            continue
        try:
            present = env.is_env_present()
            count = env.get_process_count() if present else 1
        except Exception:  # a half-configured environment: JAX would fail on it too
            continue
        if present:
            return (env.name or env.__name__, int(count)) if count > 1 else None
    return None


def start(num_processes: int | None = None, process_id: int | None = None,
          coordinator: str | None = None, *, timeout_s: int = 300) -> Layout:
    """Starts the multi-process runtime when the flags or the cluster ask for it.

    Call it once, before any JAX call that touches a backend (``jax.devices()``, an
    array, a computation).

    Args:
        num_processes, process_id, coordinator: the three process flags (all or none;
            see ``check_flags``).
        timeout_s: how long to wait for every process to connect.

    Returns:
        The ``Layout``; ``how == "single"`` where nothing was started.

    Raises:
        ValueError: bad flags (see ``check_flags``).
        StartError: the processes did not connect within ``timeout_s`` (or a JAX
            backend was already initialised).
    """
    check_flags(num_processes, process_id, coordinator)
    if num_processes is None:
        found = detected_cluster()
        if found is None:
            return Layout(0, 1, "single")
        how, kwargs = found[0], {}
    elif num_processes == 1:
        return Layout(0, 1, "single")
    else:
        how, kwargs = "flags", dict(coordinator_address=coordinator,
                                    num_processes=num_processes, process_id=process_id)
    # CPU collectives across processes: gloo over TCP. It is jax 0.10's default; set it
    # explicitly (unless the user chose, e.g. "mpi") so that a changed default cannot
    # leave a CPU run without cross-process collectives. GPU and TPU ignore it.
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
    except RuntimeError as e:  # e.g. a process that never came, within timeout_s
        where = f" --coordinator {coordinator}" if coordinator else f" ({how})"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StartError(f"cannot start the run of several processes{where}: {first}") from None
    return Layout(jax.process_index(), jax.process_count(), how)


def is_multiprocess() -> bool:
    """Whether this is one of several processes (the runtime is started, N > 1)."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def is_writer() -> bool:
    """Whether this process writes the run's files and messages: process 0 (or the only one)."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def _client():
    # The coordination service's client (private in jax 0.10; orbax uses it the same way).
    from jax._src.distributed import global_state

    return global_state.client


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
    """Waits until every process has called ``barrier`` with this name; no-op for one.

    Every process must call the barriers in the same order.

    Raises:
        RuntimeError (from JAX): a process did not arrive within ``timeout_s``.
    """
    if is_multiprocess():
        _client().wait_at_barrier(f"jaxrnn/{name}/{next(_barrier_ids)}", timeout_s * 1000)


def from_writer(name: str, value: str | None, timeout_s: int = BARRIER_TIMEOUT_S
                ) -> str | None:
    """Process 0's ``value`` (a decision, an error message, a path; or None), in every process.

    Process 0 publishes its own through the coordination service's key-value store;
    the others wait for it and return it instead of theirs, so a decision that
    reads the file system (which process 0 may change next) or the clock is taken
    once, by process 0.

    Args:
        name: what is decided (part of the key; every process must ask in the same order).
        value: this process's value (only process 0's counts).
        timeout_s: how long the others wait for process 0.

    Returns:
        Process 0's ``value`` (``value`` itself with one process).
    """
    if not is_multiprocess():
        return value
    key = f"jaxrnn/from_writer/{name}/{next(_barrier_ids)}"
    if jax.process_index() == 0:
        _client().key_value_set(key, "" if value is None else "!" + value)
        return value
    got = _client().blocking_key_value_get(key, timeout_s * 1000)
    return got[1:] if got else None


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is True in any process (a small collective; every process must call).

    Used to stop every process at the same step when one of them got SIGINT/SIGTERM.
    """
    if not is_multiprocess():
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))
