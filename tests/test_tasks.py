"""Tasks: determinism of batch(step), shapes, the adding baseline, the char LM split, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrnn._src import losses
from jaxrnn._src.model import RNN
from jaxrnn_app.tasks import (ADDING_BASELINE, LAG_BASELINE, LAG_T1_ONLY, TASKS, AddingTask,
                              CharLMTask, ExampleTask, LagTask, SineTask, bits_per_char, make_task,
                              reference_example)

TRAIN_TEXT = "ab" * 450  # 900 characters: the first 90% of the text
HELD_OUT_TEXT = "0123456789" * 10  # 100 characters: the last 10%, no character in common


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TRAIN_TEXT + HELD_OUT_TEXT, encoding="utf-8")
    return path


def small(name, **kw):
    """A small task of each kind (charlm on the default text)."""
    sizes = {} if name == "example" else dict(batch_size=4, seq_len=6, eval_size=3)
    return make_task(name, **{**sizes, **kw})


def arrays_equal(a, b) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype
            and bool(np.array_equal(np.asarray(a), np.asarray(b))))


# --- the common interface ------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TASKS))
def test_shapes_dtypes_and_static_facts(name):
    task = small(name)
    assert task.name == name and task.loss in losses.LOSSES
    for batch, B in ((task.batch(0), getattr(task, "batch_size", 1)),
                     (task.eval_batch(), getattr(task, "eval_size", 1))):
        T = batch.xs.shape[0]
        assert batch.xs.shape == (T, B, task.input_size)
        assert batch.xs.dtype == jnp.float32
        if task.loss == "xent":
            assert batch.targets.shape == (T, B) and batch.targets.dtype == jnp.int32
            assert int(batch.targets.min()) >= 0 and int(batch.targets.max()) < task.output_size
        else:
            assert batch.targets.shape == (T, B, task.output_size)
            assert batch.targets.dtype == jnp.float32
        assert batch.lengths is None


@pytest.mark.parametrize("name", sorted(TASKS))
def test_batches_fit_the_model_and_its_loss(name):
    """Each task's batches pass the model's checks and give a finite loss."""
    task = small(name)
    model = RNN(cell="elman", input_size=task.input_size, hidden_size=5,
                output_size=task.output_size)
    params = model.init(jax.random.key(0))
    batch = task.batch(0)
    ys, _ = model.apply(params, batch.xs)
    targets = batch.targets
    if task.last_step_only:
        ys, targets = ys[-1:], targets[-1:]
    model.check_targets(ys.shape, targets, task.loss)
    value = losses.get_loss(task.loss)(ys, targets)
    assert np.isfinite(float(value)) and float(value) > 0


@pytest.mark.parametrize("name", ["sine", "adding", "lag", "charlm"])
def test_batch_is_a_pure_function_of_seed_and_step(name):
    task, again = small(name, seed=3), small(name, seed=3)
    for step in (0, 1, 17):
        a, b = task.batch(step), again.batch(step)
        assert arrays_equal(a.xs, b.xs) and arrays_equal(a.targets, b.targets)
    assert not arrays_equal(task.batch(0).xs, task.batch(1).xs)
    assert not arrays_equal(task.batch(0).xs, small(name, seed=4).batch(0).xs)
    assert arrays_equal(task.eval_batch().xs, again.eval_batch().xs)
    # the held-out batch comes from a stream no training step uses
    e = task.eval_batch().xs[:, :1]
    assert all(not arrays_equal(e, task.batch(s).xs[:, :1]) for s in range(5))


def test_batches_resume_at_start():
    task = small("sine", seed=1)
    it = task.batches(start=5)
    for step in (5, 6, 7):
        assert arrays_equal(next(it).xs, task.batch(step).xs)


def test_numpy_integer_steps_and_dtype_argument():
    task = small("adding", dtype="float64")
    assert task.batch(np.int64(2)).xs.dtype == jnp.float64
    assert arrays_equal(task.batch(np.int64(2)).xs, task.batch(2).xs)
    assert make_task("sine", dtype=jnp.float64).dtype == "float64"


def test_tasks_are_hashable_static_configuration():
    assert make_task("sine", seed=1) == make_task("sine", seed=1)
    assert hash(make_task("sine", seed=1)) == hash(make_task("sine", seed=1))
    assert make_task("sine", seed=1) != make_task("sine", seed=2)
    assert len({make_task("adding"), make_task("adding"), make_task("sine")}) == 2


# --- example -------------------------------------------------------------------

def test_example_task_is_the_reference_example():
    task = make_task("example")
    ref = reference_example().batch
    for batch in (task.batch(0), task.batch(9), task.eval_batch()):
        assert arrays_equal(batch.xs, ref.xs) and arrays_equal(batch.targets, ref.targets)
    assert isinstance(task, ExampleTask) and task.loss == "half_sse" and task.baseline is None
    assert float(task.example().lr) == pytest.approx(0.1)


# --- sine ----------------------------------------------------------------------

def test_sine_targets_are_the_clean_next_values_with_one_frequency_per_sequence():
    task = SineTask(batch_size=64, seq_len=40, noise=0.0, min_freq=0.2, max_freq=0.6)
    b = task.batch(0)
    x, t = np.asarray(b.xs[:, :, 0], np.float64), np.asarray(b.targets[:, :, 0], np.float64)
    np.testing.assert_array_equal(x[1:], t[:-1])  # without noise, target_t = x_{t+1}
    # x_{t+1} + x_{t-1} = 2 cos(omega) x_t: recover omega per sequence by least squares
    cos = np.sum((x[2:] + x[:-2]) * x[1:-1], 0) / np.sum(2 * x[1:-1] ** 2, 0)
    omega = np.arccos(np.clip(cos, -1, 1))
    assert np.all(omega > 0.2 - 1e-3) and np.all(omega < 0.6 + 1e-3)
    assert np.std(omega) > 0.05  # the frequency differs between sequences


def test_sine_noise_level_and_baseline():
    clean = SineTask(batch_size=256, seq_len=50, noise=0.0, seed=5).batch(0)
    noisy = SineTask(batch_size=256, seq_len=50, noise=0.3, seed=5).batch(0)
    np.testing.assert_array_equal(clean.targets, noisy.targets)  # same waves, clean targets
    assert float(jnp.std(noisy.xs - clean.xs)) == pytest.approx(0.3, rel=0.05)
    # predicting 0 scores about the baseline E[sin^2] = 1/2
    assert float(jnp.mean(clean.targets ** 2)) == pytest.approx(SineTask().baseline, rel=0.05)


# --- adding --------------------------------------------------------------------

def test_adding_inputs_markers_and_answer():
    T, B = 9, 200
    b = AddingTask(batch_size=B, seq_len=T, seed=2).batch(3)
    values, marker = np.asarray(b.xs[..., 0]), np.asarray(b.xs[..., 1])
    assert np.all((values >= 0) & (values < 1))
    assert set(np.unique(marker)) == {0.0, 1.0}
    assert np.all(marker.sum(0) == 2)
    assert np.all(marker[: T // 2].sum(0) == 1) and np.all(marker[T // 2:].sum(0) == 1)
    np.testing.assert_allclose(b.targets[-1, :, 0], (values * marker).sum(0), rtol=1e-6)
    assert np.all(np.asarray(b.targets[:-1]) == 0)
    assert AddingTask.last_step_only and AddingTask.loss == "mse"


def test_adding_baseline_is_one_sixth():
    assert ADDING_BASELINE == pytest.approx(1 / 6)
    task = AddingTask(batch_size=2000, seq_len=4, seed=0)
    answers = np.concatenate([np.asarray(task.batch(s).targets[-1, :, 0]) for s in range(20)])
    mse_of_one = float(np.mean((answers - 1.0) ** 2))  # 40k answers; std error ~0.8%
    assert mse_of_one == pytest.approx(1 / 6, rel=0.03)
    assert task.baseline == ADDING_BASELINE


# --- lag -----------------------------------------------------------------------

def test_lag_targets_follow_the_formula_on_a_written_out_case():
    """t1=1, t2=2 over the first 6 steps of one stream: y_t = 0.5 + 0.5 x_{t-1} - 0.25 x_{t-2},
    with x = 0 before the stream starts."""
    b = LagTask(batch_size=1, seq_len=6, t1=1, t2=2, seed=5).batch(0)
    assert np.asarray(b.xs[:, 0, 0]).tolist() == [1, 1, 0, 1, 0, 1]
    assert np.asarray(b.xs[:, 0, 1]).tolist() == [0, 0, 1, 0, 1, 0]  # [x, 1 - x] as theirs
    # t=0: 0.5 (no past); t=1: 0.5 + 0.5*1; t=2: 0.5 + 0.5*1 - 0.25*1; t=3: 0.5 + 0 - 0.25*1;
    # t=4: 0.5 + 0.5*1 - 0; t=5: 0.5 + 0 - 0.25*1
    assert np.asarray(b.targets[:, 0, 0]).tolist() == [0.5, 1.0, 0.75, 0.25, 1.0, 0.25]
    assert LagTask.stream and not SineTask.stream and LagTask.loss == "mse"


def test_lag_consecutive_batches_continue_one_stream():
    """Batches 0..4 of T=4 are one stream of 20 steps: its targets follow the formula
    across the batch boundaries (default lags 5 and 9 > T), and a part is its rows."""
    task = LagTask(batch_size=3, seq_len=4, seed=1)
    assert (task.t1, task.t2) == (5, 9)
    batches = [task.batch(k) for k in range(5)]
    x = np.concatenate([np.asarray(b.xs[:, :, 0]) for b in batches])  # (20, 3)
    y = np.concatenate([np.asarray(b.targets[:, :, 0]) for b in batches])
    past = np.concatenate([np.zeros((9, 3)), x])  # x_t = 0 for t < 0
    np.testing.assert_array_equal(y, 0.5 + 0.5 * past[4:24] - 0.25 * past[0:20])
    assert not np.array_equal(x[:, 0], x[:, 1])  # one stream per row
    part = task.batch(2, part=(1, 3))
    np.testing.assert_array_equal(part.xs[:, 0, 0], x[8:12, 1])
    assert task.eval_batch().xs.shape == (4, task.eval_size, 2)


def test_lag_baseline_is_the_variance_of_the_targets():
    assert LAG_BASELINE == 5 / 64 and LAG_T1_ONLY == 1 / 64
    task = LagTask(batch_size=500, seq_len=100, seed=0)
    y = np.asarray(task.batch(1).targets[:, :, 0], np.float64)  # 50k steps, past the start
    assert float(np.mean((y - 0.625) ** 2)) == pytest.approx(task.baseline, rel=0.02)
    assert LagTask(t1=3, t2=3).baseline == 1 / 64


# --- charlm --------------------------------------------------------------------

def test_charlm_vocab_split_and_round_trip(text_file):
    task = CharLMTask(text_path=text_file, batch_size=8, seq_len=5, eval_size=4)
    text = TRAIN_TEXT + HELD_OUT_TEXT
    assert task.vocab == "0123456789ab" and task.input_size == task.output_size == 12
    assert task.decode(task.encode(text)) == text
    np.testing.assert_array_equal(np.concatenate([task.train_ids, task.eval_ids]),
                                  task.encode(text))
    assert task.decode(task.eval_ids) == HELD_OUT_TEXT  # the last 10% is held out
    assert task.source == str(text_file)


def test_charlm_windows_and_held_out_disjoint(text_file):
    task = CharLMTask(text_path=text_file, batch_size=16, seq_len=7, eval_size=100)
    heldout = set(task.encode("0123456789").tolist())
    for step in range(50):
        b = task.batch(step)
        ids = np.asarray(b.xs.argmax(-1))
        np.testing.assert_array_equal(ids[1:], np.asarray(b.targets[:-1]))  # next characters
        assert heldout.isdisjoint(ids.ravel().tolist())
        assert heldout.isdisjoint(np.asarray(b.targets).ravel().tolist())
    e = task.eval_batch()
    assert e.xs.shape == (7, (100 - 1) // 7, 12)  # every non-overlapping held-out window
    windows = [task.decode(np.asarray(e.xs[:, i].argmax(-1))) for i in range(e.xs.shape[1])]
    assert "".join(windows) == HELD_OUT_TEXT[: 7 * len(windows)]
    assert set(np.asarray(e.targets).ravel().tolist()) <= heldout


def test_charlm_unigram_entropy_and_bits(text_file):
    task = CharLMTask(text_path=text_file, seq_len=5)
    assert task.unigram_entropy_bits() == pytest.approx(1.0)  # "ab" repeated: one bit
    assert task.baseline == pytest.approx(math.log(2))
    assert bits_per_char(math.log(2)) == pytest.approx(1.0)
    assert bits_per_char(task.baseline) == pytest.approx(task.unigram_entropy_bits())


def test_charlm_default_text_is_pydoc_topics():
    from pydoc_data.topics import topics
    task = CharLMTask(seq_len=32)
    text = "".join(topics[k] for k in sorted(topics))
    assert task.source == "pydoc_data.topics" and task.vocab == "".join(sorted(set(text)))
    assert len(task.train_ids) + len(task.eval_ids) == len(text)
    assert task.decode(task.eval_ids[:200]) == text[len(task.train_ids):][:200]
    assert 3.5 < task.unigram_entropy_bits() < 6  # English text, ~4.7 bits


def test_charlm_encode_decode_errors(text_file):
    task = CharLMTask(text_path=text_file, seq_len=5)
    with pytest.raises(ValueError, match=r"outside the vocabulary: 'xz'"):
        task.encode("abzx")
    with pytest.raises(ValueError, match=r"ids must lie in \[0, vocab_size=12\)"):
        task.decode([0, 12])
    with pytest.raises(ValueError, match=r"ids must have shape \(N,\)"):
        task.decode(np.zeros((2, 2), int))
    with pytest.raises(TypeError, match="ids must be integers"):
        task.decode([0.5])


def test_charlm_file_errors(tmp_path, text_file):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match=f"text file not found: {missing}"):
        make_task("charlm", text_path=str(missing))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        make_task("charlm", text_path=empty)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1") * 100)
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        make_task("charlm", text_path=latin1)
    with pytest.raises(ValueError, match="got a directory"):
        make_task("charlm", text_path=tmp_path)
    with pytest.raises(ValueError, match=r"must name a regular text file, got a special file "
                                         r"\(a device, pipe or socket\): /dev/null"):
        make_task("charlm", text_path="/dev/null")
    with pytest.raises(ValueError, match=r"seq_len=100 is too long .* seq_len \+ 1 = 101 "
                                         r"characters, but the training part has 900 and the "
                                         r"held-out part 100 \(of 1000 characters\)"):
        make_task("charlm", text_path=text_file, seq_len=100)
    make_task("charlm", text_path=text_file, seq_len=99)  # exactly fits the held-out part


def test_charlm_ids_are_ranks_among_the_sorted_characters(tmp_path):
    """The lookup-table encoding gives each character its rank among the text's sorted
    distinct characters (an independent count here: sorted(set(text))), for 1-, 2-
    and 4-byte characters, across the encoder's chunks."""
    from jaxrnn_app import memory, tasks

    text = ("ab\u00e9\u03bb\U0001f600 z" * 40_000)[:250_000]  # astral: 4-byte str
    path = tmp_path / "mixed.txt"
    path.write_text(text, encoding="utf-8")
    old_chunk, tasks._CHUNK = tasks._CHUNK, 4096  # several chunks on a small text
    try:
        task = make_task("charlm", text_path=path, seq_len=10)
    finally:
        tasks._CHUNK = old_chunk
    vocab = sorted(set(text))
    assert task.vocab == "".join(vocab)
    want = np.array([vocab.index(c) for c in text[:5000]], np.int32)
    np.testing.assert_array_equal(task.train_ids[:5000], want)
    n = len(task.train_ids) + len(task.eval_ids)
    assert n == len(text)
    assert memory._text_bytes(task) == (4 * n, (4 + 4) * n)  # a 4-byte str while loading


