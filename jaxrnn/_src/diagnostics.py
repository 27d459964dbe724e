r"""Per-step gradient diagnostics, read off the handwritten reverse scan.

How does the gradient travel back through time? For every layer ``l``,
direction ``d`` and step ``t`` (time in the *original* order, ``t = 0..T-1``,
for both directions) this module reports

* the total cotangent of the layer's output, the ``BackwardTrace.dh`` of
  ``scan.backward_scan``:

  .. math::
      \delta h_t = \frac{\partial L}{\partial h_t}
      = \underbrace{\frac{\partial L}{\partial h_t}\Big|_{\text{above}}}_{\text{direct}}
      + \underbrace{\texttt{dh\_next}_t}_{\text{via } h_{t+1}, h_{t+2}, \ldots}

  (the direct term comes from the layer above, or the readout for the top layer):
  exactly what ``jax.grad`` gives for a zero perturbation :math:`e_t` added
  to :math:`h_t` (every later use of :math:`h_t` sees :math:`h_t + e_t`);
* the cotangent of the layer's input at step ``t``,
  :math:`\partial L/\partial x^{(l)}_t = \sum_d \delta gi^{(l,d)}_t W^{(l,d)}_{ih}`
  (both directions read the same input, so their terms add);
* each step's term of the weight gradients, which sum over the steps to the
  full gradient:

  .. math::
      \frac{\partial L}{\partial W_{ih}} = \sum_t \underbrace{\delta gi_t^\top x_t}_{t}, \qquad
      \frac{\partial L}{\partial W_{hh}} = \sum_t \underbrace{\delta gh_t^\top h_{t-1}}_{t}

  (each product sums over the batch; ``h_{t-1}`` is the state the direction
  held before it processed step ``t``, i.e. ``h_{t+1}`` for the reverse one).

Everything is computed by the library's own forward scan and handwritten
reverse scan, walked layer by layer from the top: the readout and loss give the
top layer's output cotangent (``jax.grad`` of the readout + loss only), each
layer's ``backward_scan(..., with_trace=True)`` gives its per-step quantities
and the cotangent of its input, which is split ``[forward, backward]`` for the
layer below. For the reverse direction the cotangents go through the same
per-sequence reversal (``reverse_sequences``, its own inverse) as the values.

Steps past a sequence's length (``lengths``) have all quantities zero.

``gradient_diagnostics`` returns only norms, ``(T,)`` per layer and direction,
plus the loss and the full gradient (equal to ``model.loss_and_grad(...,
method="bptt")``), so a train step can use it in place of ``jax.grad`` and log
``summary(diag)``. ``step_gradients`` returns the raw per-step arrays and
per-step weight-gradient matrices (memory ``O(T G H D)`` per layer: for small
models and research).

Layout: the inputs follow the model's (``batch_first``: ``xs (B, T, D)``). The
norms are ``(T,)`` (no batch axis) either way; ``StepGradients.dh`` and ``.dx``,
which keep the batch, come back in the model's layout (``(B, T, ...)`` with
``batch_first``), and the per-step weight terms ``dparams`` have a leading T axis
either way (they have no batch axis). The walk itself runs time-major.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrnn._src import losses as losses_lib
from jaxrnn._src.cells import CellParams, Outer
from jaxrnn._src.model import RNN, RNNParams, State, params_dtype, sequence_mask
from jaxrnn._src.names import LossName
from jaxrnn._src.scan import backward_scan, forward_scan
from jaxrnn._src.stack import layer_suffix, reverse_sequences, run_stack

# Elements of the per-step weight-gradient matrices formed at once when their
# norms are taken (``lax.map`` in chunks of steps): bounds the memory to ~128 MiB
# in float64 whatever T, G*H and D are.
_CHUNK_ELEMENTS = 1 << 24


class Diagnostics(NamedTuple):
    """Per-step gradient norms of a batch (time in the original order), plus loss and grads."""

    loss: jax.Array  # (): the scalar loss
    grads: RNNParams  # dL/dparams, equal to model.loss_and_grad(method="bptt")
    dh_norm: tuple[tuple[jax.Array, ...], ...]  # [layer][direction] (T,): ||dL/dh_t|| (total)
    dx_norm: tuple[jax.Array, ...]  # [layer] (T,): ||dL/d(input of the layer at t)||
    dw_ih_norm: tuple[tuple[jax.Array, ...], ...]  # [layer][direction] (T,): ||dgi_t^T x_t||_F
    dw_hh_norm: tuple[tuple[jax.Array, ...], ...]  # [layer][direction] (T,): ||dgh_t^T h_{t-1}||_F


class StepGradients(NamedTuple):
    """The raw per-step cotangents and weight-gradient terms (time in the original order)."""

    loss: jax.Array  # (): the scalar loss
    grads: RNNParams  # dL/dparams, equal to model.loss_and_grad(method="bptt")
    # dh and dx in the model's layout: (B, T, ...) with batch_first
    dh: tuple[tuple[jax.Array, ...], ...]  # [layer][direction] (T, B, H): total dL/dh_t
    dx: tuple[jax.Array, ...]  # [layer] (T, B, D_l): dL/d(input of the layer at t)
    dparams: tuple[tuple[CellParams, ...], ...]  # [layer][direction]: leaves (T, ...); sum_t: grads


class _LayerWalk(NamedTuple):
    """What the backward walk finds for one layer and direction, all in original time order."""

    dh: jax.Array  # (T, B, H): total dL/dh_t
    dgi: jax.Array  # (T, B, G*H): cotangent of the input pre-activation
    dgh: jax.Array  # (T, B, G*H): cotangent of the recurrent pre-activation
    x: jax.Array  # (T, B, D_l): the layer's input at t
    h_prev: jax.Array  # (T, B, H): the state this direction held before processing t
    dextra: dict  # a cell's own per-step parameter terms (BackwardTrace.dextra)


class _Walk(NamedTuple):
    loss: jax.Array
    grads: RNNParams
    layers: tuple[tuple[_LayerWalk, ...], ...]  # [layer][direction]
    dx: tuple[jax.Array, ...]  # [layer] (T, B, D_l)


def _shift(first: jax.Array, seq: jax.Array) -> jax.Array:
    """``[first, seq[0], ..., seq[T-2]]``: the previous step's value, (T, ...)."""
    return jnp.concatenate([first[None], seq[:-1]], axis=0)


