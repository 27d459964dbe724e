"""Training steps: a pure, jit-compiled optax train step and truncated BPTT.

The step is ``(params, opt_state, batch) -> (params, opt_state, metrics)``; the
gradient comes from ``method="bptt"`` (handwritten reverse scan),
``method="autodiff"`` (``jax.grad``) or a forward-in-time estimator
(``"rtrl"``, ``"snap1"``, ``"uoro"``, ...: ``jaxrnn.estimators``), one update per
batch. ``make_online_step`` trains online: an update every ``k`` steps of a
stream, the network's and the estimator's state carried across. With
``diagnostics=True`` the ``bptt`` step reads per-step gradient norms off the same
reverse scan (``jaxrnn._src.diagnostics``) and logs their summary. Clipping,
schedules and the like belong in the optax chain (``make_optimizer``), never
inside the gradient. The loop that runs a step (hooks, NaN guard, progress bar)
is ``jaxrnn._src.loop.train_loop``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol, get_args

import jax
import jax.numpy as jnp
import optax

from jaxrnn._src import estimators
from jaxrnn._src.estimators.base import Estimator
from jaxrnn._src import losses as losses_lib
from jaxrnn._src.diagnostics import gradient_diagnostics, summary
from jaxrnn._src.model import (RNN, RNNParams, State, estimated_loss_and_grad, estimator_grads,
                               layers_of, loss_fn, params_dtype)
from jaxrnn._src.names import LossName, Method, ScanMethod
from jaxrnn._src.scan import METHODS
from jaxrnn._src.validation import check_int, check_readout


class Batch(NamedTuple):
    """One training batch, time-major (batch-first for a ``batch_first=True`` model)."""

    xs: jax.Array  # (T, B, D); (B, T, D) with batch_first
    targets: jax.Array  # (T, B, O) floats, or (T, B) integer classes for xent; (B, T, ...)
    lengths: jax.Array | None = None  # (B,) integers in [1, T], or None


# A step's metrics: scalars (jax arrays; ``make_tbptt_step``'s ``updates`` is an int).
Metrics = dict[str, Any]


class TrainStep(Protocol):
    """What ``make_train_step`` and ``make_tbptt_step`` return.

    ``step(params, opt_state, batch, key=None) -> (params, opt_state, metrics)``.
    """

    def __call__(self, params: RNNParams, opt_state: optax.OptState, batch: Batch,
                 key: jax.Array | None = None) -> tuple[RNNParams, optax.OptState, Metrics]:
        ...


StepFn = TrainStep

# The gradient methods of ``make_train_step``: the per-layer methods of the scan,
# plus the estimators, which compute the whole loss's gradient forward in time.
TRAIN_METHODS: tuple[Method, ...] = get_args(Method)  # METHODS + estimators' names


def make_optimizer(name: str = "adam", lr: float = 1e-3, clip: float | None = None,
                   ) -> optax.GradientTransformation:
    """An optax optimizer by name (``"sgd"``, ``"adam"``, ``"adamw"``, ... any optax alias).

    Args:
        name: the name of an optax optimizer that takes ``learning_rate``.
        lr: learning rate (or an optax schedule).
        clip: if given, clip the global gradient norm to this value first.

    Raises:
        ValueError: an unknown optimizer name or a non-positive ``lr``/``clip``.
    """
    factory = getattr(optax, name, None)
    if name.startswith("_") or not callable(factory):
        raise ValueError(f"optimizer must name an optax optimizer (e.g. 'sgd', 'adam'), "
                         f"got {name!r}")
    if not callable(lr) and not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    try:
        opt = factory(learning_rate=lr)
    except TypeError as e:
        raise ValueError(f"optimizer {name!r} is not an optax optimizer taking a "
                         f"learning_rate: {e}") from None
    if not isinstance(opt, optax.GradientTransformation):
        raise ValueError(f"optimizer {name!r} is not an optax optimizer")
    if clip is not None:
        if not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip!r}")
        opt = optax.chain(optax.clip_by_global_norm(clip), opt)
    return opt


def clip_recurrent(max_abs: float) -> optax.GradientTransformation:
    r"""A projection that keeps every layer's recurrent weight ``w_hh`` within ``[-max_abs, max_abs]``.

    Li et al. (2018) train the IndRNN with :math:`|u| \le 2^{1/T}` enforced by
    clipping ``u`` after each update: ``optax.chain(..., optax.adam(lr),
    clip_recurrent(2 ** (1 / T)))``. Place it last in the chain: it turns the
    updates the chain has computed into ``clip(w_hh + update) - w_hh``, so that
    ``optax.apply_updates`` lands on the clipped weight (to within one rounding of
    the subtraction, one ulp). The gradient itself is untouched (the gradient
    equivalence of ``method="bptt"`` and ``"autodiff"`` still holds); the readout
    and the input weights are not clipped. For an IndRNN ``w_hh`` is the vector
    ``u`` (H,); for a matrix cell every entry of ``W_hh`` (G*H, H) is clipped.

    Args:
        max_abs: the bound, a finite number > 0.

    Returns:
        An ``optax.GradientTransformation`` whose ``update`` needs ``params`` (an
        ``RNNParams``).

    Raises:
        ValueError: ``max_abs`` not a finite number > 0 (at construction), or
            ``update`` called without ``params``.
    """
    if isinstance(max_abs, bool) or not isinstance(max_abs, (int, float)) or not (
            0 < max_abs < float("inf")):
        raise ValueError(f"max_abs must be a finite number > 0, got {max_abs!r}")

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("clip_recurrent needs params: call optimizer.update(grads, "
                             "opt_state, params)")

        def project(u, p):  # one layer and direction: CellParams (or a cell's own NamedTuple)
            w = jnp.clip(p.w_hh + u.w_hh, -max_abs, max_abs)  # the projected weight
            return u._replace(w_hh=w - p.w_hh)  # the update that lands on it

        layers = tuple(tuple(project(u, p) for u, p in zip(ul, pl))
                       for ul, pl in zip(updates.layers, params.layers))
        return updates._replace(layers=layers), state

    return optax.GradientTransformation(init, update)


def check_train_options(method: str, diagnostics: bool = False) -> None:
    """The options of ``make_train_step`` that do not depend on the model.

    Args:
        method: the gradient method, one of ``TRAIN_METHODS``.
        diagnostics: whether the step logs per-step gradient diagnostics.

    Raises:
        ValueError: an unknown ``method``, or ``diagnostics`` with a method other than
            ``"bptt"`` (the messages name the arguments).
    """
    if not isinstance(method, Estimator) and method not in TRAIN_METHODS:
        raise ValueError(f"method must be one of {TRAIN_METHODS}, got {method!r}")
    method = getattr(method, "name", method)
    if diagnostics and method != "bptt":
        raise ValueError(f"diagnostics=True reads the handwritten reverse scan: it needs "
                         f"method='bptt', got method={method!r}")


def check_truncation(k1: int, k2: int | None = None, method: str = "bptt") -> int:
    """The options of truncated BPTT(k1, k2) (``make_tbptt_step``).

    Args:
        k1: steps between updates, an integer >= 1.
        k2: steps of backpropagation, an integer >= ``k1``; None: ``k1``.
        method: the gradient method, one of ``METHODS`` (RTRL is a whole-sequence
            method: truncation does not apply to it).

    Returns:
        ``k2`` (``k1`` where it was None).

    Raises:
        ValueError: an estimator (``method="rtrl"``, ...) or another unknown method,
            ``k1 < 1``, ``k2 < k1``.
    """
    if method in TRAIN_METHODS and method not in METHODS:
        raise ValueError(f"method={method!r} is not supported by truncated BPTT "
                         f"(make_tbptt_step): use method='bptt' or 'autodiff', or "
                         f"make_train_step / make_online_step for {method}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_int("k1", k1, 1)
    k2 = k1 if k2 is None else k2
    check_int("k2", k2, k1, bound=f"k1 = {k1}")
    return k2


def make_train_step(model: RNN, optimizer: optax.GradientTransformation,
                    loss: LossName = "half_sse", method: Method = "bptt",
                    donate: bool = True, last_only: bool = False,
                    diagnostics: bool = False) -> TrainStep:
    """A jit-compiled, pure train step.

    Args:
        model: the ``RNN``.
        optimizer: any optax ``GradientTransformation``.
        loss: ``"half_sse"``, ``"mse"`` or ``"xent"``.
        method: ``"bptt"``, ``"autodiff"``, or an estimator's name (``"rtrl"``,
            ``"snap1"``, ``"snap2"``, ``"uoro"``, ``"kf_rtrl"``, ``"rflo"``,
            ``"eprop"``: one read-out at the end of each batch; one direction, no
            dropout; the stochastic ones draw from ``key``) or an ``Estimator``.
        donate: donate the ``params`` and ``opt_state`` buffers (the caller must
            not reuse the arrays it passed in).
        last_only: score only the last step (``ys[-1:]`` against ``targets[-1:]``).
        diagnostics: also log per-step gradient diagnostics: the loss and gradient
            come from ``diagnostics.gradient_diagnostics`` (the same handwritten
            reverse scan as ``method="bptt"``, so no second backward pass), and
            ``metrics`` gains its ``diagnostics.summary``: ``dh_first_l{l}``,
            ``dh_last_l{l}``, ``dh_ratio_l{l}`` (``_reverse`` for the second
            direction). Needs ``method="bptt"``.

    Returns:
        ``step(params, opt_state, batch, key=None) -> (params, opt_state, metrics)``
        where ``batch`` is a ``jaxrnn.Batch`` (``xs (T, B, D)``, ``targets``,
        ``lengths``; ``(B, T, ...)`` for a ``batch_first`` model), ``key`` an optional PRNG key for dropout between layers, and
        ``metrics`` holds ``loss`` and ``grad_norm`` (before any clipping), plus the
        diagnostics' scalars with ``diagnostics=True``.

    Raises:
        ValueError: a model without a readout (``output_size=None``); an unknown
            ``loss`` or ``method``; ``diagnostics`` with a method other than
            ``"bptt"``; an estimator for a model it does not support (and, when
            the step is first called, a batch too large for it).
    """
    check_readout(model.output_size, "make_train_step")
    losses_lib.get_loss(loss)
    check_train_options(method, diagnostics)
    # an estimator: checked for the cell, layers and directions now, its size at trace time
    estimator = None if method in METHODS else model.estimator(method)

    tm = model.time_major()  # the arrays below are time-major, already converted

    def gradient(params, xs, targets, lengths, key):
        """``(loss, grads, extra metrics)`` by the chosen method, on time-major arrays."""
        if diagnostics:
            diag = gradient_diagnostics(tm, params, xs, targets, loss, None, lengths,
                                        key, last_only)
            return diag.loss, diag.grads, summary(diag)
        if estimator is not None:  # no dropout: the key is the estimator's
            tm.check_estimator(estimator, params, xs.shape[1])  # its size, at trace time
            check_key(estimator, key)
            value, grads = estimated_loss_and_grad(tm, estimator, loss, params, xs, targets,
                                                   None, lengths, key, last_only)
            return value, grads, {}
        value, grads = jax.value_and_grad(loss_fn, argnums=3)(
            model, loss, method, params, xs, targets, None, lengths, key, last_only)
        return value, grads, {}

    def step(params: RNNParams, opt_state: optax.OptState, batch: Batch,
             key: jax.Array | None = None) -> tuple[RNNParams, optax.OptState, Metrics]:
        xs, _, lengths = model.check_inputs(params, batch.xs, None, batch.lengths)
        targets = model.check_targets((xs.shape[0], xs.shape[1], model.output_size),
                                      batch.targets, loss, lengths)
        value, grads, extra = gradient(params, xs, targets, lengths, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": value, "grad_norm": optax.tree.norm(grads), **extra}
        return params, opt_state, metrics

    jitted: TrainStep = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    return jitted


def check_key(estimator: Estimator, key) -> None:
    """A stochastic estimator needs its PRNG key.

    Raises:
        ValueError: ``key`` is None for an estimator that draws random numbers.
    """
    if estimator.stochastic and key is None:
        raise ValueError(f"method={estimator.method!r} draws random numbers: pass its PRNG key "
                         f"(key=jax.random.key(0))")


class OnlineState(NamedTuple):
    """What online training carries from one call to the next: a stream's place."""

    state: State  # the network's state, PyTorch's shape (L, B, H) (a pair for the LSTM)
    estimator: Any  # the estimator's state (sensitivities, factors or traces)
    step: jax.Array  # int (): the stream's steps so far (the estimator's keys fold it in)


