r"""Benchmark: one full training step of jaxrnn against PyTorch and Flax, on the CPU.

One *step* is the whole update: forward over the sequence (``num_layers``
layers, one or both directions), the linear readout, the loss (mean squared
error of the readout's outputs at every step against random targets), the
backward pass and an Adam update. It is timed for

* ``bptt``:     ``jaxrnn.make_train_step(model, optax.adam(lr), loss="mse", method="bptt")``
  (the handwritten reverse-scan BPTT), jit-compiled, buffers donated;
* ``autodiff``: the same with ``method="autodiff"`` (``jax.grad`` through the scan);
* ``bptt_bf16``, ``autodiff_bf16``: those two steps with the model built as
  ``jaxrnn.RNN(..., compute_dtype=jnp.bfloat16)``: the same float32 parameters,
  Adam state and batch, each recurrent step's products and gate math in bfloat16,
  the carry, the cotangents and the weight-gradient products in float32
  (``Settings.bf16``; ``--no-bf16`` leaves them out). The report gives their
  time, peak and temp bytes over the float32 steps' (``ratios``);
* ``torch``:    ``nn.RNN(tanh)`` / ``nn.LSTM`` / ``nn.GRU`` (``num_layers``,
  ``bidirectional``) + ``nn.Linear``, ``torch.optim.Adam``, eager, on as many
  threads as JAX uses; ``torch_1t``: the same on one thread (recorded as "not
  installed" without PyTorch, which the ``test`` extra installs);
* ``flax``:     ``flax.linen.RNN`` layers of ``SimpleCell`` / ``OptimizedLSTMCell`` /
  ``GRUCell`` (the reverse direction with ``reverse=True, keep_order=True``) +
  ``Dense``, ``jax.value_and_grad``, ``optax.adam``, jit, donated (recorded as
  "not installed" without flax: ``pip install -e ".[bench]"``);
* ``xla_chain``: one XLA program doing the step's matrix products with the
  cheapest elementwise links that keep them all in use. Its links are work of
  their own and XLA picks its kernels: it is a contender, not a bound. (Until
  the product floor came, benchmark.json held this program's time under
  ``methods["floor"]``; that key now holds the product floor.)

Against these stands the **product floor** (``floor``): the time of the step's
matrix products alone, with no elementwise work of any kind, each timed on its
own with the fastest kernel available in the same run. Per layer and direction
they are the ``T`` dependent forward products ``(B,H) x (H,G*H)`` and the ``T``
dependent backward products ``(B,G*H) x (G*H,H)`` (each timed as a chain of
``T`` calls), the input projection, ``dW_ih``, ``dW_hh`` and, above the first
layer, the layer's input gradient (each one product over all ``T*B`` rows), and
once the readout, its input gradient and ``dW_hy`` (``floor.step_products``
lists them). Every distinct shape is timed with every kernel: XLA (a jitted
``jnp.dot``; for a chain a jitted loop of ``T`` products, each reading the
previous one), numpy (``np.matmul(a, b, out=c)``, a chain being ``T`` calls in
a Python loop) and PyTorch (``torch.mm(a, b, out=c)``, on the torch
contender's threads), interleaved round-robin; a product counts at the
smallest over kernels of the median over runs, and the floor is their sum,
``count``-weighted. ``floor/bptt`` and ``floor/torch`` are the floor over those
steps' times: 1 would be a step doing nothing but its products, each with the
fastest kernel at hand.

Every side starts from the *same* weights (PyTorch's initialisation drawn with
numpy, loaded with ``RNN.from_torch``, handed to PyTorch with ``RNN.to_torch`` and
mapped onto Flax's parameter names, where one bias per gate stands for PyTorch's
two) and the same float32 data, so their first-step losses agree to float32
rounding. Every jaxrnn, Flax and PyTorch step also returns the loss and the
global gradient norm (what jaxrnn's train step reports), so all do the same work.

Method of measurement: all contenders of a grid point are compiled (compile
time, ``lower + compile``, recorded apart) and warmed up, then timed round-robin
in one process, one step each per round, the order rotated every round, each
step blocked on (``jax.block_until_ready``) before the clock stops. The reported
time is the median over the rounds (a contender whose ``repeats`` steps would
take over ``budget_s`` gets fewer, at least 3). Parameters and optimizer states
returned by a step are fed to the next one, so every timed step really runs.
PyTorch is also timed on one thread (``torch_1t``): on a small shared machine
its OpenMP threads wait at the barrier of every small op for a core to free up.
The product floor is timed after the contenders, product by product, its
kernels interleaved the same way (``floor_repeats`` runs each).

Peak memory (bytes of array/tensor buffers, not the process's RSS):

* JAX (``bptt``, ``autodiff``, their ``_bf16`` forms, ``flax``, ``xla_chain``): from XLA's buffer
  assignment of the compiled executable, ``compiled.memory_analysis()``:
  ``argument + output - alias + temp`` bytes (donated buffers counted once). It
  is a static plan, exact for what the executable allocates; it includes the
  parameters, the optimizer state and the batch.
* PyTorch: one extra step under ``torch.profiler`` (``profile_memory``), replaying
  its allocation timeline: the bytes of the tensors alive before the step that it
  touches (parameters, Adam state, the batch) plus the running sum of the
  tensors it allocates and frees, maximised. It sees the tensors that go
  through PyTorch's allocator (the parameters, Adam state, batch,
  activations, gradients, workspaces), but not memory that MKL or oneDNN
  take for themselves, nor the allocator's slack.

Neither counts the runtime itself (libraries, thread stacks, compiled code).
The two numbers are comparable as "bytes of buffers the step needs at once",
not as process memory.

Run ``jaxrnn bench --quick --out /tmp/b`` (seconds) or without ``--quick`` for
the full grid (minutes). It writes ``benchmark.json`` (every number),
``benchmark.md`` (the tables) and ``benchmark.png`` (a chart).

The package, one module per role (each imports only those above it):

* ``settings``: ``Settings``, ``GridPoint``, ``QUICK``, the contenders' names;
* ``environment``: versions, CPU, CPU pressure, thread counts;
* ``contenders``: ``Contender``, the jaxrnn / PyTorch / Flax steps, ``init_params``,
  memory measurement;
* ``timing``: ``time_round_robin``, ``summarize``;
* ``floor``: the product floor and the ``xla_chain`` contender;
* ``report``: ratios, the markdown tables, the chart, the output files;
* ``run``: ``bench_point``, ``run_benchmark``;
* ``cli``: ``parse_args``, ``main``.
"""