def _walk(model: RNN, loss: str, last_only: bool, params: RNNParams, xs, targets, state,
          lengths, dropout_key) -> _Walk:
    """Forward layer by layer with ``forward_scan``, then the reverse scans top-down."""
    T, B, _ = xs.shape
    cell = model.cell_fn
    H, nd, L = model.layer_output_size, model.num_directions, model.num_layers
    mask = sequence_mask(lengths, T)
    # one carry per (layer, direction), in the parameters' dtype (as the model's layers)
    carries0 = model.initial_carries(state, B, params_dtype(params))
    policy = model.compute_dtype  # mixed precision: the scans cast as the model's layers do

    def order(a, d):
        """Scan order <-> original order (the per-sequence reversal is its own inverse)."""
        return a if d == 0 else reverse_sequences(a, lengths)

    # --- forward: the model's layer walk, keeping each direction's ForwardTrace ----
    def direction(l, d, p, x, carry0):
        return forward_scan(cell, p, x, carry0, mask, compute_dtype=policy)

    run = run_stack(direction, params.layers, xs, carries0, lengths, model.dropout, dropout_key)
    h, inputs, traces, keeps = run.h, run.inputs, run.kept, run.keeps

    # --- the readout and the loss: the top layer's output cotangent ----------
    def head(hs, readout):
        m, tg = mask, targets
        if last_only:  # as model.loss_fn: score only the last step
            hs, tg = hs[-1:], tg[-1:]
        ys = model.readout(params._replace(readout=readout), hs, m)
        return losses_lib.get_loss(loss)(ys, tg, m)

    value, (dout, dreadout) = jax.value_and_grad(head, argnums=(0, 1))(h, params.readout)

    # --- top-down: each layer's handwritten reverse scan ---------------------
    walks, dxs_per_layer, dlayers = [None] * L, [None] * L, [None] * L
    for l in reversed(range(L)):
        dx = jnp.zeros_like(inputs[l])  # dL/d(input of layer l), summed over directions
        lw, dps = [], []
        for d in range(nd):
            i = l * nd + d
            p = params.layers[l][d]
            dh_d = dout[..., d * H:(d + 1) * H]  # this direction's slice of [fwd, bwd]
            dcarry_T = tuple(jnp.zeros_like(c) for c in carries0[i])  # the loss ignores h_T
            dp, dxs_d, _, bt = backward_scan(cell, p, order(inputs[l], d), carries0[i],
                                             traces[l][d], order(dh_d, d), dcarry_T, mask,
                                             with_trace=True, compute_dtype=policy)
            dx = dx + order(dxs_d, d)  # both directions read the same input
            h_prev = _shift(carries0[i][0], traces[l][d].carries[0])  # h_{t-1}, scan order
            dh_t = order(bt.dh, d)
            if mask is not None:
                dh_t = jnp.where(mask[:, :, None], dh_t, 0)  # nothing past a length
            lw.append(_LayerWalk(dh=dh_t, dgi=order(bt.dgi, d), dgh=order(bt.dgh, d),
                                 x=inputs[l], h_prev=order(h_prev, d),
                                 dextra=jax.tree.map(lambda a: order(a, d), bt.dextra)))
            dps.append(dp)
        walks[l], dxs_per_layer[l], dlayers[l] = tuple(lw), dx, tuple(dps)
        if l > 0:
            keep = keeps[l - 1]
            # The layer below output h; the input here was dropout(h): back through it.
            dout = dx if keep is None else jnp.where(keep, dx / (1.0 - model.dropout), 0)

    grads = RNNParams(tuple(dlayers), dreadout)
    return _Walk(value, grads, tuple(walks), tuple(dxs_per_layer))


