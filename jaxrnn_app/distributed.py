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

With the flags, ``start`` first has the processes meet in a small handshake of its
own (``meet``) on the coordinator's port, then hands the port to JAX. Why: in jax
0.10 a process whose peers never register does not raise in Python; the
coordination client calls its ``missed_heartbeat_callback``, whose default is a
C++ ``LOG(FATAL)`` (SIGABRT, exit 134, a C++ stack trace, after the whole
``initialization_timeout``), and a Python callback in its place cannot even be
called (nanobind cannot pass it the ``absl::Status``: ``std::bad_cast``). The
handshake is plain Python sockets: process 0 listens on the coordinator's port
and knows which process ids have said hello, so a missing one ends every process
that came with ``StartRefused`` naming the missing ids within ``timeout_s``
(``DEFAULT_COORDINATOR_TIMEOUT``), before JAX is started and before anything is
written. (The other way, a parent process supervising the run, would have to relay
the run's stderr, progress bar included, to turn the abort into a line, and could
not name the missing processes.) A peer that dies after the handshake (between it
and JAX's registration, or mid-run) still ends the others through JAX's
heartbeat abort, which no Python code can catch: they exit 134 after JAX's
heartbeat timeout (100 s), and ``--resume`` continues from the last checkpoint.

After it, ``is_writer()`` says whether this process writes the run's files
(process 0), ``barrier(name)`` waits for every process, ``from_writer`` hands
process 0's decision (e.g. "this directory already holds a run") to all, and
``any_process`` tells every process whether any of them was asked to stop.
With one process all three are trivial, so callers need no special case.
"""

from __future__ import annotations

import errno
import itertools
import math
import os
import re
import socket
import time
from typing import NamedTuple

import jax

# The flags as the command line spells them, in the order they are named in messages.
FLAGS = ("--num-processes", "--process-id", "--coordinator")
BARRIER_TIMEOUT_S = 600  # a process that never arrives fails the barrier instead of hanging
# How long `start` waits for every process to join (``--coordinator-timeout``); JAX's
# own ``initialization_timeout`` defaults to 300 s.
DEFAULT_COORDINATOR_TIMEOUT = 120
_HELLO = "jaxrnn-meet"  # the handshake's first word: a connection without it is not ours
_REPLY_WAIT_S = 10  # beyond the timeout: process 0 answers within its own

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):([0-9]{1,5})$")
_barrier_ids = itertools.count()


class StartError(ConnectionError):
    """The processes of a multi-process run did not connect (the command line: exit 1)."""


class StartRefused(StartError, ValueError):
    """The processes never all met: nothing was started or written (the command line: exit 2).

    A ``ValueError`` too, so that the command line reports it as a refusal before
    anything changed.
    """


class Layout(NamedTuple):
    """Where this process stands: its index and the number of processes."""

    process_id: int  # in [0, num_processes)
    num_processes: int  # >= 1
    how: str  # "single", "flags" or the detected cluster's name ("slurm", "ompi", ...)


def check_flags(num_processes: int | None, process_id: int | None,
                coordinator: str | None, *, timeout_s: float | None = None) -> None:
    """Checks the three process flags together, before anything is started.

    Args:
        num_processes: ``--num-processes``, N >= 1, or None.
        process_id: ``--process-id``, in ``[0, N)``, or None.
        coordinator: ``--coordinator``, ``HOST:PORT`` (an IPv6 host in brackets), or None.
        timeout_s: ``--coordinator-timeout``, seconds > 0, or None (the default).

    Raises:
        ValueError: some but not all three given (naming the missing ones), N < 1,
            a process id outside ``[0, N)``, a coordinator that is not
            ``HOST:PORT`` with a port in ``[1, 65535]``, or a timeout that is not a
            finite number > 0.
    """
    if timeout_s is not None and (isinstance(timeout_s, bool)
                                  or not isinstance(timeout_s, (int, float))
                                  or not math.isfinite(timeout_s) or timeout_s <= 0):
        raise ValueError(f"--coordinator-timeout must be a number of seconds > 0, "
                         f"got {timeout_s!r}")
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
          coordinator: str | None = None, *, timeout_s: float | None = None) -> Layout:
    """Starts the multi-process runtime when the flags or the cluster ask for it.

    Call it once, before any JAX call that touches a backend (``jax.devices()``, an
    array, a computation).

    Args:
        num_processes, process_id, coordinator: the three process flags (all or none;
            see ``check_flags``).
        timeout_s: how long to wait for every process to join, in seconds
            (``--coordinator-timeout``; None: ``DEFAULT_COORDINATOR_TIMEOUT``).

    Returns:
        The ``Layout``; ``how == "single"`` where nothing was started.

    Raises:
        ValueError: bad flags (see ``check_flags``).
        StartRefused: with the flags, some processes did not join within
            ``timeout_s`` (naming them), or they disagree on the flags (see ``meet``).
        StartError: JAX's runtime did not start (or a JAX backend was already
            initialised).
    """
    check_flags(num_processes, process_id, coordinator, timeout_s=timeout_s)
    timeout_s = DEFAULT_COORDINATOR_TIMEOUT if timeout_s is None else timeout_s
    if num_processes is None:
        found = detected_cluster()
        if found is None:
            return Layout(0, 1, "single")
        how, kwargs = found[0], {}  # the cluster starts its processes: no handshake
    elif num_processes == 1:
        return Layout(0, 1, "single")
    else:
        assert process_id is not None and coordinator is not None  # check_flags: all three
        meet(num_processes, process_id, coordinator, timeout_s)
        how, kwargs = "flags", dict(coordinator_address=coordinator,
                                    num_processes=num_processes, process_id=process_id)
    # CPU collectives across processes: gloo over TCP. It is jax 0.10's default; set it
    # explicitly (unless the user chose, e.g. "mpi") so that a changed default cannot
    # leave a CPU run without cross-process collectives. GPU and TPU ignore it.
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(initialization_timeout=math.ceil(timeout_s), **kwargs)
    except RuntimeError as e:  # e.g. a backend already initialised
        where = f" --coordinator {coordinator}" if coordinator else f" ({how})"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StartError(f"cannot start the run of several processes{where}: {first}") from None
    return Layout(jax.process_index(), jax.process_count(), how)


# --- the handshake before JAX's runtime ------------------------------------------
def meet(num_processes: int, process_id: int, coordinator: str, timeout_s: float) -> None:
    """Waits until all ``num_processes`` processes have come, or refuses in every one that came.

    Process 0 listens on the coordinator's port (every address, as JAX's service
    binds it) and collects one hello (``jaxrnn-meet N I``) from each other
    process, which retries until process 0 listens. Then process 0 answers every
    one: ``go``, or ``refuse MESSAGE``, the same line everywhere. It closes the port
    before returning, for JAX's coordination service to bind it.

    Args:
        num_processes: N >= 2.
        process_id: this process's id, in ``[0, N)``.
        coordinator: ``HOST:PORT`` (checked by ``check_flags``).
        timeout_s: how long to wait, in seconds, from this call.

    Raises:
        StartRefused: processes missing after ``timeout_s`` (process 0 names them;
            the others name process 0 if they never reached it), two processes
            with one id, processes started with different ``--num-processes``, or
            process 0 unable to listen on the port.
    """
    m = _HOST_PORT.match(coordinator)
    if m is None:
        raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    host, port = m.group(1).strip("[]"), int(m.group(2))
    deadline = time.monotonic() + timeout_s
    if process_id == 0:
        _gather(port, num_processes, deadline, f"--coordinator {coordinator}", timeout_s)
    else:
        _join(host, port, num_processes, process_id, deadline, coordinator, timeout_s)


def _gather(port: int, n: int, deadline: float, where: str, timeout_s: float) -> None:
    """Process 0's side of ``meet``: collect the hellos, answer them all, raise on a refusal."""
    try:
        server = _listen(port)
    except OSError as e:
        raise StartRefused(f"process 0 cannot listen on port {port} ({where}): "
                           f"{e.strerror or e}") from None
    conns: list[socket.socket] = []
    ids: set[int] = set()
    problem: str | None = None
    with server:
        while len(ids) < n - 1 and problem is None and (left := deadline - time.monotonic()) > 0:
            server.settimeout(left)
            try:
                conn, _ = server.accept()
            except OSError:  # the timeout
                break
            hello = _read_line(conn, min(left, 5.0)) or ""
            words = hello.split()
            if len(words) != 3 or words[0] != _HELLO or not all(w.isdigit() for w in words[1:]):
                conn.close()  # not one of ours (a port scanner, a stale client)
                continue
            conns.append(conn)
            their_n, their_id = int(words[1]), int(words[2])
            if their_n != n:
                problem = (f"process {their_id} was started with --num-processes {their_n}, "
                           f"process 0 with --num-processes {n}")
            elif their_id in ids:  # (each sender checked its id is in [1, N))
                problem = f"two processes were started with --process-id {their_id} ({where})"
            ids.add(their_id)
        missing = sorted(set(range(1, n)) - ids)
        if problem is None and missing:
            problem = (f"{_processes(missing)} of {n} did not join within {timeout_s:g} s "
                       f"({where}): start {'it' if len(missing) == 1 else 'them'}, "
                       f"or raise --coordinator-timeout")
        reply = ("go" if problem is None else f"refuse {problem}").encode() + b"\n"
        for conn in conns:
            with conn:
                try:
                    conn.sendall(reply)
                    _read_line(conn, 2.0)  # their close first: the TIME_WAIT stays on their side
                except OSError:
                    pass  # gone already: it fails on its own
    if problem is not None:
        raise StartRefused(problem)


