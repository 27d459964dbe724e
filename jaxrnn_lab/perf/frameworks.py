"""One training step of the same model in four LSTMs: Flax NNX, Equinox, and jaxrnn's two modules.

The model: token embedding (V, D) -> one LSTM layer (H) -> linear head (V), next-token
cross-entropy on a random batch of token sequences, one Adam step, jitted, float32:

* ``flax``: ``flax.nnx.RNN(nnx.OptimizedLSTMCell)``, ``nnx.jit`` + ``nnx.Optimizer``;
* ``equinox``: ``eqx.nn.LSTMCell`` under ``jax.lax.scan`` (vmapped over the batch),
  ``eqx.filter_jit`` + optax;
* ``jaxrnn.nnx``: ``jaxrnn.nnx.RNN("lstm")`` in the same NNX model as ``flax``;
* ``jaxrnn.equinox``: ``jaxrnn.equinox.RNN("lstm")`` in the same Equinox model.

Every step is compiled first; then, round after round, each contender in turn times
``--steps`` calls (so load that drifts during the run moves all four alike). The
result per contender is the median over rounds of the mean step time.

Commands::

    python -m jaxrnn_lab.perf.frameworks --quick      # seconds (the test suite's size)
    python -m jaxrnn_lab.perf.frameworks              # the docs' table (docs/frameworks.md)

Prints a markdown table; with ``--out DIR`` also writes ``frameworks.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Settings:
    batch: int = 32  # B
    steps_per_seq: int = 100  # T
    vocab: int = 64  # V
    embed: int = 32  # D
    hidden: int = 128  # H
    rounds: int = 7
    steps: int = 10  # timed steps per contender per round
    seed: int = 0


QUICK = Settings(batch=4, steps_per_seq=12, vocab=11, embed=8, hidden=16, rounds=2, steps=2)


def _nnx_step(s: Settings, rnn: str) -> Callable[[], object]:
    """The NNX model with ``flax.nnx.RNN(OptimizedLSTMCell)`` or ``jaxrnn.nnx.RNN``."""
    import optax
    from flax import nnx

    import jaxrnn.nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(s.vocab, s.embed, rngs=rngs)
            if rnn == "flax":
                self.rnn = nnx.RNN(nnx.OptimizedLSTMCell(s.embed, s.hidden, rngs=rngs))
            else:
                self.rnn = jaxrnn.nnx.RNN("lstm", s.embed, s.hidden, rngs=rngs)
            self.head = nnx.Linear(s.hidden, s.vocab, rngs=rngs)

        def __call__(self, tokens):  # (B, T) -> (B, T, V)
            return self.head(self.rnn(self.embed(tokens)))

    def loss_fn(model, tokens):
        logits = model(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @nnx.jit
    def step(model, optimizer, tokens):
        loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
        optimizer.update(model, grads)
        return loss

    model = Model(nnx.Rngs(s.seed))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    tokens = _tokens(s)
    return lambda: step(model, optimizer, tokens)


def _equinox_step(s: Settings, rnn: str) -> Callable[[], object]:
    """The Equinox model with ``eqx.nn.LSTMCell`` under ``lax.scan`` or ``jaxrnn.equinox.RNN``."""
    import equinox as eqx
    import jax
    import optax

    import jaxrnn.equinox

    class Model(eqx.Module):
        embed: eqx.nn.Embedding
        rnn: eqx.Module
        head: eqx.nn.Linear

        def __init__(self, key):
            k1, k2, k3 = jax.random.split(key, 3)
            self.embed = eqx.nn.Embedding(s.vocab, s.embed, key=k1)
            if rnn == "equinox":
                self.rnn = eqx.nn.LSTMCell(s.embed, s.hidden, key=k2)
            else:
                self.rnn = jaxrnn.equinox.RNN("lstm", s.embed, s.hidden, key=k2)
            self.head = eqx.nn.Linear(s.hidden, s.vocab, key=k3)

        def __call__(self, tokens):  # (T,) -> (T, V)
            xs = jax.vmap(self.embed)(tokens)
            if isinstance(self.rnn, eqx.nn.LSTMCell):
                zeros = jax.numpy.zeros(s.hidden)
                _, hs = jax.lax.scan(lambda c, x: (self.rnn(x, c),) * 2, (zeros, zeros), xs)
                hs = hs[0]
            else:
                hs, _ = self.rnn(xs)
            return jax.vmap(self.head)(hs)

    def loss_fn(model, tokens):
        logits = jax.vmap(model)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    optimizer = optax.adam(1e-3)

    @eqx.filter_jit
    def step(model, opt_state, tokens):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, loss

    state = {"model": Model(jax.random.key(s.seed))}
    state["opt"] = optimizer.init(eqx.filter(state["model"], eqx.is_inexact_array))
    tokens = _tokens(s)

    def run():
        state["model"], state["opt"], loss = step(state["model"], state["opt"], tokens)
        return loss

    return run


def _tokens(s: Settings):
    import jax

    return jax.random.randint(jax.random.key(s.seed + 1), (s.batch, s.steps_per_seq + 1), 0,
                              s.vocab)


CONTENDERS = {
    "flax.nnx.RNN(OptimizedLSTMCell)": lambda s: _nnx_step(s, "flax"),
    "equinox.nn.LSTMCell + lax.scan": lambda s: _equinox_step(s, "equinox"),
    "jaxrnn.nnx.RNN('lstm')": lambda s: _nnx_step(s, "jaxrnn"),
    "jaxrnn.equinox.RNN('lstm')": lambda s: _equinox_step(s, "jaxrnn"),
}


def measure(s: Settings) -> dict:
    """Compiles every contender's step, then times them interleaved, round by round."""
    import jax

    steps = {}
    compile_s = {}
    for name, make in CONTENDERS.items():
        t0 = time.perf_counter()
        steps[name] = make(s)
        jax.block_until_ready(steps[name]())  # compile
        compile_s[name] = time.perf_counter() - t0
    times = {name: [] for name in steps}
    for _ in range(s.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(s.steps):
                out = step()
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / s.steps)
    return {"settings": dataclasses.asdict(s), "environment": environment(),
            "compile_s": compile_s, "step_s": {n: statistics.median(t) for n, t in times.items()},
            "rounds_s": times}


def environment() -> dict:
    import equinox
    import flax
    import jax

    return {"jax": jax.__version__, "flax": flax.__version__, "equinox": equinox.__version__,
            "backend": jax.default_backend(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "load_average": os.getloadavg()}


def table(result: dict) -> str:
    """The markdown table of step times, relative to the fastest."""
    step = result["step_s"]
    best = min(step.values())
    rows = ["| model | one training step (ms) | relative | compile (s) |",
            "|---|---:|---:|---:|"]
    rows += [f"| {n} | {t * 1e3:.2f} | {t / best:.2f} | {result['compile_s'][n]:.1f} |"
             for n, t in step.items()]
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, two rounds")
    parser.add_argument("--out", type=Path, help="write frameworks.json here")
    args = parser.parse_args(argv)
    result = measure(QUICK if args.quick else Settings())
    print(json.dumps({k: result[k] for k in ("settings", "environment")}))
    print(table(result))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "frameworks.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
