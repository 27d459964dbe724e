r"""Memory estimates: a training run's peak memory, from shapes alone, and what the machine has.

``estimate_step`` sums what one jit-compiled training step (``train.make_train_step``)
holds at its peak; ``estimate_run`` adds what a run keeps beside it (the task's
data, the held-out evaluation); ``available_memory`` reads what the machine can
give. Nothing is allocated: the parameters' and the optimizer state's shapes come
from ``jax.eval_shape`` of ``model.init`` and ``optimizer.init``, a cell's per-step
residuals from ``jax.eval_shape`` of its ``step`` (``jax.vjp`` of it for
``method="autodiff"``).

Notation: ``T`` steps (``k2`` under truncated BPTT), ``B`` batch, ``L`` layers,
``n`` directions (1 or 2), per layer ``l`` and direction: ``D_l`` input features
(``D`` for the first layer, ``n*P`` above), ``P`` the layer's output width (``H``, or
``proj_size``), ``GH`` the input projection's width (``w_ih``'s rows, ``G*H``),
``C`` the carry's width (``sum(cell.state_sizes(H))``), ``R`` the residuals
``cell.step`` returns per example and step, ``A`` the residuals ``jax.vjp`` of
``cell.step`` keeps per example and step; ``O`` outputs, ``s`` the dtype's bytes.
Counts below are elements; each is multiplied by ``s``.

The step's peak, in elements:

.. math::
    \text{step} = \underbrace{|\theta|}_{\text{parameters}}
      + \underbrace{|\text{opt}|}_{\text{optimizer}}
      + \underbrace{2|\theta|}_{\text{gradients, updates}}
      + \underbrace{T B D + |\text{targets}|}_{\text{batch}}
      + \text{activations},

    \text{activations} = \max\Big(\sum_l \text{stored}_l + \text{readout},\;
      \max_l \big[\textstyle\sum_{l' < l} \text{stored}_{l'} + \text{kept}_l
      + T B n P + \text{backward}_l\big]\Big)

the larger of the readout's phase (every layer's stored forward, the outputs and
their cotangents) and each layer's backward phase (the stored forward of the
layers below, what this layer's backward keeps, the cotangent of its outputs
``dhs (T, B, n P)``, its reverse scans' buffers). Per layer, both directions
summed (their scans are independent; XLA may overlap them):

* copies (every method): ``T B D_l`` for the concatenated directions feeding a
  layer above the first (``n = 2``) and for the second direction's reversed
  input (its output, reversed back, XLA writes into the concatenation).
* ``bptt`` (``scan.forward_scan`` keeping residuals, ``scan.backward_scan``):
  stored = kept = ``T B (C + R)`` + copies: the carries ``(T, B, C)`` and the
  residuals (a gated cell's first residual, ``(T, B, GH)``, is written over the
  input projection's buffer, so it *is* that buffer). backward = the reverse
  scan's own buffer plan (``extend.backward_plan``, the one ``backward_scan``
  follows), ``BufferPlan.elements``: ``T B (GH [dgi; 0 when written over dhs or
  over that residual, or shaped like dhs] + GH [dgh; 0 when folded] + P [h_{t-1}
  transposed for dW_hh] + D_l [x transposed for dW_ih] + D_l [dx])``.
* ``bptt`` with ``bptt_segment=k`` (``scan.lean_bptt_layer``, ``S = ceil(T/k)``):
  stored = ``S B C`` (the carry at each segment's start) + copies, plus the
  outputs ``T B P`` with one direction (with two, their concatenation holds
  them); kept = ``S B C`` + copies; backward = ``S k B D_l`` (``dx`` stacked; with
  padding, ``S k > T``: plus its unpadded slice ``T B D_l`` and the
  padded ``x`` and ``dhs``, ``S k B (D_l + P)``) + ``k B (C + R + GH)`` (one
  segment's recomputed forward) + the ``bptt`` backward at ``T = k``.
* ``autodiff`` (``jax.grad`` through ``lax.scan``): stored = kept = ``T B A`` +
  copies; backward = ``T B (GH + 2 D_l)`` (``d xp`` stacked, ``x`` transposed, ``dx``;
  the scan's transpose sums ``dW_hh`` in the loop).
* readout = ``T' B (2 O)`` (outputs and their cotangent; ``3 O`` for ``xent``) +
  ``T B n P`` (``dhs``, padded back to every step for a last-step loss) +
  ``T' B n P`` with two directions (their concatenation); ``T' = 1`` for a
  last-step loss, else ``T``.
* an estimator (``rtrl``, ``snap1``, ``uoro``, ...: ``jaxrnn.estimators``): no
  per-step storage; its state and working arrays as it states them
  (``Estimator.cost``: ``state + work``), one more state (the update's new one,
  or an online run's carried one), plus ``T B (D + 2 P)``.

``estimate_run`` adds the task's data that the run keeps (two training batches
and the held-out batch on the device, the text's ids for ``charlm``) and takes
as the transient part the largest of: the training step's activations, the
evaluation's forward pass over the held-out batch (``T E (D_l + GH + C + n P)``
at its widest layer, ``E`` held-out sequences), and the float64 numpy arrays a
batch is sampled through.

Checked against XLA's own buffer assignment of the compiled step
(``Compiled.memory_analysis()``: argument + output - alias + temp) in
``tests/test_memory.py``. Not counted: the compiled code and the compiler's own
memory, the runtime already in use when the available memory is read, and data
parallelism (the estimate is of one device holding the whole batch: with N
devices each holds 1/N of the batch and a replica of the parameters).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrnn import extend
from jaxrnn.estimators import get_estimator

GB = 1e9


class MemoryEstimate(NamedTuple):
    """A run's (or a step's) peak memory in bytes, by part; ``total`` is their sum."""

    parameters: int  # the model's parameters
    optimizer: int  # the optimizer's state
    gradients: int  # the gradients and the optimizer's updates (2 x parameters)
    activations: int  # stored forward, backward buffers, readout (a run: its largest transient)
    data: int  # the batches and task data the run keeps

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer + self.gradients + self.activations + self.data

    def describe(self) -> str:
        """``about 160.2 GB (parameters 0.16 GB, optimizer 0.32 GB, ...)``."""
        parts = ", ".join(f"{name} {format_gb(getattr(self, name))}" for name in self._fields
                          if getattr(self, name) >= 0.01 * self.total)
        return f"about {format_gb(self.total)} ({parts})"

    def dominant(self) -> str:
        """The largest part's name."""
        return max(self._fields, key=lambda name: getattr(self, name))


