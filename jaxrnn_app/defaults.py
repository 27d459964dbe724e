"""The run options' defaults, in plain Python (no JAX): the one home of the per-task
defaults, which ``jaxrnn_app.runner`` applies and ``jaxrnn train --help`` lists.

``RUN_DEFAULTS`` are the defaults of every task (``runner.RunConfig``'s field
defaults; tests/test_runner.py checks that the two agree); ``TASK_DEFAULTS[task]``
overrides some of them for that task.
"""

from __future__ import annotations

from typing import Any

TASKS = ("example", "sine", "adding", "lag", "charlm")

# ``--compute-dtype``'s values: mixed precision below the parameters' float32.
COMPUTE_DTYPES = ("bfloat16", "float16")

RUN_DEFAULTS: dict[str, Any] = dict(
    task="example", text=None, cell="elman", hidden=64, proj_size=0, forget_bias=0.0,
    alpha=None, layers=1, bidirectional=False, dropout=0.0, method="bptt",
    online_every=None, diagnostics=False,
    optimizer="adam", lr=1e-3, schedule="constant", warmup=0, clip=None, batch=32,
    seq_len=50, k1=None, k2=None, bptt_segment=None, steps=1000, seed=0, devices=None,
    log_every=10, eval_every=100, checkpoint_every=500, target_loss=None, dtype="float32",
    compute_dtype=None, reference_model=False)

# Per-task defaults, applied to options the user did not give.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "example": dict(lr=0.02, steps=10000, target_loss=1e-4, log_every=10, eval_every=0,
                    checkpoint_every=5000, batch=1, seq_len=3, hidden=1),
    "sine": dict(cell="lstm", hidden=32, lr=1e-2, steps=500, batch=32, seq_len=50,
                 log_every=10, eval_every=50, checkpoint_every=250),
    "adding": dict(cell="lstm", hidden=64, lr=1e-2, steps=1500, batch=64, seq_len=100,
                   clip=1.0, log_every=10, eval_every=100, checkpoint_every=500),
    # Marschall, Cho & Savin 2020's streamed lag task: their leaky RNN of 32 units
    "lag": dict(cell="leaky", hidden=32, lr=3e-3, steps=500, batch=8, seq_len=50,
                log_every=10, eval_every=50, checkpoint_every=250),
    "charlm": dict(cell="lstm", hidden=128, lr=3e-3, steps=1500, batch=32, seq_len=64,
                   clip=1.0, log_every=10, eval_every=100, checkpoint_every=500),
}


def task_default(task: str, name: str) -> Any:
    """The value option ``name`` takes in a run of ``task`` when it is not given."""
    return TASK_DEFAULTS[task].get(name, RUN_DEFAULTS[name])


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def default_text(name: str) -> str:
    """The help's default of option ``name``: one value, or one per task where they differ,
    e.g. ``(default per task: example 1, sine 32, adding 64, charlm 128)``."""
    values = [task_default(t, name) for t in TASKS]
    if all(v == values[0] for v in values):
        return f"(default: {_show(values[0])})"
    return "(default per task: " + ", ".join(
        f"{t} {_show(v)}" for t, v in zip(TASKS, values)) + ")"
