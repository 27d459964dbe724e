"""Sampling from a trained model, one step at a time (character language models).

The prompt runs through ``RNN.apply``; each sampled id is then fed back through
``RNN.step``, one step of every layer on the raw (one-hot) input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxrnn._src.model import RNN, RNNParams
from jaxrnn._src.validation import check_int, check_readout


@functools.partial(jax.jit, static_argnums=(0, 3))
def _sample_ids(model: RNN, params: RNNParams, prompt_onehot: jax.Array, length: int,
                temperature: jax.Array, key: jax.Array) -> jax.Array:
    ys, state = model.apply(params, prompt_onehot)  # warm up on the prompt (P, 1, V)
    logits = ys[-1, 0]
    vocab = model.output_size

    def body(carry, k):
        logits, state = carry
        nxt = jax.random.categorical(k, logits / temperature)  # sample the next id
        x = jax.nn.one_hot(nxt, vocab, dtype=prompt_onehot.dtype)[None]  # (B=1, V)
        state, y = model.step(params, state, x)
        return (y[0], state), nxt

    _, ids = jax.lax.scan(body, (logits, state), jax.random.split(key, length))
    return ids


def sample(model: RNN, params: RNNParams, prompt_ids: ArrayLike, length: int, key: jax.Array,
           temperature: float = 1.0) -> jax.Array:
    """Samples ``length`` ids after a prompt, feeding each sample back as the next input.

    The model must read one-hot ids and output logits over the same vocabulary
    (``input_size == output_size``), as the ``charlm`` task trains it.

    Args:
        model: a one-directional ``RNN`` with ``input_size == output_size == V``.
        params: its parameters.
        prompt_ids: integer ids, (P,) with P >= 1.
        length: how many ids to sample, >= 1.
        key: a PRNG key.
        temperature: > 0; lower is more conservative, 1 samples the model's distribution.

    Returns:
        The sampled ids, (length,).

    Raises:
        ValueError: a bidirectional model or one without a readout, mismatched
            sizes, an empty prompt, a non-positive length or temperature.
    """
    check_readout(model.output_size, "sample")
    if model.bidirectional:
        raise ValueError("a bidirectional model cannot generate: it needs the future")
    if model.input_size != model.output_size:
        raise ValueError(f"sampling feeds outputs back as inputs: input_size "
                         f"({model.input_size}) must equal output_size ({model.output_size})")
    prompt_ids = jnp.asarray(prompt_ids)
    if prompt_ids.ndim != 1 or prompt_ids.shape[0] == 0:
        raise ValueError(f"prompt must be a non-empty sequence of ids, got shape "
                         f"{prompt_ids.shape}")
    check_int("length", length, 1)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    dtype = params.readout.weight.dtype
    onehot = jax.nn.one_hot(prompt_ids, model.input_size, dtype=dtype)[:, None, :]  # (P, 1, V)
    return _sample_ids(model.time_major(), params, onehot, length,  # the prompt is (P, 1, V)
                       jnp.asarray(temperature, dtype), key)
