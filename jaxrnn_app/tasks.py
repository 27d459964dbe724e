"""Tasks: data sources for training and the reference worked example.

Every task is a frozen dataclass (hashable static configuration) with the same
small interface:

* ``batch(step, part=None) -> Batch``: training batch number ``step``, a pure
  function of ``(seed, step)``, so that a resumed run regenerates exactly the
  batches it would have seen; ``part=(i, n)`` gives only its rows ``[i*B/n,
  (i+1)*B/n)`` (process ``i`` of ``n`` in a multi-process run), equal to slicing
  the whole batch;
* ``eval_batch() -> Batch``: a fixed held-out batch, drawn from a stream that no
  training step uses;
* ``batches(start)``: the training batches ``start, start + 1, ...``;
* static facts: ``name``, ``input_size``, ``output_size``, ``loss`` (``"half_sse"``,
  ``"mse"`` or ``"xent"``), ``last_step_only`` (only the last step's output is
  scored), ``stream`` (batch ``step + 1`` continues batch ``step``'s sequences, so
  an online run carries its state from one batch to the next) and ``baseline``
  (the loss of the best constant prediction, or None).

All arrays are time-major: inputs ``(T, B, input_size)``, targets
``(T, B, output_size)`` floats or ``(T, B)`` integer classes. ``make_task(name,
**kwargs)`` builds a task by name.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from pathlib import Path
from typing import ClassVar, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn import RNN, Batch, CellParams, ReadoutParams, RNNParams


class Example(NamedTuple):
    """The reference worked example (``shared/seed-worked-example.md``)."""

    model: RNN
    params: RNNParams
    batch: Batch
    h0: jax.Array  # (1, 1, 1) initial state
    lr: float


def reference_example(xs=(1.0, 2.0, 3.0), targets=(0.5, 1.0, 1.5), w_xh: float = 0.5,
                      w_hh: float = 0.1, w_hy: float = 1.0, h0: float = 0.0, lr: float = 0.1,
                      dtype=jnp.float32) -> Example:
    """The one-unit, bias-free tanh RNN of the worked example, or a variant of it.

    Defaults are the example's: ``x = [1, 2, 3]``, ``t = [0.5, 1.0, 1.5]``,
    ``W_xh = 0.5``, ``W_hh = 0.1``, ``W_hy = 1.0``, ``h_0 = 0``, ``lr = 0.1``.

    Args:
        xs: the T inputs (one feature, one sequence).
        targets: the T targets.
        w_xh, w_hh, w_hy: the three weights.
        h0: the initial hidden state.
        lr: the learning rate of the plain gradient step.
        dtype: floating dtype of every array.

    Returns:
        An ``Example``: the model, its params, a ``Batch`` with ``xs (T, 1, 1)`` and
        ``targets (T, 1, 1)``, the initial state ``(1, 1, 1)`` and ``lr``.
    """
    xs = jnp.asarray(xs, dtype).reshape(-1, 1, 1)
    targets = jnp.asarray(targets, dtype).reshape(-1, 1, 1)
    if xs.shape[0] == 0:
        raise ValueError("xs is an empty sequence: give at least one input")
    if targets.shape != xs.shape:
        raise ValueError(f"targets must have one value per input: {xs.shape[0]} inputs, "
                         f"got {targets.shape[0]} targets")
    model = RNN(cell="elman", input_size=1, hidden_size=1, output_size=1, bias=False,
                readout_bias=False, nonlinearity="tanh")
    w = lambda v: jnp.full((1, 1), v, dtype)  # noqa: E731
    params = RNNParams(layers=((CellParams(w_ih=w(w_xh), w_hh=w(w_hh), b_ih=None, b_hh=None),),),
                       readout=ReadoutParams(weight=w(w_hy), bias=None))
    return Example(model, params, Batch(xs, targets), jnp.full((1, 1, 1), h0, dtype), lr)


# --- tasks for training --------------------------------------------------------

ADDING_BASELINE = 1.0 / 6.0
"""MSE of always answering 1 on the adding problem: the variance of a sum of two
independent U(0, 1) values, 2/12 = 1/6 ~ 0.1667. (Le, Jaitly & Hinton 2015 quote
0.1767; for U(0, 1) values the exact figure is 1/6.)"""

_TRAIN_STREAM = 0  # the random stream of training batches: seeded by (seed, 0, step)
_EVAL_STREAM = 1  # the held-out stream: seeded by (seed, 1, 0); no training step uses it


def bits_per_char(nats: float) -> float:
    """A cross-entropy in nats per character, converted to bits per character."""
    return nats / math.log(2)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_part(part, batch_size: int) -> slice:
    """The rows of a batch that ``part = (i, n)`` names: ``[i*B/n, (i+1)*B/n)``.

    Args:
        part: ``(i, n)``, integers with ``n >= 1`` and ``0 <= i < n``, or None (all rows).
        batch_size: B; ``n`` must divide it.

    Returns:
        The ``slice`` of the batch axis.

    Raises:
        ValueError: a malformed ``part``, or ``n`` does not divide B.
    """
    if part is None:
        return slice(0, batch_size)
    ok = (isinstance(part, tuple) and len(part) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in part))
    if not ok or not part[1] >= 1 or not 0 <= part[0] < part[1]:
        raise ValueError(f"part must be a pair (i, n) of integers with 0 <= i < n, got {part!r}")
    i, n = int(part[0]), int(part[1])
    if batch_size % n:
        raise ValueError(f"part={part!r}: n={n} must divide the batch size {batch_size}")
    rows = batch_size // n
    return slice(i * rows, (i + 1) * rows)


def take_rows(batch: Batch, rows: slice) -> Batch:
    """The sequences ``rows`` of a batch (axis 1 of ``xs``/``targets``, axis 0 of ``lengths``)."""
    return Batch(batch.xs[:, rows], batch.targets[:, rows],
                 None if batch.lengths is None else batch.lengths[rows])


def _check_real(name: str, value, *, minimum: float, strict: bool = False,
                maximum: float | None = None) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
          and math.isfinite(value) and (value > minimum if strict else value >= minimum)
          and (maximum is None or value < maximum))
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        if maximum is not None:
            bound += f" and < {maximum}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
    """The interface every task shares (see the module docstring).

    Args:
        dtype: the floating dtype of the inputs and float targets (default float32).
    """

    name: ClassVar[str]
    loss: ClassVar[str]  # "half_sse", "mse" or "xent" (see jaxrnn.half_sse, jaxrnn.mse, jaxrnn.xent)
    last_step_only: ClassVar[bool] = False  # score only ys[-1:] against targets[-1:]
    stream: ClassVar[bool] = False  # batch step+1 continues batch step's sequences
    input_size: ClassVar[int]  # D of the inputs (T, B, D)
    output_size: ClassVar[int]  # O of the model's outputs (T, B, O)

    dtype: str = "float32"

    def __post_init__(self):
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError:
            raise TypeError(f"dtype must be a floating dtype, got {self.dtype!r}") from None
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"dtype must be a floating dtype, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype.name)  # a name: hashable and printable

    def batch(self, step: int, part: tuple[int, int] | None = None) -> Batch:
        """Training batch number ``step`` (an integer >= 0), a pure function of the task.

        Args:
            step: an integer >= 0.
            part: ``(i, n)``: only rows ``[i*B/n, (i+1)*B/n)`` of the batch (``n`` must
                divide B), exactly ``take_rows(batch(step), check_part(part, B))``;
                None: the whole batch.
        """
        raise NotImplementedError

    def eval_batch(self) -> Batch:
        """The fixed held-out batch."""
        raise NotImplementedError

    def batches(self, start: int = 0) -> Iterator[Batch]:
        """The training batches ``start, start + 1, ...`` (endless); resume with ``start``."""
        _check_int("start", start, 0)
        return map(self.batch, itertools.count(int(start)))

    @property
    def baseline(self) -> float | None:
        """The expected loss of the best constant prediction (one that ignores the
        inputs), or None where that is not meaningful. A model that learned
        something does better."""
        return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExampleTask(Task):
    """The reference worked example: the same single sequence at every step.

    ``batch(step)`` and ``eval_batch()`` both return ``reference_example().batch``
    (``xs (3, 1, 1)``, ``targets (3, 1, 1)``); ``example()`` gives the whole example
    (model, its fixed weights, initial state and learning rate).
    """

    name: ClassVar[str] = "example"
    loss: ClassVar[str] = "half_sse"
    input_size: ClassVar[int] = 1
    output_size: ClassVar[int] = 1

    def example(self) -> Example:
        """``reference_example(dtype=self.dtype)``."""
        return reference_example(dtype=self.dtype)

    def batch(self, step: int, part: tuple[int, int] | None = None) -> Batch:
        _check_int("step", step, 0)
        batch = self.example().batch
        return take_rows(batch, check_part(part, 1)) if part is not None else batch

    def eval_batch(self) -> Batch:
        return self.example().batch


@dataclasses.dataclass(frozen=True, kw_only=True)
class _SampledTask(Task):
    """A task whose batches are sampled from a numpy generator seeded by (seed, stream, step).

    Args:
        seed: an integer >= 0; the whole data stream is a function of it.
        batch_size: B of the training batches.
        seq_len: T, steps per sequence.
        eval_size: B of the held-out batch.
        dtype: as in ``Task``.
    """

    min_seq_len: ClassVar[int] = 1

    seed: int = 0
    batch_size: int = 32
    seq_len: int = 50
    eval_size: int = 512

    def __post_init__(self):
        super().__post_init__()
        _check_int("seed", self.seed, 0)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seq_len", self.seq_len, self.min_seq_len)
        _check_int("eval_size", self.eval_size, 1)

    def _rng(self, stream: int, step: int = 0) -> np.random.Generator:
        return np.random.default_rng([int(self.seed), stream, int(step)])

    def _sample(self, rng: np.random.Generator, batch_size: int,
                rows: slice | None = None) -> Batch:
        """``batch_size`` sequences drawn from ``rng``; only the sequences ``rows`` are
        built (all if None). The random draw is always the whole batch's, so that the
        rows equal those of the whole batch."""
        raise NotImplementedError

    def batch(self, step: int, part: tuple[int, int] | None = None) -> Batch:
        """Training batch number ``step``: a pure function of ``(seed, step)``.

        Args:
            step: an integer >= 0.
            part: ``(i, n)``: only the rows ``[i*B/n, (i+1)*B/n)`` (``n`` must divide
                ``batch_size``), equal to those rows of the whole batch; None: all.
                The random numbers of the whole batch are still drawn (a numpy
                generator draws in sequence), so a part saves the building of the
                other rows (sines, markers, one-hot windows), not the draw.

        Returns:
            A ``Batch`` of ``batch_size`` (or ``batch_size / n``) sequences of
            ``seq_len`` steps.
        """
        _check_int("step", step, 0)
        rows = None if part is None else check_part(part, self.batch_size)
        return self._sample(self._rng(_TRAIN_STREAM, step), self.batch_size, rows)

    def eval_batch(self) -> Batch:
        """The held-out batch of ``eval_size`` sequences, from a stream no training step uses."""
        return self._sample(self._rng(_EVAL_STREAM), self.eval_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SineTask(_SampledTask):
    r"""Next-value prediction of noisy sine waves, one random frequency and phase per sequence.

    .. math::
        x_t = \sin(\omega t + \varphi) + \sigma \epsilon_t, \qquad
        \text{target}_t = \sin(\omega (t + 1) + \varphi), \qquad t = 0 \dots T-1

    with :math:`\omega \sim U[\text{min\_freq}, \text{max\_freq}]` (radians per step),
    :math:`\varphi \sim U[0, 2\pi)` and :math:`\epsilon_t \sim N(0, 1)`. The targets
    are the *clean* next values, so the loss measures how well the model tracks
    the underlying wave through the noise (a perfect model reaches 0).

    Batches: ``xs (T, B, 1)``, ``targets (T, B, 1)``; loss ``"mse"``.

    Args:
        noise: sigma, the standard deviation of the input noise (>= 0).
        min_freq, max_freq: the range of omega, radians per step (0 < min <= max).
        seed, batch_size, seq_len, eval_size, dtype: as in every sampled task.
    """

    name: ClassVar[str] = "sine"
    loss: ClassVar[str] = "mse"
    input_size: ClassVar[int] = 1
    output_size: ClassVar[int] = 1

    noise: float = 0.1
    min_freq: float = 0.1
    max_freq: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        _check_real("noise", self.noise, minimum=0.0)
        _check_real("min_freq", self.min_freq, minimum=0.0, strict=True)
        _check_real("max_freq", self.max_freq, minimum=0.0, strict=True)
        if self.max_freq < self.min_freq:
            raise ValueError(f"max_freq must be >= min_freq = {self.min_freq!r}, "
                             f"got {self.max_freq!r}")

    @property
    def baseline(self) -> float:
        """0.5: predicting 0 scores E[sin^2] = 1/2 over a uniform phase."""
        return 0.5

    def _sample(self, rng: np.random.Generator, batch_size: int,
                rows: slice | None = None) -> Batch:
        # The draw is most of the cost (T*B normals) and is the whole batch's for any rows.
        T, rows = self.seq_len, slice(None) if rows is None else rows
        omega = rng.uniform(self.min_freq, self.max_freq, size=batch_size)[rows]  # (B,)
        phase = rng.uniform(0.0, 2.0 * np.pi, size=batch_size)[rows]  # (B,)
        noise = rng.standard_normal((T, batch_size))[:, rows]  # (T, B)
        clean = np.sin(omega * np.arange(T + 1)[:, None] + phase)  # (T+1, B)
        xs = clean[:-1] + self.noise * noise
        return Batch(jnp.asarray(xs[:, :, None], self.dtype),
                     jnp.asarray(clean[1:, :, None], self.dtype))


@dataclasses.dataclass(frozen=True, kw_only=True)
class AddingTask(_SampledTask):
    """The adding problem (Hochreiter & Schmidhuber 1997).

    Inputs ``xs (T, B, 2)``: channel 0 holds values drawn from U(0, 1); channel 1
    is a marker, 1 at exactly two steps (one in ``[0, T//2)``, one in
    ``[T//2, T)``) and 0 elsewhere. The answer is the sum of the two marked
    values, asked only at the last step: ``targets (T, B, 1)`` holds it at
    ``targets[-1]`` and zeros before. ``last_step_only`` is True: the loss
    (``"mse"``) must be computed on ``ys[-1:]`` and ``targets[-1:]`` only.
    Answering 1 always scores ``ADDING_BASELINE`` = 1/6.

    Args:
        seq_len: T >= 2.
        seed, batch_size, eval_size, dtype: as in every sampled task.
    """

    name: ClassVar[str] = "adding"
    loss: ClassVar[str] = "mse"
    last_step_only: ClassVar[bool] = True
    input_size: ClassVar[int] = 2
    output_size: ClassVar[int] = 1
    min_seq_len: ClassVar[int] = 2

    @property
    def baseline(self) -> float:
        """``ADDING_BASELINE`` = 1/6, the MSE of always answering 1."""
        return ADDING_BASELINE

    def _sample(self, rng: np.random.Generator, batch_size: int,
                rows: slice | None = None) -> Batch:
        # The draw (T*B uniforms) is the whole batch's for any rows; only they are built.
        T, rows = self.seq_len, slice(None) if rows is None else rows
        values = rng.uniform(0.0, 1.0, size=(T, batch_size))[:, rows]
        first = rng.integers(0, T // 2, size=batch_size)[rows]  # a step in the first half
        second = rng.integers(T // 2, T, size=batch_size)[rows]  # a step in the second half
        B = values.shape[1]
        cols = np.arange(B)
        marker = np.zeros((T, B))
        marker[first, cols] = 1.0
        marker[second, cols] = 1.0
        targets = np.zeros((T, B, 1))
        targets[-1, :, 0] = values[first, cols] + values[second, cols]
        xs = np.stack([values, marker], axis=-1)  # (T, B, 2)
        return Batch(jnp.asarray(xs, self.dtype), jnp.asarray(targets, self.dtype))


LAG_BASELINE = 5.0 / 64.0
"""MSE of the best prediction that ignores the inputs on the lag task (t1 != t2):
the constant E[y] = 0.625, scoring Var[y] = 0.5^2/4 + 0.25^2/4 = 5/64 = 0.078125.
Predicting from x_{t-t1} alone scores ``LAG_T1_ONLY`` = 0.25^2/4 = 1/64; using both
lags, 0."""

LAG_T1_ONLY = 1.0 / 64.0
"""MSE on the lag task of the best prediction from x_{t-t1} alone (0.015625)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LagTask(_SampledTask):
    r"""The streamed lag task of Marschall, Cho & Savin 2020 (JMLR 21), Sec. 5.

    One endless stream per batch row (their ``Add_Task``, ``omarschall/vanilla-rtrl``
    ``gen_data/Add_Task.py``, after Pitis 2016):

    .. math::
        x_t \sim \mathrm{Bernoulli}(1/2), \qquad
        y_t = 0.5 + 0.5\, x_{t-t_1} - 0.25\, x_{t-t_2}

    with :math:`x_t = 0` for :math:`t < 0` (nothing comes before the stream starts).
    As theirs, the input has two channels, ``[x_t, 1 - x_t]``. Their main script
    uses the deterministic labels (``y_t`` itself, a probability) under a softmax
    over two outputs with cross-entropy against ``[y_t, 1 - y_t]``; the library's
    ``xent`` takes integer classes only, so here the model has one output scored
    by ``"mse"`` against ``y_t`` (the same minimiser: the prediction ``y_t``).

    Batch ``step`` holds steps ``[step*T, (step+1)*T)`` of every row's stream, so
    consecutive batches continue the streams (``stream = True``: an online run
    carries its state across batches). Stream ``b``'s inputs over the steps
    ``[k*T, (k+1)*T)`` are drawn from a generator seeded by ``(seed, 0, k)``: any
    batch is a pure function of ``(seed, step)``. The held-out batch is the first
    ``seq_len`` steps of ``eval_size`` other streams (seeded by ``(seed, 1, k)``).

    ``baseline`` is ``LAG_BASELINE`` = 5/64, the MSE of the best constant (0.625);
    ``LAG_T1_ONLY`` = 1/64 is the MSE of a model that learned the ``t1`` lag only
    (under their soft-label cross-entropy the same three levels are 0.66, 0.52 and
    0.45 nats; their ``main.py`` plots lines at 0.66 and 0.45).

    Batches: ``xs (T, B, 2)``, ``targets (T, B, 1)``.

    Args:
        t1, t2: the two lags, integers >= 1 (default 5 and 9, as their main script's
            ``Add_Task(5, 9, deterministic=True)``).
        seed, batch_size, seq_len, eval_size, dtype: as in every sampled task.
    """

    name: ClassVar[str] = "lag"
    loss: ClassVar[str] = "mse"
    stream: ClassVar[bool] = True
    input_size: ClassVar[int] = 2
    output_size: ClassVar[int] = 1

    t1: int = 5
    t2: int = 9

    def __post_init__(self):
        super().__post_init__()
        _check_int("t1", self.t1, 1)
        _check_int("t2", self.t2, 1)

    @property
    def baseline(self) -> float:
        """``LAG_BASELINE`` = 5/64 (t1 != t2): the MSE of always answering 0.625."""
        if self.t1 == self.t2:  # y = 0.5 + 0.25 x: Var = 0.25^2 / 4
            return 1.0 / 64.0
        return LAG_BASELINE

    def _inputs(self, stream: int, start: int, stop: int, batch_size: int) -> np.ndarray:
        """x over the steps ``[start, stop)`` of ``batch_size`` streams, (stop-start, B)
        float64 zeros and ones; 0 at steps < 0."""
        T = self.seq_len
        first, last = max(start, 0) // T, max(stop - 1, 0) // T
        blocks = [self._rng(stream, k).integers(0, 2, size=(T, batch_size))
                  for k in range(first, last + 1)]
        xs = np.concatenate(blocks).astype(np.float64)  # steps [first*T, (last+1)*T)
        lead = max(0, -start)  # steps before the stream starts
        xs = xs[max(start, 0) - first * T: stop - first * T]
        return np.concatenate([np.zeros((lead, batch_size)), xs])[:stop - start]

    def _stream_batch(self, stream: int, step: int, batch_size: int,
                      rows: slice | None = None) -> Batch:
        T, lag = self.seq_len, max(self.t1, self.t2)
        start = step * T
        x = self._inputs(stream, start - lag, start + T, batch_size)  # (lag + T, B)
        x = x if rows is None else x[:, rows]
        now = x[lag:]  # x_t for t in [start, start + T)
        y = 0.5 + 0.5 * x[lag - self.t1: lag - self.t1 + T] - 0.25 * x[lag - self.t2: lag - self.t2 + T]
        xs = np.stack([now, 1.0 - now], axis=-1)  # (T, B, 2): [x, 1 - x] as theirs
        return Batch(jnp.asarray(xs, self.dtype), jnp.asarray(y[:, :, None], self.dtype))

    def batch(self, step: int, part: tuple[int, int] | None = None) -> Batch:
        """Steps ``[step*T, (step+1)*T)`` of the training streams (see the class).

        Args:
            step: an integer >= 0.
            part: ``(i, n)``: only the streams ``[i*B/n, (i+1)*B/n)``; None: all.
        """
        _check_int("step", step, 0)
        rows = None if part is None else check_part(part, self.batch_size)
        return self._stream_batch(_TRAIN_STREAM, int(step), self.batch_size, rows)

    def eval_batch(self) -> Batch:
        """The first ``seq_len`` steps of ``eval_size`` held-out streams."""
        return self._stream_batch(_EVAL_STREAM, 0, self.eval_size)


class _Corpus(NamedTuple):
    """A text, its vocabulary and its train / held-out split, as character ids."""

    source: str  # the path, or "pydoc_data.topics"
    vocab: str  # the sorted distinct characters
    codepoints: np.ndarray  # (V,) uint32, sorted: the code points of ``vocab``
    train_ids: np.ndarray  # (N_train,) int32
    eval_ids: np.ndarray  # (N_eval,) int32


def _default_text() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ValueError("text_path is None but this Python installation lacks pydoc_data "
                         "(the default text): give text_path") from None
    return "".join(topics[k] for k in sorted(topics))


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"text file not found: {path}")
    if p.is_dir():
        raise ValueError(f"text_path must name a text file, got a directory: {path}")
    if not p.is_file():  # a device (/dev/null), a pipe, a socket
        raise ValueError(f"text_path must name a regular text file, got a special file "
                         f"(a device, pipe or socket): {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {path} is not UTF-8 text: {e.reason} at byte {e.start}"
                         ) from None
    except OSError as e:
        raise ValueError(f"cannot read text file {path}: {e.strerror or e}") from None
    if not text:
        raise ValueError(f"text file {path} is empty")
    return text


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _encode(text: str) -> tuple[np.ndarray, np.ndarray]:
    """``(vocab_cps, ids)``: the sorted distinct code points and each character's rank
    among them, int32.

    By a lookup table over every possible code point (0x110000 of them: 4.4 MB of
    ranks), filled and read a chunk at a time, not ``np.unique`` and
    ``np.searchsorted``, which sort a copy of the text and return int64 ranks.
    """
    cps = _codepoints(text)  # 4 bytes a character
    chunks = range(0, len(cps), _CHUNK)  # numpy indexes with an int64 copy: a chunk at a time
    present = np.zeros(0x110000, bool)
    for i in chunks:
        present[cps[i:i + _CHUNK]] = True
    vocab_cps = np.flatnonzero(present).astype(np.uint32)  # sorted, as np.unique's
    rank = np.zeros(present.shape, np.int32)
    rank[vocab_cps] = np.arange(len(vocab_cps), dtype=np.int32)
    ids = np.empty(len(cps), np.int32)  # 4 bytes a character
    for i in chunks:
        ids[i:i + _CHUNK] = rank[cps[i:i + _CHUNK]]
    return vocab_cps, ids


_CHUNK = 1 << 20  # characters per chunk of _encode's indexing: 8 MB of int64 indices


@dataclasses.dataclass(frozen=True, kw_only=True)
class CharLMTask(_SampledTask):
    """A character language model: predict each next character of a text.

    The vocabulary is the sorted set of the text's characters. The last
    ``eval_fraction`` of the text is held out; training batches are random
    windows of ``seq_len + 1`` characters from the rest, ``xs (T, B, V)`` the
    one-hot encoding of a window's first T characters and ``targets (T, B)``
    the integer ids of its last T (loss ``"xent"``, in nats; ``bits_per_char``
    converts). The held-out batch is the first ``eval_size`` consecutive,
    non-overlapping windows of the held-out text (fewer if it is shorter).

    Args:
        text_path: a UTF-8 text file; None (the default) uses the English
            documentation every Python installation ships, ``pydoc_data.topics``
            (its values joined in sorted-key order, ~465k characters).
        eval_fraction: the held-out fraction of the text, in (0, 1).
        seed, batch_size, seq_len, eval_size, dtype: as in every sampled task.

    Raises:
        ValueError: a missing, unreadable, non-UTF-8 or empty file, or a
            ``seq_len`` too long for the training or held-out text.
    """

    name: ClassVar[str] = "charlm"
    loss: ClassVar[str] = "xent"

    text_path: str | None = None
    seq_len: int = 64
    eval_size: int = 256
    eval_fraction: float = 0.1
    _corpus: _Corpus = dataclasses.field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self):
        super().__post_init__()
        _check_real("eval_fraction", self.eval_fraction, minimum=0.0, strict=True, maximum=1.0)
        if self.text_path is None:
            text, source = _default_text(), "pydoc_data.topics"
        else:
            if not isinstance(self.text_path, (str, os.PathLike)):
                raise TypeError(f"text_path must be a path or None, got {self.text_path!r}")
            object.__setattr__(self, "text_path", os.fspath(self.text_path))
            text, source = _read_text(self.text_path), self.text_path
        vocab_cps, ids = _encode(text)  # sorted code points = sorted characters
        del text
        n_eval = max(1, round(len(ids) * self.eval_fraction))
        n_train = len(ids) - n_eval
        window = self.seq_len + 1
        if n_train < window or n_eval < window:
            raise ValueError(
                f"seq_len={self.seq_len} is too long for the text of {source}: a window needs "
                f"seq_len + 1 = {window} characters, but the training part has {n_train} and "
                f"the held-out part {n_eval} (of {len(ids)} characters)")
        train_ids, eval_ids = ids[:n_train], ids[n_train:]
        for a in (vocab_cps, train_ids, eval_ids):
            a.flags.writeable = False
        vocab = vocab_cps.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")
        object.__setattr__(self, "_corpus", _Corpus(source, vocab, vocab_cps, train_ids, eval_ids))

    # --- the text ---------------------------------------------------------------
    @property
    def vocab(self) -> str:
        """The vocabulary: the text's distinct characters, sorted; id i is ``vocab[i]``."""
        return self._corpus.vocab

    @property
    def vocab_size(self) -> int:
        """V, the number of distinct characters."""
        return len(self._corpus.vocab)

    @property
    def input_size(self) -> int:
        return self.vocab_size

    @property
    def output_size(self) -> int:
        return self.vocab_size

    @property
    def source(self) -> str:
        """Where the text came from: the path, or ``"pydoc_data.topics"``."""
        return self._corpus.source

    @property
    def train_ids(self) -> np.ndarray:
        """The training part of the text as ids, (N_train,) int32, read-only."""
        return self._corpus.train_ids

    @property
    def eval_ids(self) -> np.ndarray:
        """The held-out part (the end of the text) as ids, (N_eval,) int32, read-only."""
        return self._corpus.eval_ids

    def encode(self, text: str) -> np.ndarray:
        """Characters -> ids, (len(text),) int32.

        Raises:
            ValueError: ``text`` has characters outside the vocabulary (named).
        """
        cps = _codepoints(text)
        vocab = self._corpus.codepoints
        ids = np.minimum(np.searchsorted(vocab, cps), len(vocab) - 1)
        unknown = vocab[ids] != cps
        if np.any(unknown):
            chars = sorted({chr(c) for c in cps[unknown]})
            raise ValueError(f"text has {len(chars)} character(s) outside the vocabulary: "
                             f"{''.join(chars[:20])!r}")
        return ids.astype(np.int32)

    def decode(self, ids) -> str:
        """Ids, (N,) integers in ``[0, vocab_size)`` -> the string of their characters.

        Raises:
            ValueError: ``ids`` is not one-dimensional or holds an id out of range.
            TypeError: ``ids`` is not an integer array.
        """
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"ids must have shape (N,), got shape {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, vocab_size={self.vocab_size}), "
                             f"got values in [{ids.min()}, {ids.max()}]")
        vocab = self._corpus.vocab
        return "".join(vocab[i] for i in ids.tolist())

    def unigram_entropy_bits(self) -> float:
        """The entropy of the training text's character frequencies, in bits per character.

        A model that predicts every character from the frequencies alone scores
        about this; one that learned something from the context scores well below.
        """
        counts = np.bincount(self.train_ids, minlength=self.vocab_size)
        p = counts[counts > 0] / counts.sum()
        return float(-np.sum(p * np.log2(p)))

    @property
    def baseline(self) -> float:
        """The training text's unigram entropy in nats (the loss's unit)."""
        return self.unigram_entropy_bits() * math.log(2)

    # --- batches ----------------------------------------------------------------
    def _windows(self, ids: np.ndarray) -> Batch:
        """(T+1, B) windows of ids -> one-hot ``xs (T, B, V)``, ``targets (T, B)`` int32."""
        xs = jax.nn.one_hot(jnp.asarray(ids[:-1]), self.vocab_size, dtype=self.dtype)
        return Batch(xs, jnp.asarray(ids[1:], jnp.int32))

    def _sample(self, rng: np.random.Generator, batch_size: int,
                rows: slice | None = None) -> Batch:
        T = self.seq_len
        # window [s, s + T] lies inside the training part for s in [0, N_train - T - 1];
        # the draw is B integers, the one-hot windows (T, B, V) the cost: built for rows only
        starts = rng.integers(0, len(self.train_ids) - T, size=batch_size)  # (B,)
        starts = starts if rows is None else starts[rows]
        return self._windows(self.train_ids[np.arange(T + 1)[:, None] + starts])

    def eval_batch(self) -> Batch:
        """The first ``eval_size`` consecutive windows of the held-out text.

        Window i covers held-out characters ``[i*T, (i+1)*T]``, so the held-out
        targets are scored each once (the last ``(N_eval - 1) % T`` are left out).
        """
        T = self.seq_len
        n = min(self.eval_size, (len(self.eval_ids) - 1) // T)
        return self._windows(self.eval_ids[np.arange(T + 1)[:, None] + T * np.arange(n)])


TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (ExampleTask, SineTask, AddingTask, LagTask, CharLMTask)}


def make_task(name: str, **kwargs) -> Task:
    """The task called ``name``, built with ``kwargs``.

    Args:
        name: ``"example"``, ``"sine"``, ``"adding"``, ``"lag"`` or ``"charlm"``.
        **kwargs: the task's arguments (e.g. ``seed``, ``batch_size``, ``seq_len``).

    Raises:
        ValueError: an unknown name, an argument the task does not take, or a bad
            value (the message names the argument).
    """
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    cls = TASKS[name]
    accepted = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"task {name!r} takes no argument(s) {', '.join(unknown)}; "
                         f"its arguments are {', '.join(accepted)}")
    return cls(**kwargs)