def _join(host: str, port: int, n: int, i: int, deadline: float, coordinator: str,
          timeout_s: float) -> None:
    """Process ``i``'s side of ``meet``: say hello to process 0 until it answers."""
    hello = f"{_HELLO} {n} {i}\n".encode()
    while (left := deadline - time.monotonic()) > 0:
        try:
            conn = socket.create_connection((host, port), timeout=min(left, 5.0))
        except OSError:  # process 0 not listening yet
            time.sleep(min(0.2, left))
            continue
        with conn:
            try:
                conn.sendall(hello)
                reply = _read_line(conn, timeout_s + _REPLY_WAIT_S)
            except OSError:
                reply = None
        if reply == "go":
            return
        if reply and reply.startswith("refuse "):
            raise StartRefused(reply.removeprefix("refuse "))
        time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))  # not process 0: retry
    raise StartRefused(f"process 0 of {n} (the coordinator, --coordinator {coordinator}) did "
                       f"not answer within {timeout_s:g} s: start it, or raise "
                       f"--coordinator-timeout")


def _listen(port: int) -> socket.socket:
    # Every address, IPv6 and IPv4, as JAX's service binds ([::]:PORT) unless IPv6 is off.
    if socket.has_dualstack_ipv6():
        try:
            return socket.create_server(("::", port), family=socket.AF_INET6,
                                        dualstack_ipv6=True)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise
    return socket.create_server(("", port))


def _read_line(conn: socket.socket, timeout_s: float) -> str | None:
    """One short line from ``conn`` (stripped), or None at its end, a timeout or an error."""
    conn.settimeout(timeout_s)
    data = b""
    try:
        while not data.endswith(b"\n") and len(data) < 1024:
            chunk = conn.recv(1024)
            if not chunk:
                return None
            data += chunk
    except OSError:
        return None
    return data.decode(errors="replace").strip()


def _processes(ids: list[int]) -> str:
    return (f"process {ids[0]}" if len(ids) == 1
            else f"processes {', '.join(map(str, ids[:-1]))} and {ids[-1]}")


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
