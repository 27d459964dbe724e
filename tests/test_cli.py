"""The jaxrnn command line: explain, train, gradcheck; exit statuses and messages."""

import json
import os
import subprocess
import sys

import pytest

from jaxrnn_app.cli import main
from test_reference import BACKWARD, FORWARD, GRADS, UPDATED


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "jaxrnn_app", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


def test_explain_prints_every_number_of_the_example(capsys):
    assert main(["explain"]) == 0
    out = capsys.readouterr().out
    expected = ["L = 0.1940"]
    for row in FORWARD.values():
        expected += list(row)
    for row in BACKWARD.values():
        expected += [v for v in row if v is not None]
    expected += [f"dW_xh = {GRADS['W_xh']}", f"dW_hh = {GRADS['W_hh']}",
                 f"dW_hy = {GRADS['W_hy']}"]
    expected += [f"= {v}" for v in UPDATED.values()]
    for s in expected:
        assert s in out, s


def test_explain_on_other_inputs(capsys):
    assert main(["explain", "--x", "1,-1", "--targets", "0.2,0.1", "--w-hh", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "t = 1 -> 2" in out and "t = 2 -> 1" in out


def test_explain_bad_targets_exit_2(capsys):
    assert main(["explain", "--x", "1,2,3", "--targets", "1,2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--targets needs one value per input" in err


def test_python_dash_m_entry_point_and_usage_error():
    r = run_cli("explain")
    assert r.returncode == 0 and "-0.48930" in r.stdout
    r = run_cli("explain", "--x", "a,b")
    assert r.returncode == 2 and "expected comma-separated numbers" in r.stderr
    assert "Traceback" not in r.stderr


def test_train_default_task_writes_its_outputs(tmp_path, capsys):
    """`jaxrnn train` with no options trains the reference example to a near-zero loss."""
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "reached --target-loss" in text
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "example" and config["method"] == "bptt"
    assert config["reference_model"] is True
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] <= 1e-4 < rows[0]["loss"]
    assert [r["step"] for r in rows[:-1]] == list(range(10, 10 * len(rows) - 9, 10))
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoints").is_dir()


def test_train_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    assert main(["train", "--out", str(out), "--steps", "3", "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == "precious\n"


@pytest.mark.parametrize("args, match", [
    (["--optimizer", "nosuchopt"], "--optimizer must name an optax optimizer"),
    (["--steps", "-3"], "expected an integer >= 1"),
    (["--lr", "0"], "expected a number > 0"),
    (["--task", "nosuchtask"], "invalid choice"),
    (["--method", "nosuchmethod"], "invalid choice"),
])
def test_train_bad_input_exit_2(args, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sys.exit(main(["train", "--out", str(tmp_path / "r"), "--no-progress", *args]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, match", [
    (["--compute-dtype", "float64"], "argument --compute-dtype: invalid choice: 'float64'"),
    (["--compute-dtype", "bf16"], "argument --compute-dtype: invalid choice: 'bf16'"),
    (["--compute-dtype", "bfloat16", "--task", "sine", "--cell", "elman", "--method", "rtrl"],
     "--compute-dtype bfloat16 is not supported with --method rtrl"),
])
def test_train_compute_dtype_refusals_exit_2(args, match, tmp_path, capsys):
    """A bad --compute-dtype, or one with RTRL (float32 only): one line, exit status 2,
    no traceback, nothing written."""
    with pytest.raises(SystemExit) as e:
        sys.exit(main(["train", "--out", str(tmp_path / "r"), "--no-progress", *args]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxrnn train: error: ") and err.count("\n") == 1, err
    assert match in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, match", [
    (["--lr", "inf"], "argument --lr: expected a finite number, got inf"),
    (["--forget-bias", "nan"], "argument --forget-bias: expected a finite number, got nan"),
    (["--forget-bias=-inf"], "argument --forget-bias: expected a finite number, got -inf"),
    (["--target-loss", "nan"], "argument --target-loss: expected a finite number, got nan"),
    (["--task", "sine", "--schedule", "cosine", "--warmup", "5"],
     "--warmup 5 applies to --schedule warmup-cosine only (--schedule cosine has no warm-up)"),
    (["--task", "sine", "--warmup", "5"], "(--schedule constant has no warm-up)"),
    (["--task", "sine", "--dropout", "0.2"],
     "--dropout 0.2 acts between stacked layers, and --layers 1 has none"),
])
def test_train_options_that_would_do_nothing_or_nonsense_exit_2(args, match, tmp_path, capsys):
    """Non-finite values, and options this run would silently ignore: one line, exit 2,
    nothing written (#22's minor list)."""
    with pytest.raises(SystemExit) as e:  # argparse's refusals exit from inside main
        sys.exit(main(["train", "--out", str(tmp_path / "r"), "--no-progress", *args]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def test_gradcheck_passes(capsys):
    assert main(["gradcheck", "--trials", "2", "--max-seq-len", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "all 2 configurations agree" in out
    assert sum(line.endswith("| ok |") for line in out.splitlines()) == 2


def test_gradcheck_reports_a_wrong_backward(monkeypatch, capsys):
    from jaxrnn._src.cells import Elman

    original = Elman.backward_step

    def wrong(self, params, carry_prev, carry, res, dcarry):
        (dh_prev,), dgi, dgh = original(self, params, carry_prev, carry, res, dcarry)
        return (0.9 * dh_prev,), dgi, dgh  # drops 10% of the gradient through time

    monkeypatch.setattr(Elman, "backward_step", wrong)
    assert main(["gradcheck", "--cell", "elman", "--trials", "1", "--seq-len", "6",
                 "--no-progress"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradcheck_catches_a_wrong_gated_backward(cell, monkeypatch, capsys):
    from jaxrnn._src.cells import GRU, LSTM

    cls = {"lstm": LSTM, "gru": GRU}[cell]
    original = cls.backward_step

    def wrong(self, params, carry_prev, carry, res, dcarry):
        dprev, dgi, dgh = original(self, params, carry_prev, carry, res, dcarry)
        return dprev, 1.001 * dgi, 1.001 * dgh  # a 0.1% error in the gate cotangents

    monkeypatch.setattr(cls, "backward_step", wrong)
    args = ["gradcheck", "--cell", cell, "--trials", "1", "--seq-len", "6", "--hidden", "3",
            "--no-progress", "--loss", "half_sse"]
    assert main(args) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_gradcheck_fixed_settings(capsys):
    args = ["gradcheck", "--cell", "gru", "--trials", "1", "--seq-len", "9", "--hidden", "5",
            "--layers", "2", "--bidirectional", "--no-progress"]
    assert main(args) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.endswith("| ok |")]
    assert len(rows) == 1
    for r in rows:
        cells = [c.strip() for c in r.split("|")]
        assert cells[2] == "gru" and cells[4] == "2" and cells[5] == "2"
        assert cells[7] == "9" and cells[10] == "5"


def test_gradcheck_bad_combination_exit_2(capsys):
    assert main(["gradcheck", "--loss", "xent", "--output-size", "1"]) == 2
    assert "needs output_size >= 2" in capsys.readouterr().err
