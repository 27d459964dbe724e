"""Issue #23 in the run application: ``jaxrnn train --method NAME --online-every K``.

* an online run on a stream task (``--task lag``) carries the network's and the
  estimator's state from batch to batch, holds it in its checkpoints, and a run
  stopped and resumed logs exactly the losses of an uninterrupted one (UORO: its
  random draws too);
* on a task of independent sequences each batch starts afresh (no state in the
  checkpoints); the rows count the updates;
* the refusals: one line, exit status 2, nothing written; ``--resume`` refuses a
  contradicting ``--online-every``;
* ``--cell leaky --alpha``; the command's names come from the library's.
"""

import json

import jax
import numpy as np
import pytest

from jaxrnn import Leaky, extend
from jaxrnn_app import checkpoint as ckpt
from jaxrnn_app import runner
from jaxrnn_app.cli import CELL_NAMES, TRAIN_METHODS, main

LAG = ["--task", "lag", "--hidden", "3", "--batch", "2", "--seq-len", "6", "--log-every", "1",
       "--eval-every", "0", "--checkpoint-every", "2", "--no-progress"]
ONLINE = [*LAG, "--method", "uoro", "--online-every", "4"]


def losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    return [r["step"] for r in rows], [r["loss"] for r in rows], rows


def restore(out):
    """The run's latest checkpoint, read as ``jaxrnn sample`` reads one."""
    cfg = runner.read_config(out)
    task = runner.build_task(cfg)
    model, params = runner.build_model(cfg, task)
    optimizer = runner.build_optimizer(cfg)
    init = runner.make_online(cfg, task, model, optimizer).init
    like = ckpt.CheckpointState(params, runner.initial_opt_state(cfg, task, optimizer, params, init),
                                0, jax.random.key(0), 0, runner.checkpoint_metadata(cfg))
    return ckpt.restore(out / "checkpoints", like)