def _step_outer_norms(a: jax.Array, b: jax.Array) -> jax.Array:
    r"""``||a_t^T b_t||_F`` for every t: the norm of step t's gradient term.

    Args:
        a: (T, B, G), a cotangent (``dgi`` or ``dgh``).
        b: (T, B, D), the matching input (``x`` or ``h_{t-1}``).

    Returns:
        (T,). The (G, D) matrices are formed a chunk of steps at a time.
    """
    T, _, G = a.shape
    D = b.shape[-1]
    chunk = max(1, min(T, _CHUNK_ELEMENTS // max(G * D, 1)))
    return jax.lax.map(lambda ab: jnp.linalg.norm(ab[0].T @ ab[1]), (a, b), batch_size=chunk)


def _norms(a: jax.Array) -> jax.Array:
    """``||a_t||`` over every axis but time: (T, ...) -> (T,)."""
    return jnp.sqrt(jnp.sum(a * a, axis=tuple(range(1, a.ndim))))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _diagnostics(model, loss, last_only, params, xs, targets, state, lengths, dropout_key):
    w = _walk(model, loss, last_only, params, xs, targets, state, lengths, dropout_key)
    per = lambda f: tuple(tuple(f(lw) for lw in layer) for layer in w.layers)  # noqa: E731
    return Diagnostics(
        loss=w.loss, grads=w.grads,
        dh_norm=per(lambda lw: _norms(lw.dh)),
        dx_norm=tuple(_norms(dx) for dx in w.dx),
        dw_ih_norm=per(lambda lw: _step_outer_norms(lw.dgi, lw.x)),
        dw_hh_norm=per(_dw_hh_norms))


def _extra_terms(lw: _LayerWalk) -> dict:
    """A cell's own parameters' per-step terms, (T,) + the parameter's shape each."""
    return {f: (jnp.einsum("tbm,tbk->tmk", v.dg, v.a) if isinstance(v, Outer)
                else v.sum(axis=1)) for f, v in lw.dextra.items()}


def _dw_hh_norms(lw: _LayerWalk) -> jax.Array:
    """``||step t's term of dL/dw_hh||`` (T,): ``dgh_t^T h_{t-1}``, or the cell's own term."""
    if "w_hh" in lw.dextra:  # a recurrent weight that is not a matrix (IndRNN's u)
        return _norms(_extra_terms(lw)["w_hh"])
    return _step_outer_norms(lw.dgh, lw.h_prev)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _step_gradients(model, loss, last_only, params, xs, targets, state, lengths, dropout_key):
    w = _walk(model, loss, last_only, params, xs, targets, state, lengths, dropout_key)

    def terms(lw: _LayerWalk, p):
        t = {"w_ih": jnp.einsum("tbg,tbd->tgd", lw.dgi, lw.x)}  # dgi_t^T x_t
        if p.w_hh.ndim == 2:
            t["w_hh"] = jnp.einsum("tbg,tbh->tgh", lw.dgh, lw.h_prev)  # dgh_t^T h_{t-1}
        if p.b_ih is not None:
            t["b_ih"] = lw.dgi.sum(axis=1)  # sum_b dgi_t
        if p.b_hh is not None:
            # sum_b dgh_t: for Elman and LSTM dgh = dgi (b_hh is folded into the
            # input projection), for the GRU the n block differs.
            t["b_hh"] = lw.dgh.sum(axis=1)
        t.update(_extra_terms(lw))  # the cell's own parameters
        return p._replace(**t)

    out = model.from_time_major  # dh and dx in the caller's layout
    return StepGradients(
        loss=w.loss, grads=w.grads,
        dh=tuple(tuple(out(lw.dh) for lw in layer) for layer in w.layers),
        dx=tuple(out(dx) for dx in w.dx),
        dparams=tuple(tuple(terms(lw, p) for lw, p in zip(layer, ps))
                      for layer, ps in zip(w.layers, params.layers)))


def _validate(model, params, xs, targets, loss, state, lengths, last_only):
    if not isinstance(model, RNN):
        raise TypeError(f"model must be a jaxrnn.RNN, got {type(model).__name__}")
    xs, state, lengths = model.check_inputs(params, xs, state, lengths)
    targets = model.check_targets((xs.shape[0], xs.shape[1], model.output_size), targets, loss,
                                  lengths)
    if last_only and lengths is not None:
        raise ValueError("last_only scoring takes full-length sequences: lengths must be None")
    return xs, targets, state, lengths


def gradient_diagnostics(model: RNN, params: RNNParams, xs: jax.Array, targets: jax.Array,
                         loss: LossName = "half_sse", state: State | None = None,
                         lengths: jax.Array | None = None,
                         dropout_key: jax.Array | None = None,
                         last_only: bool = False) -> Diagnostics:
    r"""Per-step gradient norms of a batch, from the handwritten reverse scan; jit-compiled.

    For every layer ``l``, direction ``d`` and step ``t`` (original time order for
    both directions):

    .. math::
        \texttt{dh\_norm}_t = \Big\|\frac{\partial L}{\partial h_t}\Big\|, \quad
        \texttt{dx\_norm}_t = \Big\|\frac{\partial L}{\partial x^{(l)}_t}\Big\|, \quad
        \texttt{dw\_ih\_norm}_t = \|\delta gi_t^\top x_t\|_F, \quad
        \texttt{dw\_hh\_norm}_t = \|\delta gh_t^\top h_{t-1}\|_F

    where the vector norms run over the batch and the units, ``dL/dh_t`` is the
    *total* derivative (through the layers above and all later steps), and the
    two matrices are step ``t``'s terms of :math:`\partial L/\partial W_{ih}` and
    :math:`\partial L/\partial W_{hh}` (they sum over ``t`` to those gradients).

    Args:
        model: the ``RNN``.
        params: its parameters.
        xs: inputs, (T, B, input_size), time-major; (B, T, input_size) with
            ``model.batch_first``.
        targets: (T, B, O) floats for ``"half_sse"``/``"mse"``, (T, B) integers for
            ``"xent"``; (B, T, O) and (B, T) with ``batch_first``.
        loss: ``"half_sse"``, ``"mse"`` or ``"xent"``.
        state: initial state, (num_layers*dirs, B, H) (LSTM: a pair); zeros if None.
        lengths: optional integer (B,) in [1, T]; steps past a length report zeros.
        dropout_key: dropout between layers as in ``model.apply`` (None: none).
        last_only: score only the last step, as ``model.loss_fn(last_only=True)``.

    Returns:
        ``Diagnostics``: ``loss`` (), ``grads`` (an ``RNNParams``, the gradient of
        ``method="bptt"``), and per layer the (T,) norms ``dh_norm[l][d]``,
        ``dx_norm[l]`` (the input cotangent of layer ``l``, both directions summed;
        ``l = 0`` is ``dL/dxs``), ``dw_ih_norm[l][d]``, ``dw_hh_norm[l][d]``; the
        norms have no batch axis, so they are ``(T,)`` whatever the layout.

    Raises:
        ValueError, TypeError: bad inputs, as ``model.loss_and_grad`` (a model
            without a readout among them); ``last_only`` with ``lengths``.
    """
    xs, targets, state, lengths = _validate(model, params, xs, targets, loss, state, lengths,
                                            last_only)
    return _diagnostics(model, loss, bool(last_only), params, xs, targets, state, lengths,
                        dropout_key)


def step_gradients(model: RNN, params: RNNParams, xs: jax.Array, targets: jax.Array,
                   loss: LossName = "half_sse", state: State | None = None,
                   lengths: jax.Array | None = None,
                   dropout_key: jax.Array | None = None,
                   last_only: bool = False) -> StepGradients:
    r"""The raw per-step cotangents and weight-gradient terms; jit-compiled.

    Like ``gradient_diagnostics`` but without taking norms: for small models and
    research (the per-step matrices take ``T (G H D_l + G H^2)`` elements per
    layer and direction).

    .. math::
        \texttt{dparams[l]{}[d].w\_ih}_t = \delta gi_t^\top x_t, \quad
        \texttt{w\_hh}_t = \delta gh_t^\top h_{t-1}, \quad
        \texttt{b\_ih}_t = \textstyle\sum_b \delta gi_{t,b}, \quad
        \texttt{b\_hh}_t = \textstyle\sum_b \delta gh_{t,b},

    each summing over ``t`` to ``grads.layers[l][d]``. Step ``t``'s term is what
    ``jax.grad`` gives for a zero perturbation of the weights used at step ``t``
    only (per sequence, in original time order).

    Args: as ``gradient_diagnostics``.

    Returns:
        ``StepGradients``: ``loss``, ``grads``, ``dh[l][d]`` (T, B, H) the total
        ``dL/dh_t``, ``dx[l]`` (T, B, D_l) (both (B, T, ...) with ``batch_first``),
        ``dparams[l][d]`` a ``CellParams``
        whose leaves have a leading T axis (``w_ih (T, G*H, D_l)``,
        ``w_hh (T, G*H, H)``, biases ``(T, G*H)`` or None).
    """
    xs, targets, state, lengths = _validate(model, params, xs, targets, loss, state, lengths,
                                            last_only)
    return _step_gradients(model, loss, bool(last_only), params, xs, targets, state, lengths,
                           dropout_key)


def summary(diag: Diagnostics) -> dict[str, jax.Array]:
    r"""A compact metric of a ``Diagnostics`` for training logs.

    For each layer and direction, with the suffix ``_l{l}`` (plus ``_reverse`` for
    the second direction: ``stack.layer_suffix``, as PyTorch's parameter names):

    * ``dh_first``: :math:`\|\partial L/\partial h_0\|`, step 0;
    * ``dh_last``: :math:`\|\partial L/\partial h_{T-1}\|`, step T-1;
    * ``dh_ratio``: ``dh_first / dh_last`` (NaN where ``dh_last`` is 0, e.g. when
      no sequence has length T). For the forward direction a ratio far below 1
      means the gradient vanishes on its way back to the start; the reverse
      direction runs from ``T-1`` to ``0``, so there the same reading is
      ``1 / ratio``.

    Args:
        diag: from ``gradient_diagnostics``.

    Returns:
        A dict of scalar arrays (usable inside ``jax.jit``; ``float(v)`` to log).
    """
    out = {}
    for l, layer in enumerate(diag.dh_norm):
        for d, dh in enumerate(layer):
            sfx = layer_suffix(l, d)
            first, last = dh[0], dh[-1]
            safe = jnp.where(last > 0, last, 1)  # avoid 0/0 in the untaken branch
            out[f"dh_first{sfx}"] = first
            out[f"dh_last{sfx}"] = last
            out[f"dh_ratio{sfx}"] = jnp.where(last > 0, first / safe, jnp.nan)
    return out
