"""Data-parallel training over many devices with ``jax.sharding``.

The layout is plain data parallelism:

* a 1-D ``Mesh`` over one axis named ``"data"`` (``make_mesh``);
* the batch axis of every batch array is split over that axis (``shard_batch``):
  ``xs (T, B, D)`` and ``targets (T, B, ...)`` along axis 1 (time-major), ``lengths
  (B,)`` along axis 0, so each of the ``n`` devices holds ``B / n`` sequences;
* the parameters and the optimizer state are replicated on every device
  (``replicate``, ``PartitionSpec()``).

``make_sharded_train_step`` jit-compiles the ordinary train step for that layout.
No collective is written by hand: XLA's SPMD partitioner runs the forward scan and
the reverse-scan BPTT on each device's shard of the batch and inserts the
all-reduce that sums the gradient (and the loss) over devices. Because the
``"mse"`` and ``"xent"`` losses are means over the whole batch and ``"half_sse"``
a sum, the sharded step computes the same numbers as the single-device step, up to
the order of float additions::

    mesh = make_mesh(choose_devices(None, batch_size))  # or make_mesh(4)
    step = make_sharded_train_step(model, optimizer, mesh, loss="mse")
    params, opt_state = replicate((params, opt_state), mesh)
    for batch in batches:
        params, opt_state, metrics = step(params, opt_state, shard_batch(batch, mesh))

On one CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set before
JAX is imported) gives four CPU devices to try this with.

Across processes: start JAX's runtime at the start of the program, before any
other JAX call, on every process (``jaxrnn_app.distributed.start`` from the command
line's three flags, or ``jax.distributed.initialize()`` with ``coordinator_address``,
``num_processes`` and ``process_id``, or nothing on TPU pods, SLURM and other
clusters JAX detects; ``jaxrnn train --num-processes`` does it). Then ``jax.devices()`` lists the devices of all hosts,
``make_mesh`` spans them and the same step runs unchanged, one program per process.
Each process then feeds only its own part of the global batch:
``shard_batch(local_batch, mesh, process_local=True)`` builds the global arrays with
``jax.make_array_from_process_local_data`` from each process's ``B / num_processes``
sequences (which must split evenly over that process's devices); ``process_part``
says which rows of the global batch those are, and ``replicate`` places a value
that every process holds on the devices of all of them. Without
``process_local``, ``shard_batch`` expects every process to hold the same, whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxrnn import RNN, Batch, make_train_step
from jaxrnn.extend import StepFn

DATA_AXIS = "data"


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def make_mesh(devices: int | None = None) -> Mesh:
    """A 1-D mesh over the axis ``"data"``.

    Args:
        devices: use the first this many of ``jax.devices()``; None uses all of
            them. In a single process these are the local devices; after
            ``jax.distributed.initialize()`` they are the devices of all processes.

    Returns:
        A ``jax.sharding.Mesh`` of shape ``(devices,)`` with axis name ``"data"``
        (``AxisType.Auto``: the XLA partitioner propagates the shardings).

    Raises:
        ValueError: ``devices`` is not an integer in ``[1, jax.device_count()]``.
    """
    available = jax.devices()
    n = len(available) if devices is None else devices
    if not _is_int(n) or not 1 <= n <= len(available):
        raise ValueError(f"devices must be an integer in [1, {len(available)}] "
                         f"({len(available)} available), got {devices!r}")
    return jax.make_mesh((int(n),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                         devices=available[:n])


def choose_devices(requested: int | None, batch_size: int) -> int:
    """How many devices to shard a batch of ``batch_size`` sequences over.

    Args:
        requested: the ``--devices`` option; None chooses automatically.
        batch_size: B, the global batch size.

    Returns:
        ``requested`` if given; otherwise the largest device count no larger than
        ``jax.device_count()`` that divides ``batch_size`` (1 at worst).

    Raises:
        ValueError: ``batch_size`` is not a positive integer, or ``requested`` is
            not an integer in ``[1, jax.device_count()]`` or does not divide
            ``batch_size``.
    """
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    available = jax.device_count()
    if requested is None:
        return max(n for n in range(1, min(available, batch_size) + 1) if batch_size % n == 0)
    if not _is_int(requested) or not 1 <= requested <= available:
        raise ValueError(f"devices (--devices) must be an integer in [1, {available}] "
                         f"({available} available), got {requested!r}")
    if batch_size % requested:
        raise ValueError(f"devices (--devices) = {requested} must divide the batch size "
                         f"{batch_size}")
    return int(requested)


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of params and optimizer state: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, batch: Batch) -> Batch:
    """A ``Batch`` of shardings: ``xs``/``targets`` split on axis 1, ``lengths`` on axis 0."""
    time_major = NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))
    lengths = None if batch.lengths is None else NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return Batch(time_major, time_major, lengths)


def _mesh_size(mesh: Mesh) -> int:
    if not isinstance(mesh, Mesh) or DATA_AXIS not in mesh.shape:
        raise ValueError(f"mesh must be a jax.sharding.Mesh with a {DATA_AXIS!r} axis "
                         f"(from make_mesh), got {mesh!r}")
    return mesh.shape[DATA_AXIS]


def _check_batch(batch: Batch, n: int, what: str) -> int:
    """Validates the batch's shapes; returns B. ``n`` must divide B."""
    if not isinstance(batch, Batch):
        raise TypeError(f"batch must be a jaxrnn.Batch, got {type(batch).__name__}")
    if np.ndim(batch.xs) != 3:
        raise ValueError(f"batch.xs must have shape (T, B, D) (time-major), "
                         f"got shape {np.shape(batch.xs)}")
    B = np.shape(batch.xs)[1]
    if np.ndim(batch.targets) < 2 or np.shape(batch.targets)[1] != B:
        raise ValueError(f"batch.targets must have shape (T, B={B}, ...), "
                         f"got shape {np.shape(batch.targets)}")
    if batch.lengths is not None and np.shape(batch.lengths) != (B,):
        raise ValueError(f"batch.lengths must have shape (B,) = ({B},), "
                         f"got shape {np.shape(batch.lengths)}")
    if B % n:
        raise ValueError(f"the batch size B={B} (axis 1 of batch.xs) must be divisible by "
                         f"the {n} {what}")
    return B