# --- make_task and argument errors ---------------------------------------------

@pytest.mark.parametrize("name, kwargs, error, message", [
    ("nope", {}, ValueError, r"task must be one of \['adding', 'charlm', 'example', 'lag', 'sine'\], "
                             r"got 'nope'"),
    ("sine", {"seq_len": -3}, ValueError, r"^seq_len must be an integer >= 1, got -3$"),
    ("sine", {"seq_len": 2.0}, ValueError, r"seq_len must be an integer >= 1, got 2.0"),
    ("adding", {"seq_len": 1}, ValueError, r"seq_len must be an integer >= 2, got 1"),
    ("adding", {"batch_size": 0}, ValueError, r"batch_size must be an integer >= 1, got 0"),
    ("sine", {"seed": -1}, ValueError, r"seed must be an integer >= 0, got -1"),
    ("sine", {"eval_size": True}, ValueError, r"eval_size must be an integer >= 1, got True"),
    ("sine", {"noise": -0.1}, ValueError, r"noise must be a finite number >= 0.0, got -0.1"),
    ("sine", {"min_freq": 0.5, "max_freq": 0.2}, ValueError,
     r"max_freq must be >= min_freq = 0.5, got 0.2"),
    ("charlm", {"eval_fraction": 1.0}, ValueError,
     r"eval_fraction must be a finite number > 0.0 and < 1.0, got 1.0"),
    ("example", {"seq_len": 5}, ValueError,
     r"task 'example' takes no argument\(s\) seq_len; its arguments are dtype"),
    ("lag", {"t2": 0}, ValueError, r"t2 must be an integer >= 1, got 0"),
    ("sine", {"dtype": "int32"}, TypeError, r"dtype must be a floating dtype, got 'int32'"),
])
def test_make_task_errors_name_the_argument(name, kwargs, error, message):
    with pytest.raises(error, match=message):
        make_task(name, **kwargs)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_step_must_be_a_non_negative_integer(name):
    task = small(name)
    with pytest.raises(ValueError, match=r"step must be an integer >= 0, got -1"):
        task.batch(-1)
    with pytest.raises(ValueError, match=r"start must be an integer >= 0, got 1.5"):
        task.batches(1.5)
