"""A typed use of the public API: build, run, differentiate and train an RNN.

Checked by ``mypy --strict`` (tests/test_typing.py) and run by the tests too::

    python examples/typed_example.py
"""

from __future__ import annotations

import jax
import optax

import jaxrnn

T, B, D, H, O = 6, 4, 3, 8, 2  # steps, batch, inputs, hidden units, outputs


def build(cell: jaxrnn.CellName = "lstm") -> jaxrnn.RNN:
    return jaxrnn.RNN(cell=cell, input_size=D, hidden_size=H, output_size=O)


def train(model: jaxrnn.RNN, params: jaxrnn.RNNParams, batch: jaxrnn.Batch, steps: int,
          method: jaxrnn.Method = "bptt") -> tuple[jaxrnn.RNNParams, list[float]]:
    optimizer: optax.GradientTransformation = jaxrnn.make_optimizer("adam", lr=1e-2)
    step: jaxrnn.TrainStep = jaxrnn.make_train_step(model, optimizer, loss="mse",
                                                    method=method, donate=False)
    opt_state: optax.OptState = optimizer.init(params)
    losses: list[float] = []
    for _ in range(steps):
        params, opt_state, metrics = step(params, opt_state, batch)
        losses.append(float(metrics["loss"]))
    return params, losses


def main() -> None:
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    xs: jax.Array = jax.random.normal(kx, (T, B, D))
    targets: jax.Array = jax.random.normal(ky, (T, B, O))

    model = build()
    params: jaxrnn.RNNParams = model.init(kp, dtype=xs.dtype)
    ys, state = model.apply(params, xs)
    final: jaxrnn.State = state
    loss, grads = model.loss_and_grad(params, xs, targets, loss="mse", method="bptt")
    assert ys.shape == (T, B, O)
    assert isinstance(grads, jaxrnn.RNNParams)

    params, history = train(model, params, jaxrnn.Batch(xs, targets), steps=3)
    print(f"loss {float(loss):.4f} -> {history[-1]:.4f}; final state: "
          f"{len(final) if isinstance(final, tuple) else 1} array(s)")


if __name__ == "__main__":
    main()