class OnlineStep(NamedTuple):
    """What ``make_online_step`` returns: ``init`` and ``step``."""

    init: Callable[..., OnlineState]
    step: Callable[..., tuple]


def make_online_step(model: RNN, optimizer: optax.GradientTransformation,
                     method: Method | Estimator = "rtrl", every: int = 1,
                     loss: LossName = "half_sse", donate: bool = True) -> OnlineStep:
    r"""Online training: an optax update every ``every`` steps of a stream, one jit per batch.

    The batch's ``T`` steps are cut into chunks of ``every`` steps (the last may be
    shorter). Over each chunk the network runs forward while the estimator updates
    its state and reads out the gradient of the chunk's loss; then one optimizer
    update is made and the next chunk starts from the network's and the estimator's
    state where the chunk left them (the sensitivities computed under the old
    parameters carry on under the new ones, as online RTRL does). ``every=1`` is
    fully online; ``every=T`` with a fresh ``OnlineState`` per batch is one update
    per sequence, ``make_train_step(method=...)``'s.

    Args:
        model: the ``RNN`` (one direction; no ``compute_dtype``).
        optimizer: any optax ``GradientTransformation``.
        method: an estimator's name (``"rtrl"``, ``"snap1"``, ...) or an ``Estimator``.
        every: steps between updates, >= 1.
        loss: the loss, computed per chunk (its divisor is the chunk's).
        donate: donate the ``params``, ``opt_state`` and ``online`` buffers.

    Returns:
        ``OnlineStep(init, step)``: ``init(params, batch_size, key=None) ->
        OnlineState`` (zero network state, the estimator's initial state; ``key``
        for its random draws); ``step(params, opt_state, online, batch, key=None) ->
        (params, opt_state, online, metrics)`` with ``batch`` a ``Batch`` without
        ``lengths`` (the stream's next ``T`` steps), ``key`` the estimator's (the
        same every call: step t of the stream draws from ``fold_in(key, t)``), and
        ``metrics``: ``loss`` (the chunks' mean, weighted by their steps),
        ``grad_norm`` (the last chunk's) and ``updates``.

    Raises:
        ValueError: a bidirectional model (one line: the backward direction needs
            the future), an unknown or unsupported method, ``every < 1``; at the
            first call a batch with ``lengths``, or a model too large for the estimator.
    """
    check_readout(model.output_size, "make_online_step")
    losses_lib.get_loss(loss)
    check_int("every", every, 1)
    check_train_options(method)
    estimator = model.estimator(method)
    tm = model.time_major()

    def init(params: RNNParams, batch_size: int, key: jax.Array | None = None) -> OnlineState:
        tm.check_estimator(estimator, params, batch_size)
        dtype = params_dtype(params)
        state = tm.zero_state(batch_size, dtype)
        carries0 = tm.initial_carries(state, batch_size, dtype)
        est = estimator.init(tm.cell_fn, layers_of(params), carries0, key)
        return OnlineState(state, est, jnp.zeros((), jnp.int32))

    def chunk(params, opt_state, online, xs, targets, key):
        return online_chunk(tm, estimator, optimizer, loss, params, opt_state, online, xs,
                            targets, key)

    def run(params, opt_state, online: OnlineState, xs, targets, key):
        T = xs.shape[0]
        n, rest = divmod(T, every)

        def body(carry, inputs):
            params, opt_state, online = carry
            params, opt_state, online, value, norm = chunk(params, opt_state, online, *inputs, key)
            return (params, opt_state, online), (value, norm)

        cut = lambda a: a[:n * every].reshape((n, every) + a.shape[1:])  # noqa: E731
        (params, opt_state, online), (values, norms) = jax.lax.scan(
            body, (params, opt_state, online), (cut(xs), cut(targets)))
        total, norm = jnp.sum(values) * every, norms[-1]
        if rest:
            params, opt_state, online, value, norm = chunk(
                params, opt_state, online, xs[n * every:], targets[n * every:], key)
            total = total + value * rest
        metrics = {"loss": total / T, "grad_norm": norm, "updates": n + (rest > 0)}
        return params, opt_state, online, metrics

    run = jax.jit(run, donate_argnums=(0, 1, 2) if donate else ())

    def step(params: RNNParams, opt_state: optax.OptState, online: OnlineState, batch: Batch,
             key: jax.Array | None = None):
        if batch.lengths is not None:
            raise ValueError("online training takes a stream of full-length steps: "
                             "batch.lengths must be None")
        xs, _, _ = model.check_inputs(params, batch.xs)  # time-major from here on
        targets = model.check_targets((xs.shape[0], xs.shape[1], model.output_size),
                                      batch.targets, loss)
        tm.check_estimator(estimator, params, xs.shape[1])
        check_key(estimator, key)
        return run(params, opt_state, online, xs, targets, key)

    return OnlineStep(init, step)