def shard_batch(batch: Batch, mesh: Mesh, *, process_local: bool = False) -> Batch:
    """Places a batch on the mesh, split along its batch axis.

    Args:
        batch: ``xs (T, B, D)``, ``targets (T, B, O)`` or ``(T, B)``, ``lengths
            (B,)`` or None; numpy or JAX arrays.
        mesh: from ``make_mesh``.
        process_local: ``batch`` is only this process's part of the global batch
            (multi-host data loading), placed on this process's devices; the global
            B is the sum over processes (which global rows a process's sequences
            become follows the mesh's device order; for data parallelism only the
            set matters). With one process this is the same as False.

    Returns:
        The ``Batch`` as global ``jax.Array``s: ``xs`` and ``targets`` sharded on
        axis 1 and ``lengths`` on axis 0 over the ``"data"`` axis.

    Raises:
        TypeError: ``batch`` is not a ``Batch``.
        ValueError: mismatched shapes, or B is not divisible by the number of
            devices of the mesh (with ``process_local``, of this process's devices).
    """
    n = _mesh_size(mesh)
    if process_local:
        local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
        if local == 0:
            raise ValueError(f"process_local=True, but process {jax.process_index()} has "
                             f"no devices in the mesh")
        _check_batch(batch, local, "devices of this process in the mesh")
        return jax.make_array_from_process_local_data(
            batch_sharding(mesh, batch), jax.tree.map(np.asarray, batch))
    _check_batch(batch, n, "devices of the mesh")
    return jax.device_put(batch, batch_sharding(mesh, batch))


def process_part(mesh: Mesh, batch_size: int) -> tuple[int, int]:
    """Which rows of a global batch this process feeds to ``shard_batch(..., process_local=True)``.

    The rows are those of this process's devices in the mesh (in the mesh's device
    order), so a process that produces exactly them (``Task.batch(step, part=...)``)
    places the same global batch as one process holding it whole.

    Args:
        mesh: from ``make_mesh``, over the devices of every process.
        batch_size: B of the global batch; the mesh's size must divide it.

    Returns:
        ``(i, n)``: this process holds rows ``[i*B/n, (i+1)*B/n)``.

    Raises:
        ValueError: the mesh's size does not divide B, this process has no device in
            the mesh, or its rows are not one block of ``B/n`` rows (processes with
            different numbers of devices in the mesh).
    """
    size = _mesh_size(mesh)
    if not _is_int(batch_size) or batch_size < 1 or batch_size % size:
        raise ValueError(f"the batch size {batch_size!r} must be a positive multiple of the "
                         f"{size} devices of the mesh")
    index = NamedSharding(mesh, PartitionSpec(DATA_AXIS)).addressable_devices_indices_map(
        (batch_size,))
    if not index:
        raise ValueError(f"process {jax.process_index()} has no devices in the mesh")
    blocks = sorted((s.start or 0, batch_size if s.stop is None else s.stop)
                    for (s,) in index.values())
    start, stop = blocks[0][0], blocks[-1][1]
    rows = stop - start
    contiguous = all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    if not contiguous or batch_size % rows or start % rows:
        raise ValueError(f"process {jax.process_index()} holds rows {blocks} of the batch of "
                         f"{batch_size}: every process needs one block of the same size "
                         f"(the same number of devices in the mesh)")
    return start // rows, batch_size // rows