def test_an_online_stream_run_resumed_logs_the_uninterrupted_losses(tmp_path, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["train", *ONLINE, "--steps", "4", "--out", str(whole)]) == 0
    assert main(["train", *ONLINE, "--steps", "2", "--out", str(parts)]) == 0
    assert main(["train", "--resume", "--out", str(parts), "--steps", "4", "--no-progress"]) == 0
    assert "online every 4 steps" in capsys.readouterr().out
    steps, expected, rows = losses(whole)
    assert steps == [1, 2, 3, 4] and losses(parts)[:2] == (steps, expected)
    assert all(r["updates"] == 2 for r in rows)  # 6 steps: a chunk of 4, one of 2
    config = json.loads((parts / "config.json").read_text())
    assert config["online_every"] == 4 and config["method"] == "uoro"
    assert config["alpha"] == Leaky().alpha  # lag's default cell, its leak recorded

    # the checkpoint holds the stream's place: 4 batches of 6 steps, a running state
    online = restore(parts).opt_state.online
    assert int(online.step) == 24 and float(np.abs(np.asarray(online.state)).max()) > 0

    # --resume refuses a contradiction: given, or between config.json and the checkpoint
    assert main(["train", "--resume", "--out", str(parts), "--steps", "5",
                 "--online-every", "3"]) == 2
    err = capsys.readouterr().err
    assert "--online-every 3 (the run has 4)" in err and err.count("\n") == 1
    (parts / "config.json").write_text(json.dumps({**config, "online_every": 2}))
    assert main(["train", "--resume", "--out", str(parts), "--steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "--online-every 4 in the checkpoint, 2 in config.json" in err and err.count("\n") == 1
    assert losses(parts)[0] == [1, 2, 3, 4]  # nothing changed


def test_independent_sequences_start_afresh_each_batch(tmp_path):
    out = tmp_path / "r"
    args = ["--task", "sine", "--cell", "gru", "--layers", "2", "--hidden", "3", "--batch",
            "2", "--seq-len", "10", "--log-every", "1", "--eval-every", "0", "--no-progress"]
    assert main(["train", *args, "--method", "rtrl", "--online-every", "3", "--steps", "2",
                 "--out", str(out)]) == 0
    steps, values, rows = losses(out)
    assert steps == [1, 2] and all(np.isfinite(values))
    assert [r["updates"] for r in rows] == [4, 4]  # 3 + 3 + 3 + 1 steps
    assert restore(out).opt_state.online is None  # nothing of the stream to keep


def test_a_stochastic_estimator_one_update_per_batch_resumes_exactly(tmp_path):
    """--method kf_rtrl without --online-every: make_train_step, its draws from the run's
    key folded with the step."""
    args = ["--task", "sine", "--cell", "leaky", "--hidden", "3", "--batch", "2", "--seq-len",
            "5", "--log-every", "1", "--eval-every", "0", "--no-progress", "--method", "kf_rtrl"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["train", *args, "--steps", "2", "--out", str(whole)]) == 0
    assert main(["train", *args, "--steps", "1", "--out", str(parts)]) == 0
    assert main(["train", "--resume", "--out", str(parts), "--steps", "2", "--no-progress"]) == 0
    assert losses(parts)[:2] == losses(whole)[:2] and losses(whole)[0] == [1, 2]
    assert "updates" not in losses(whole)[2][0]


BASE = ["train", "--task", "sine", "--cell", "elman", "--hidden", "3", "--steps", "2",
        "--no-progress"]


@pytest.mark.parametrize("args, match", [
    (["--online-every", "2"], "--online-every updates while the sequence runs, which needs a "
                              "forward-in-time --method (rtrl, snap1"),
    (["--method", "autodiff", "--online-every", "2"], "--method autodiff has its gradient "
                                                      "only at the sequence's end"),
    (["--method", "rtrl", "--online-every", "2", "--bidirectional"],
     "--method 'rtrl' runs forward in time: --bidirectional is not supported"),
    (["--method", "snap1", "--online-every", "2", "--task", "adding"],
     "--online-every need a loss at every step; task 'adding' scores only the last step"),
    (["--method", "rflo", "--online-every", "2", "--devices", "2"],
     "--online-every runs on one device"),
    (["--method", "rtrl", "--online-every", "2", "--k1", "3"],
     "truncated BPTT (--k1/--k2) is not supported"),
    (["--alpha", "0.3"], "--alpha is the leaky cell's leak: it needs --cell leaky, got --cell "
                         "elman"),
])
def test_online_and_alpha_refusals_exit_2(tmp_path, capsys, args, match):
    out = tmp_path / "r"
    assert main([*BASE, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("args, match", [
    (["--online-every", "0"], "argument --online-every: expected an integer >= 1, got 0"),
    (["--alpha", "0"], "argument --alpha: expected a number in (0, 1], got 0"),
    (["--alpha", "1.5"], "argument --alpha: expected a number in (0, 1], got 1.5"),
])
def test_bad_values_exit_2(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as e:
        main([*BASE, *args, "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_leaky_alpha_builds_the_cell_and_is_recorded():
    cfg = runner.build_config(task="lag", alpha=0.25, hidden=3)
    assert (cfg.cell, cfg.alpha) == ("leaky", 0.25)
    model = runner.make_model(cfg, runner.build_task(cfg))
    assert model.cell_fn == Leaky(alpha=0.25)
    assert runner.checkpoint_metadata(cfg)["model"]["alpha"] == 0.25
    other = runner.build_config(task="sine", cell="gru")
    assert other.alpha is None and "alpha" not in runner.checkpoint_metadata(other)["model"]


def test_the_command_s_names_are_the_library_s():
    assert TRAIN_METHODS == extend.TRAIN_METHODS
    assert sorted(CELL_NAMES) == sorted(extend.CELLS) and "leaky" in CELL_NAMES
    assert runner.ESTIMATOR_METHODS == tuple(m for m in extend.TRAIN_METHODS
                                             if m not in extend.METHODS)