def format_gb(n: float) -> str:
    """Bytes in GB, three significant digits below 10 GB: ``0.164 GB``, ``1,234.5 GB``
    (in MB below 0.01 GB: ``2.5 MB``)."""
    g = n / GB
    if g < 0.01:
        return f"{n / 1e6:.3g} MB"
    return f"{g:.3g} GB" if g < 10 else f"{g:,.1f} GB"


def tree_bytes(tree) -> int:
    """Bytes of a pytree of arrays or ``jax.ShapeDtypeStruct`` (no array is touched)."""
    return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree))


def abstract_params(model, dtype="float32"):
    """``model.init``'s parameters as ``jax.ShapeDtypeStruct`` (``jax.eval_shape``: none made)."""
    return jax.eval_shape(lambda key: model.init(key, jnp.dtype(dtype)), jax.random.key(0))


def _step_residuals(cell, params, state_sizes, dtype, autodiff: bool) -> int:
    """``R`` (``cell.step``'s residuals) or ``A`` (``jax.vjp``'s), elements per example and step.

    Both are the elements at batch 2 minus those at batch 1: what does not grow with
    the batch (``jax.vjp`` keeps the weights too) is kept once, not per step. ``A``
    equals what ``lax.scan``'s own linearization stacks per step (checked for the
    built-in cells on ``jax.vjp`` of ``scan.layer(..., method="autodiff")``).
    """
    gh = params.w_ih.shape[0]

    def count(b):
        carry = tuple(jax.ShapeDtypeStruct((b, w), dtype) for w in state_sizes)
        xp = jax.ShapeDtypeStruct((b, gh), dtype)
        if autodiff:
            saved = jax.eval_shape(lambda p, c, x: jax.vjp(cell.step, p, c, x)[1], params,
                                   carry, xp)
        else:
            saved = jax.eval_shape(cell.step, params, carry, xp)[1]
        return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(saved))

    return count(2) - count(1)