def online_chunk(model: RNN, estimator: Estimator, optimizer: optax.GradientTransformation,
                 loss: str, params: RNNParams, opt_state, online: OnlineState, xs: jax.Array,
                 targets: jax.Array, key):
    """One chunk of a stream, then one update (``make_online_step``'s unit).

    Args:
        model: a time-major ``RNN``.
        estimator, optimizer, loss: ``make_online_step``'s.
        params, opt_state: before the chunk.
        online: the stream's place before the chunk.
        xs: the chunk's inputs, (k, B, D), time-major.
        targets: its targets, (k, B, O) or (k, B).
        key: the estimator's key.

    Returns:
        ``(params, opt_state, online, loss, grad_norm)`` after the update.
    """
    T, B = xs.shape[:2]
    valid = jnp.ones((T, B), bool)
    div = losses_lib.divisor(loss, valid, model.output_size).astype(xs.dtype)
    carries0 = model.initial_carries(online.state, B, xs.dtype)
    readout = estimators.Readout(params.readout.weight, params.readout.bias)
    out = estimators.run_chunk(estimator, model.cell_fn, layers_of(params), readout, loss, xs,
                               targets, carries0, valid, valid, div, online.estimator, key,
                               online.step)
    grads = estimator_grads(params, out.grads, out.dreadout)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    online = OnlineState(model.state_from_carries(out.carries), out.state, online.step + T)
    return params, opt_state, online, out.loss, optax.tree.norm(grads)