def replicate(tree, mesh: Mesh):
    """Places a pytree (params, optimizer state, a PRNG key) fully on every device.

    Args:
        tree: any pytree of arrays; None leaves stay None (they are empty
            subtrees), typed PRNG key arrays stay key arrays.
        mesh: from ``make_mesh``.

    Returns:
        The same pytree with every leaf a ``jax.Array`` replicated over the mesh
        (``NamedSharding(mesh, PartitionSpec())``), in new buffers: donating them
        to the step leaves ``tree`` intact.
    """
    _mesh_size(mesh)
    sharding = replicated_sharding(mesh)
    if not sharding.is_fully_addressable:  # a mesh over several processes' devices
        return jax.tree.map(lambda x: _replicate_across_processes(x, sharding), tree)
    # Copy first: device_put reuses the buffer of an array already on one of the mesh's
    # devices (even with may_alias=False in jax 0.10), and a donating step would then
    # delete the caller's array.
    return jax.device_put(jax.tree.map(jnp.copy, tree), sharding)


def _replicate_across_processes(x, sharding: NamedSharding):
    """One leaf, the same value in every process, as a global array replicated over
    ``sharding``'s devices (``device_put`` takes only this process's devices)."""
    is_key = jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(x) if is_key else x)  # a host copy
    out = jax.make_array_from_callback(data.shape, sharding, lambda index: data[index])
    return jax.random.wrap_key_data(out, impl=jax.random.key_impl(x)) if is_key else out


def make_sharded_train_step(model: RNN, optimizer: optax.GradientTransformation, mesh: Mesh,
                            loss: str = "half_sse", method: str = "bptt",
                            donate: bool = True, last_only: bool = False,
                            diagnostics: bool = False) -> StepFn:
    """``train.make_train_step``'s step, compiled for data parallelism over ``mesh``.

    Args:
        model: the ``RNN``.
        optimizer: any optax ``GradientTransformation``.
        mesh: from ``make_mesh``.
        loss: ``"half_sse"``, ``"mse"`` or ``"xent"``.
        method: ``"bptt"``, ``"autodiff"`` or ``"rtrl"`` (as in ``make_train_step``).
        donate: donate the ``params`` and ``opt_state`` buffers.
        last_only: score only the last step (as in ``make_train_step``).
        diagnostics: add the per-step gradient diagnostics' summary to the metrics
            (as in ``make_train_step``).

    Returns:
        ``step(params, opt_state, batch, key=None) -> (params, opt_state, metrics)``
        as from ``make_train_step``. Pass ``params``, ``opt_state`` (and ``key``)
        from ``replicate`` and ``batch`` from ``shard_batch``; inside, the
        arguments are constrained to that layout (so other placements on the
        mesh's devices are resharded, not an error). The returned ``params``,
        ``opt_state`` and ``metrics`` are replicated over the mesh.

    Raises:
        ValueError: as ``make_train_step``; when called, also if the batch size is
            not divisible by the mesh's size.
    """
    n = _mesh_size(mesh)
    inner = make_train_step(model, optimizer, loss=loss, method=method, donate=False,
                            last_only=last_only, diagnostics=diagnostics)
    replicated = replicated_sharding(mesh)

    def step(params, opt_state, batch: Batch, key: jax.Array | None = None):
        _check_batch(batch, n, "devices of the mesh")
        params, opt_state, key = jax.lax.with_sharding_constraint(
            (params, opt_state, key), replicated)
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding(mesh, batch))
        return inner(params, opt_state, batch, key)

    return jax.jit(step, out_shardings=replicated, donate_argnums=(0, 1) if donate else ())