import importlib
from typing import TYPE_CHECKING

# Each public name and the module that defines it. The names are loaded on first use
# (PEP 562), so that ``jaxrnn bench --help`` answers without importing JAX.
_HOME = {
    "cli": ("main", "parse_args"),
    "contenders": ("Contender", "flax_contender", "flax_params", "flax_rnn_class",
                   "init_params", "jaxrnn_contender", "torch_contender", "torch_memory",
                   "xla_memory"),
    "environment": ("cpu_model", "cpu_pressure", "environment", "jax_threads"),
    "floor": ("KERNELS", "Product", "product_floor", "step_products", "xla_chain_contender",
              "xla_chain_step"),
    "report": ("chart", "markdown", "ratios", "write_outputs"),
    "run": ("bench_point", "bench_variant", "run_benchmark"),
    "settings": ("CELL_VARIANTS", "CONTENDERS", "METHODS", "MIXED_PRECISION", "QUICK", "STEPS",
                 "GridPoint", "Settings", "grid_point"),
    "timing": ("summarize", "time_round_robin"),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    if name in _HOME:  # a submodule, as ``bench.contenders``
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from jaxrnn_lab.bench.cli import main, parse_args  # noqa: F401
    from jaxrnn_lab.bench.contenders import (Contender, flax_contender, flax_params,  # noqa: F401
                                             flax_rnn_class, init_params, jaxrnn_contender,
                                             torch_contender, torch_memory, xla_memory)
    from jaxrnn_lab.bench.environment import (cpu_model, cpu_pressure, environment,  # noqa: F401
                                              jax_threads)
    from jaxrnn_lab.bench.floor import (KERNELS, Product, product_floor,  # noqa: F401
                                        step_products, xla_chain_contender, xla_chain_step)
    from jaxrnn_lab.bench.report import chart, markdown, ratios, write_outputs  # noqa: F401
    from jaxrnn_lab.bench.run import bench_point, bench_variant, run_benchmark  # noqa: F401
    from jaxrnn_lab.bench.settings import (CELL_VARIANTS, CONTENDERS, METHODS,  # noqa: F401
                                           MIXED_PRECISION, QUICK, STEPS, GridPoint, Settings,
                                           grid_point)
    from jaxrnn_lab.bench.timing import summarize, time_round_robin  # noqa: F401

__all__ = [
    "Settings",
    "GridPoint",
    "grid_point",
    "QUICK",
    "STEPS",
    "CONTENDERS",
    "METHODS",
    "MIXED_PRECISION",
    "Contender",
    "init_params",
    "jaxrnn_contender",
    "torch_contender",
    "flax_contender",
    "flax_params",
    "flax_rnn_class",
    "xla_memory",
    "torch_memory",
    "KERNELS",
    "Product",
    "step_products",
    "product_floor",
    "xla_chain_step",
    "xla_chain_contender",
    "time_round_robin",
    "summarize",
    "cpu_model",
    "cpu_pressure",
    "jax_threads",
    "environment",
    "ratios",
    "markdown",
    "chart",
    "write_outputs",
    "bench_point",
    "bench_variant",
    "CELL_VARIANTS",
    "run_benchmark",
    "parse_args",
    "main",
]