def truncation_windows(num_steps: int, k1: int, k2: int) -> list[tuple[int, int, int, int]]:
    """The chunks of truncated BPTT(k1, k2) over a sequence of ``num_steps`` steps.

    Chunk c updates on the losses of steps ``[s, e)``, ``s = c*k1``,
    ``e = min(s + k1, T)``, backpropagating through the window ``[ws, e)`` with
    ``ws = max(0, s - (k2 - k1))``; the state at the start of the next window,
    ``nws = max(0, e - (k2 - k1))``, is carried to the next chunk.

    Returns:
        A list of ``(ws, nws, s, e)``, one per chunk.
    """
    w = k2 - k1
    out = []
    for s in range(0, num_steps, k1):
        e = min(s + k1, num_steps)
        out.append((max(0, s - w), max(0, e - w), s, e))
    return out


def make_tbptt_step(model: RNN, optimizer: optax.GradientTransformation, k1: int,
                    k2: int | None = None, loss: LossName = "half_sse",
                    method: ScanMethod = "bptt", donate: bool = True) -> TrainStep:
    r"""Truncated BPTT(k1, k2): an update every ``k1`` steps, backpropagating ``k2`` steps.

    The batch's sequence is cut into chunks of ``k1`` steps. For each chunk, the
    network runs forward over the last ``k2`` steps up to the chunk's end, starting
    from the carried state with its gradient stopped; the loss of the chunk's
    ``k1`` steps is differentiated (by ``method``) and one optimizer update is made.
    The state is carried across chunks without gradient. With ``k1 = k2 = T`` this
    is exactly full BPTT (one update per batch).

    Args:
        model: the ``RNN``.
        optimizer: any optax ``GradientTransformation``.
        k1: steps between updates, >= 1.
        k2: steps of backpropagation, >= k1 (default ``k1``).
        loss: ``"half_sse"``, ``"mse"`` or ``"xent"``, computed per chunk.
        method: ``"bptt"`` or ``"autodiff"``.
        donate: donate the ``params`` and ``opt_state`` buffers.

    Returns:
        ``step(params, opt_state, batch, key=None) -> (params, opt_state, metrics)``,
        where ``metrics`` holds ``loss`` (the mean of the chunks' losses, weighted
        by their number of steps), ``grad_norm`` (of the last chunk) and ``updates``.
        The step is a Python loop over jit-compiled chunk updates (one compilation
        per distinct chunk shape, a handful at most).

    Raises:
        ValueError: a model without a readout (``output_size=None``), ``k1 < 1``,
            ``k2 < k1``, ``method="rtrl"`` (a whole-sequence method; truncation is not
            supported), or a batch with ``lengths``.
    """
    check_readout(model.output_size, "make_tbptt_step")
    loss_f = losses_lib.get_loss(loss)
    k2 = check_truncation(k1, k2, method)
    tm = model.time_major()  # the chunks are cut from time-major arrays

    def chunk_update(params, opt_state, state, xs_a, xs_b, targets, key, n_loss):
        def f(params):
            st = jax.lax.stop_gradient(state)  # truncation: no gradient into the past
            parts = []
            for i, xs_part in enumerate((xs_a, xs_b)):
                if xs_part.shape[0] > 0:
                    pkey = None if key is None else jax.random.fold_in(key, i)
                    ys, st_end = tm.apply(params, xs_part, st, None, method, pkey)
                    parts.append(ys)
                    if xs_part is xs_a:
                        carried = st_end  # the state at the next window's start
                    st = st_end
            if xs_a.shape[0] == 0:
                carried = state
            ys = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
            return loss_f(ys[ys.shape[0] - n_loss:], targets, None), carried

        (value, carried), grads = jax.value_and_grad(f, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        carried = jax.lax.stop_gradient(carried)
        return params, opt_state, carried, value, optax.tree.norm(grads)

    chunk_update = jax.jit(chunk_update, static_argnames=("n_loss",),
                           donate_argnums=(0, 1) if donate else ())

    def step(params: RNNParams, opt_state: optax.OptState, batch: Batch,
             key: jax.Array | None = None) -> tuple[RNNParams, optax.OptState, Metrics]:
        if batch.lengths is not None:
            raise ValueError("truncated BPTT takes full-length sequences: batch.lengths must "
                             "be None")
        xs, _, _ = model.check_inputs(params, batch.xs)  # time-major from here on
        T, B = xs.shape[0], xs.shape[1]
        targets = model.check_targets((T, B, model.output_size), batch.targets, loss)
        state = model.zero_state(B, xs.dtype)
        total, count, grad_norm = 0.0, 0, None
        windows = truncation_windows(T, k1, k2)
        for c, (ws, nws, s, e) in enumerate(windows):
            ckey = None if key is None else jax.random.fold_in(key, c)
            params, opt_state, state, value, grad_norm = chunk_update(
                params, opt_state, state, xs[ws:nws], xs[nws:e], targets[s:e], ckey,
                n_loss=e - s)
            total = total + value * (e - s)
            count += e - s
        metrics = {"loss": total / count, "grad_norm": grad_norm, "updates": len(windows)}
        return params, opt_state, metrics

    return step