def _layers(model, params):
    """Per (layer, direction): ``(D_l, GH, P)``, input width, projection width, output width."""
    P = model.layer_output_size
    return [[(p.w_ih.shape[1], p.w_ih.shape[0], P) for p in dirs] for dirs in params.layers]


def _backward_plans(model, params, B, dtype):
    """Per (layer, direction): the reverse scan's ``extend.BufferPlan``, from shapes alone.

    The plan is the one ``extend.backward_scan`` follows; its ``elements(T, B)`` are
    that layer's reverse-scan buffers (``dgi`` unless written over ``dhs`` or over a
    residual, ``dgh`` unless folded, ``h_{t-1}`` and ``x`` transposed, ``dx``).
    """
    cell = model.cell_fn
    shape = lambda *dims: jax.ShapeDtypeStruct(dims, dtype)  # noqa: E731
    carry0 = tuple(shape(B, w) for w in cell.state_sizes(model.hidden_size))
    return [[extend.backward_plan(cell, p, shape(1, B, D_l), carry0, shape(1, B, P))
             for p, (D_l, _, P) in zip(dirs, dims)]
            for dirs, dims in zip(params.layers, _layers(model, params))]


def _activations(model, params, method, T, B, segment, loss, last_only, dtype) -> int:
    """Elements of the step's activations at their peak (see the module docstring).

    The peak is the larger of the readout's phase (every layer's stored forward,
    the outputs and their cotangents) and, for each layer from the top down, its
    backward phase: the stored forward of the layers below, what this layer's
    backward keeps, the incoming cotangent ``dhs (T, B, n P)`` and the reverse
    scans' buffers of both directions (independent: XLA may overlap them).
    """
    cell = model.cell_fn
    sizes = cell.state_sizes(model.hidden_size)
    C = sum(sizes)
    n = model.num_directions
    P = model.layer_output_size
    O = model.output_size
    if method not in extend.METHODS:  # an estimator: its state, not the sequence
        cost = get_estimator(method).cost(cell, tuple(dirs[0] for dirs in params.layers), B)
        return 2 * cost.state + cost.work + T * B * (model.input_size + 2 * P)
    R = _step_residuals(cell, params.layers[0][0], sizes, dtype, autodiff=(method == "autodiff"))
    plans = _backward_plans(model, params, B, dtype) if method == "bptt" else None
    stored, kept, backward = [], [], []  # per layer, both directions summed
    for l, dirs in enumerate(_layers(model, params)):
        s_l = k_l = b_l = 0
        for d, (D_l, GH, P_) in enumerate(dirs):
            # new arrays made for this direction: the concatenated directions below (once
            # per layer) and the second direction's reversed input (its output, reversed
            # back, XLA writes straight into the concatenation)
            copies = T * B * D_l * ((l > 0 and n == 2 and d == 0) + (d == 1))
            if method == "autodiff":  # jax.vjp's per-step values, stacked by lax.scan
                s_l += T * B * R + copies
                k_l += T * B * R + copies
                b_l += T * B * (GH + 2 * D_l)  # d(xp) stacked, x transposed, dx
            elif segment is None:  # the carries and the cell's residuals
                s_l += T * B * (C + R) + copies
                k_l += T * B * (C + R) + copies
                b_l += plans[l][d].elements(T, B)  # the reverse scan's own plan
            else:  # the outputs and the carry at each segment's start; recompute
                k = segment
                S = -(-T // k)
                pad = S * k - T
                # the outputs are the next layer's input (or the readout's) as they are
                # with one direction; with two, their concatenation holds them
                s_l += (T * B * P_ if n == 1 else 0) + S * B * C + copies
                k_l += S * B * C + copies
                b_l += (S * k * B * D_l + (T * B * D_l if pad else 0)  # dx stacked (and sliced)
                        + (S * k * B * (D_l + P_) if pad else 0)  # the padded x and dhs
                        + k * B * (C + R + GH)  # one segment's recomputed forward
                        + plans[l][d].elements(k, B))  # the reverse scan over one segment
        stored.append(s_l)
        kept.append(k_l)
        backward.append(b_l)
    T_out = 1 if last_only else T
    dhs = T * B * n * P  # the cotangent of a layer's outputs (padded back for last_only)
    readout = (T_out * B * (2 * O + (O if loss == "xent" else 0))  # outputs, cotangent
               + dhs + (T_out * B * n * P if n == 2 else 0))  # the directions concatenated
    phases = [sum(stored) + readout]
    for l in range(len(stored)):
        phases.append(sum(stored[:l]) + kept[l] + dhs + backward[l])
    return max(phases)


def estimate_step(model, optimizer, batch: int, seq_len: int, method: str = "bptt",
                  loss: str = "mse", last_only: bool = False, dtype="float32",
                  k1: int | None = None, k2: int | None = None,
                  params=None) -> MemoryEstimate:
    """The peak memory of one training step (``train.make_train_step``), in bytes.

    Args:
        model: the ``RNN`` (its ``bptt_segment`` is read).
        optimizer: the optax ``GradientTransformation``.
        batch: B.
        seq_len: T.
        method: ``"bptt"``, ``"autodiff"`` or an estimator's name (``"rtrl"``, ...).
        loss: ``"half_sse"``, ``"mse"`` or ``"xent"`` (integer targets (T, B)).
        last_only: only the last step is scored.
        dtype: the parameters' and inputs' floating dtype; every term is counted in
            it, under a ``model.compute_dtype`` (mixed precision) too.
        k1, k2: truncated BPTT: the step runs over windows of ``k2`` (default ``k1``) steps.
        params: the parameters' shapes, if known (default ``abstract_params(model, dtype)``).

    Returns:
        A ``MemoryEstimate`` whose ``data`` is the batch (inputs ``(T, B, D)`` and targets).
    """
    # Under a model.compute_dtype too, every term is counted in the parameters' dtype:
    # not an upper bound then, but within the guard's tolerance (bfloat16 on the CPU:
    # 0.69-1.05 of XLA's peak; docs/training.md, "Memory guard").
    dtype = jnp.dtype(dtype)
    s = dtype.itemsize
    if params is None:
        params = abstract_params(model, dtype)
    p_bytes = tree_bytes(params)
    opt_bytes = tree_bytes(jax.eval_shape(optimizer.init, params))
    T = seq_len if k1 is None else min(seq_len, k2 or k1)
    segment = model.bptt_segment if (method == "bptt" and k1 is None) else None
    act = _activations(model, params, method, T, batch, segment, loss, last_only, dtype)
    targets = seq_len * batch * (4 if loss == "xent" else model.output_size * s)
    data = seq_len * batch * model.input_size * s + targets
    return MemoryEstimate(p_bytes, opt_bytes, 2 * p_bytes, act * s, data)


def _task_sizes(task):
    """``(T, B, E)`` of a task: steps, training batch, held-out batch (sequences)."""
    T = getattr(task, "seq_len", None)
    if T is None:  # the reference example: one sequence
        b = task.batch(0)
        return b.xs.shape[0], b.xs.shape[1], b.xs.shape[1]
    E = getattr(task, "eval_size", task.batch_size)
    if hasattr(task, "eval_ids"):  # charlm: consecutive windows of the held-out text
        E = min(E, (len(task.eval_ids) - 1) // T)
    return T, task.batch_size, E


def _sampling_bytes(task, T, E) -> int:
    """The float64 (and index) numpy arrays a batch of E sequences is sampled through."""
    name = getattr(task, "name", "")
    per = {"sine": 5 * 8, "adding": 7 * 8, "charlm": 2 * 8 + 4}.get(name, 0)
    return (T + 1) * E * per


def estimate_run(model, optimizer, task, method: str = "bptt", k1: int | None = None,
                 k2: int | None = None, params=None, evaluate: bool = True) -> MemoryEstimate:
    """The peak memory of a training run (``runner.run``), in bytes.

    ``estimate_step``'s parts, with ``data`` the batches the run keeps (two
    training batches and the held-out batch, plus ``charlm``'s text as int32 ids)
    and ``activations`` the largest transient: the step's, the evaluation's
    forward pass over the held-out batch, or a batch's numpy sampling.

    Args:
        model: the ``RNN``.
        optimizer: the optax ``GradientTransformation``.
        task: a ``jaxrnn_app.tasks.Task`` (its ``seq_len``, ``batch_size``, ``eval_size``).
        method, k1, k2, params: as in ``estimate_step``.
        evaluate: the run evaluates the held-out batch (``eval_every > 0``); it is
            drawn and kept either way.
    """
    T, B, E = _task_sizes(task)
    dtype = jnp.dtype(task.dtype)
    s = dtype.itemsize
    step = estimate_step(model, optimizer, B, T, method, task.loss, task.last_step_only,
                         dtype, k1, k2, params)
    if params is None:
        params = abstract_params(model, dtype)
    C = sum(model.cell_fn.state_sizes(model.hidden_size))
    n = model.num_directions
    widest = max(D_l + GH + C + n * P for dirs in _layers(model, params) for D_l, GH, P in dirs)
    eval_act = T * E * widest * s if evaluate else 0
    eval_data = step.data * E // B
    text, text_load = _text_bytes(task)
    transient = max(step.activations, eval_act, _sampling_bytes(task, T, max(B, E)), text_load)
    return step._replace(activations=transient, data=2 * step.data + eval_data + text)


def _text_bytes(task) -> tuple[int, int]:
    """``charlm``'s text: ``(resident, loading)`` bytes.

    Resident: the ids, int32, 4 bytes a character. Loading (``tasks._encode``), beside
    them for a moment: the text as a Python str (1, 2 or 4 bytes a character, by its
    widest character, PEP 393) and its code points (4): a 30 MB file of 26.5 M
    characters (2-byte str) measured 9.7 bytes a character above the imports, this
    count 10. Other tasks: no text.
    """
    if not hasattr(task, "train_ids"):
        return 0, 0
    n = len(task.train_ids) + len(task.eval_ids)
    widest = max(map(ord, task.vocab)) if n else 0  # the widest character
    kind = 1 if widest < 0x100 else 2 if widest < 0x10000 else 4
    return 4 * n, (kind + 4) * n


# --- what the machine has ----------------------------------------------------------

class Available(NamedTuple):
    """Memory a run can use, in bytes, and where the figure comes from."""

    bytes: int
    source: str  # e.g. "MemAvailable in /proc/meminfo", "the cgroup limit", "gpu:0 memory_stats"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return None  # "max": no limit


def host_available(meminfo: str | os.PathLike = "/proc/meminfo",
                   cgroup: str | os.PathLike = "/sys/fs/cgroup") -> Available | None:
    """The host's available memory: ``MemAvailable``, capped by a cgroup's limit.

    Args:
        meminfo: the ``/proc/meminfo`` file.
        cgroup: the cgroup file system's root: cgroup v2's ``memory.max`` minus
            ``memory.current`` there, or v1's ``memory/memory.limit_in_bytes`` minus
            ``memory/memory.usage_in_bytes``, whichever is set.

    Returns:
        An ``Available``, or None where neither can be read (not Linux).
    """
    found = []
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, f"MemAvailable in {meminfo}"))
                break
    except (OSError, ValueError, IndexError):
        pass
    root = Path(cgroup)
    for limit, usage in (("memory.max", "memory.current"),
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        cap = _read_int(root / limit)
        # v1 writes "no limit" as a huge number (2^63 rounded to pages)
        if cap is not None and cap < 2 ** 60:
            used = _read_int(root / usage) or 0
            found.append((max(cap - used, 0), f"the cgroup limit ({root / limit})"))
            break
    if not found:
        return None
    b, src = min(found)
    return Available(b, src)


def device_available(device=None) -> Available | None:
    """An accelerator's free memory, ``bytes_limit - bytes_in_use`` of its ``memory_stats()``.

    Returns:
        An ``Available``, or None for a CPU device or one without the statistics.
    """
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats()
    except Exception:  # not every backend implements it
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return Available(free, f"{device.platform}:{device.id} memory_stats")


def available_memory() -> Available | None:
    """What a run on the default device can use: the accelerator's free memory, else the host's."""
    return device_available() or host_available()


def check_fits(estimate: MemoryEstimate, available: Available | None) -> None:
    """Raises a ``MemoryError`` naming the estimate and what is available when it does not fit.

    Args:
        estimate: from ``estimate_run``.
        available: from ``available_memory``; None (unknown) always fits.
    """
    if available is not None and estimate.total > available.bytes:
        raise MemoryError(f"the run needs {estimate.describe()} but {format_gb(available.bytes)} "
                          f"are available ({available.source})")


__all__ = ["MemoryEstimate", "Available", "estimate_step", "estimate_run", "abstract_params",
           "tree_bytes", "host_available", "device_available", "available_memory",
           "check_fits", "format_gb"]
