"""Training runs: outputs, resume (also after SIGKILL), NaN handling, Ctrl-C, bad input."""

import dataclasses
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxrnn_app import checkpoint as ckpt
from jaxrnn_app import runner
from jaxrnn_app.cli import main

SMALL = dict(task="sine", cell="gru", hidden=8, batch=4, seq_len=12, lr=1e-2, log_every=1,
             eval_every=5, checkpoint_every=5)


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(out)}


def cli(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "jaxrnn_app", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def test_run_writes_its_outputs(tmp_path):
    cfg = runner.build_config(**SMALL, steps=12)
    res = runner.run(cfg, tmp_path / "r", progress=False, log=lambda *a: None)
    out = tmp_path / "r"
    assert res.status == "finished" and res.final_step == 12
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "sine" and config["hidden"] == 8 and "jax" in config["versions"]
    rs = rows(out)
    assert [r["step"] for r in rs] == list(range(1, 13))
    assert all("eval_loss" in r for r in rs if r["step"] % 5 == 0)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert ckpt.latest_step(out / "checkpoints") == 12
    assert res.compile_s > 0


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    full = runner.build_config(**SMALL, steps=20)
    runner.run(full, tmp_path / "a", progress=False, log=lambda *a: None)
    half = runner.build_config(**SMALL, steps=10)
    runner.run(half, tmp_path / "b", progress=False, log=lambda *a: None)
    cont = runner.prepare_resume(tmp_path / "b", {"steps": 20})
    res = runner.run(cont, tmp_path / "b", resume=True, progress=False, log=lambda *a: None)
    assert res.start_step == 10 and res.final_step == 20
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 21))
    assert a == b  # bit-for-bit


def test_resume_of_a_finished_run_needs_more_steps(tmp_path, capsys):
    cfg = runner.build_config(**SMALL, steps=5)
    runner.run(cfg, tmp_path / "r", progress=False, log=lambda *a: None)
    assert main(["train", "--resume", "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    assert "pass a larger --steps" in capsys.readouterr().out
    assert len(rows(tmp_path / "r")) == 5


# A run killed with SIGKILL resuming as an uninterrupted run: tests/test_faults.py
# (killed mid-save, deterministically, which the random-moment kill here was not).


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "r"
    p = cli("train", "--task", "sine", "--hidden", "8", "--batch", "4", "--seq-len", "12",
            "--steps", "100000", "--checkpoint-every", "1000", "--log-every", "1",
            "--no-progress", "--out", str(out))
    deadline = time.time() + 240
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len(rows(out)) >= 5:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert "interrupted at step" in stdout and "--resume" in stdout
    assert "Traceback" not in stderr
    saved = ckpt.latest_step(out / "checkpoints")
    assert saved is not None and saved >= 5 and saved == rows(out)[-1]["step"]


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["train", "--task", "sine", "--hidden", "8", "--batch", "4", "--seq-len", "12",
                 "--optimizer", "sgd", "--lr", "1e30", "--steps", "50", "--log-every", "1",
                 "--checkpoint-every", "1", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "NaN or infinite at step" in err and err.count("\n") == 1
    bad_step = int(err.split("at step ")[1].split(";")[0])
    kept = ckpt.latest_step(out / "checkpoints")
    assert kept is None or kept < bad_step
    assert err.endswith(f"there is no checkpoint yet in {out / 'checkpoints'}\n" if kept is None
                        else f"the last good checkpoint is step {kept} in {out / 'checkpoints'}\n")


@pytest.mark.parametrize("args, match", [
    (["--task", "charlm", "--text", "/no/such/file.txt"], "not found"),
    (["--task", "charlm", "--text", "EMPTY"], "empty"),
    (["--task", "charlm", "--text", "SHORT", "--seq-len", "64"], "--seq-len"),
    (["--task", "nosuchtask"], "invalid choice"),
    (["--cell", "transformer"], "invalid choice"),
    (["--optimizer", "nosuchopt"], "--optimizer must"),
    (["--hidden", "-4"], "expected an integer >= 1"),
    (["--k1", "5", "--k2", "3", "--task", "sine"], "--k2 must be an integer >= --k1 = 5"),
    (["--task", "adding", "--k1", "5"], "truncated BPTT"),
    (["--resume"], "--resume: "),
    (["--devices", "3", "--task", "sine", "--batch", "4"], "devices"),
])
def test_bad_input_exit_2(args, match, tmp_path, capsys):
    (tmp_path / "EMPTY").write_text("")
    (tmp_path / "SHORT").write_text("just a few characters of text\n")
    args = [a.replace("EMPTY", str(tmp_path / "EMPTY")).replace("SHORT", str(tmp_path / "SHORT"))
            for a in args]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        sys.exit(main(["train", "--out", str(out), "--no-progress", "--steps", "2", *args]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert "Traceback" not in err and err.count("\n") <= 2


@pytest.mark.parametrize("given, match", [
    (dict(k1=0), "--k1 must be an integer >= 1, got 0"),
    (dict(k1=4, k2=2), "--k2 must be an integer >= --k1 = 4, got 2"),
    (dict(method="forward"), "--method must be one of"),
    (dict(method="autodiff", diagnostics=True), "--diagnostics reads the handwritten"),
])
def test_the_library_checks_its_options_before_anything_is_written(tmp_path, given, match):
    cfg = dataclasses.replace(runner.build_config(**SMALL, steps=2), **given)
    with pytest.raises(runner.RunError, match=match):
        runner.run(cfg, tmp_path / "r", progress=False, log=lambda *a: None)
    assert not (tmp_path / "r").exists()


def test_never_overwrites_a_run(tmp_path, capsys):
    cfg = runner.build_config(**SMALL, steps=5)
    runner.run(cfg, tmp_path / "r", progress=False, log=lambda *a: None)
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert main(["train", "--task", "sine", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(tmp_path / "r"), "--hidden", "16",
                 "--steps", "9"]) == 2
    assert "--hidden 16 (the run has 8)" in capsys.readouterr().err
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before
    assert ckpt.latest_step(tmp_path / "r" / "checkpoints") == 5


def test_truncated_bptt_run(tmp_path):
    cfg = runner.build_config(**SMALL, steps=6, k1=4, k2=6)
    res = runner.run(cfg, tmp_path / "r", progress=False, log=lambda *a: None)
    assert res.final_step == 6 and all(r["loss"] > 0 for r in rows(tmp_path / "r"))


def test_charlm_run_and_sample(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "r"
    assert main(["train", "--task", "charlm", "--text", str(text), "--hidden", "16",
                 "--seq-len", "16", "--steps", "30", "--eval-every", "15", "--no-progress",
                 "--out", str(out)]) == 0
    assert "bits/char" in capsys.readouterr().out
    assert all("eval_bpc" in r for r in rows(out) if r["step"] % 15 == 0)
    assert (out / "samples.txt").exists()
    assert main(["sample", "--out", str(out), "--length", "40", "--prompt", "the "]) == 0
    s = capsys.readouterr().out
    assert s.startswith("the ") and len(s.rstrip("\n")) == 44
    assert main(["sample", "--out", str(out), "--prompt", "ZZZ"]) == 2
    assert "outside the model's vocabulary" in capsys.readouterr().err


# --- resume: damaged checkpoints, contradicting options -------------------------

TINY = ["--task", "sine", "--cell", "gru", "--hidden", "4", "--batch", "2", "--seq-len", "5",
        "--lr", "0.01", "--eval-every", "0", "--no-progress"]


def snapshot(d: Path) -> dict[str, bytes | None]:
    """Everything under ``d``: relative path -> the file's bytes (None for a directory)."""
    return {str(p.relative_to(d)): p.read_bytes() if p.is_file() else None
            for p in sorted(d.rglob("*"))}


def truncate_arrays(step_dir: Path) -> None:
    """Halves every file of the state's OCDBT data (``state/d/``): a crash mid-copy."""
    for p in (step_dir / "state" / "d").iterdir():
        p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])


def test_resume_skips_damaged_checkpoints_and_applies_changeable_options(tmp_path, capsys):
    """An uninterrupted 9-step run (checkpoints 6, 8, 9 kept), copied; in the copy 9's
    arrays are truncated and 8's meta garbled. The resume falls back to 6 with one warning
    per skipped checkpoint, moves them aside, logs every 2nd step, saves 9 again: its rows
    are the uninterrupted run's, bit for bit."""
    import shutil

    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["train", *TINY, "--log-every", "1", "--checkpoint-every", "2", "--steps", "9",
                 "--out", str(ref)]) == 0
    shutil.copytree(ref, run)
    truncate_arrays(run / "checkpoints" / "9")
    meta = run / "checkpoints" / "8" / "meta" / "metadata"
    meta.write_bytes(b'{"\x97' + meta.read_bytes()[3:])
    damaged = {s: snapshot(run / "checkpoints" / str(s)) for s in (8, 9)}
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--log-every", "2",
                 "--checkpoint-every", "3", "--no-progress", "--lr", "1e-2"]) == 0
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if line.startswith("warning:")]
    assert len(warnings) == 2, err
    moved = run / "checkpoints"
    assert re.fullmatch(rf"warning: checkpoint 9 is unreadable \(state: OUT_OF_RANGE: .*\): "
                        rf"resuming from checkpoint 6; moved it aside to "
                        rf"{re.escape(str(moved / '9.damaged'))}", warnings[0]), warnings[0]
    assert warnings[1] == (f"warning: checkpoint 8 is unreadable (meta: 'utf-8' codec can't "
                           f"decode byte 0x97 in position 2: invalid start byte): resuming "
                           f"from checkpoint 6; moved it aside to {moved / '8.damaged'}")
    for s in (8, 9):  # kept, byte for byte
        assert snapshot(moved / f"{s}.damaged") == damaged[s]
    with ckpt.Checkpointer(moved, read_only=True) as c:
        assert c.all_steps() == [6, 9]  # 9 saved again (--checkpoint-every 3)
    ref_rows = {r["step"]: (r["loss"], r["grad_norm"]) for r in rows(ref)}
    got = {r["step"]: (r["loss"], r["grad_norm"]) for r in rows(run)}
    assert sorted(got) == [1, 2, 3, 4, 5, 6, 8, 9]  # rows to 6 kept, then every 2nd, the end
    assert got == {s: ref_rows[s] for s in got}  # bit for bit
    assert json.loads((run / "config.json").read_text())["log_every"] == 2


def test_refused_resumes_change_nothing(tmp_path, capsys):
    """Contradicting options, then no readable checkpoint: exit 2, one line, same bytes."""
    run = tmp_path / "run"
    assert main(["train", *TINY, "--log-every", "1", "--checkpoint-every", "2", "--steps", "4",
                 "--out", str(run)]) == 0
    before = snapshot(run)
    capsys.readouterr()
    code = main(["train", "--resume", "--out", str(run), "--method", "autodiff", "--lr", "0.1",
                 "--clip", "1", "--bidirectional", "--seq-len", "5", "--hidden", "4",
                 "--steps", "8", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err == (f"jaxrnn train: error: --resume: these options differ from the run in {run}: "
                   f"--bidirectional on (the run has off); --method autodiff (the run has bptt); "
                   f"--lr 0.1 (the run has 0.01); --clip 1.0 (the run has none)\n")
    assert snapshot(run) == before
    for step in (2, 4):
        truncate_arrays(run / "checkpoints" / str(step))
    before = snapshot(run)
    code = main(["train", "--resume", "--out", str(run), "--steps", "8", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert re.fullmatch(rf"jaxrnn train: error: --resume: no readable checkpoint in "
                        rf"{re.escape(str(run / 'checkpoints'))} \(4: state: OUT_OF_RANGE.*; "
                        rf"2: state: OUT_OF_RANGE.*\)\n", err), err
    assert snapshot(run) == before


def test_every_run_option_is_run_defining_or_changeable():
    import dataclasses

    fields = [f.name for f in dataclasses.fields(runner.RunConfig)]
    defining, changeable = set(runner.RUN_DEFINING), set(runner.CHANGEABLE_ON_RESUME)
    assert not defining & changeable
    assert sorted(defining | changeable) == sorted(fields)
    assert len(runner.RUN_DEFINING) + len(runner.CHANGEABLE_ON_RESUME) == len(fields)
    assert set(runner.MODEL_FIELDS) <= defining


def test_run_defaults_agree_with_the_help_s_table():
    """jaxrnn_app.defaults (what --help lists, without JAX) holds RunConfig's defaults
    and the per-task table the runner applies."""
    import dataclasses

    from jaxrnn_app import defaults

    assert {f.name: f.default for f in dataclasses.fields(runner.RunConfig)} \
        == defaults.RUN_DEFAULTS
    assert runner.TASK_DEFAULTS is defaults.TASK_DEFAULTS
    assert set(defaults.TASK_DEFAULTS) == set(defaults.TASKS)


# Pairwise (tests/conftest.py's all_pairs), not a grid: each option absent, given equal
# to the run's value (spelled another way where it can be), or given different.
RUN = dict(task="sine", cell="gru", hidden=8, lr=0.01, clip=None, k1=None, batch=4, seq_len=12,
           compute_dtype="bfloat16")
SPELLINGS = {  # option -> (equal to the run's, different, how the different one reads)
    "compute_dtype": ("bfloat16", "float16", "--compute-dtype float16 (the run has bfloat16)"),
    "lr": (1e-2, 0.1, "--lr 0.1 (the run has 0.01)"),
    "method": ("bptt", "autodiff", "--method autodiff (the run has bptt)"),
    "clip": (None, 1.0, "--clip 1.0 (the run has none)"),
    "hidden": (8, 16, "--hidden 16 (the run has 8)"),
    "seed": (0, 3, "--seed 3 (the run has 0)"),  # 0: the default, stored by build_config
    "k1": (None, 4, "--k1 4 (the run has none)"),
}


@pytest.mark.parametrize("case", __import__("conftest").all_pairs(
    {k: ("absent", "equal", "different") for k in SPELLINGS}))
def test_resume_refuses_exactly_the_contradicting_options(tmp_path, case):
    out = tmp_path / "r"
    out.mkdir()
    cfg = runner.build_config(**RUN, steps=10, log_every=1)
    (out / "config.json").write_text(json.dumps(runner.dataclasses.asdict(cfg)))
    given = {k: (SPELLINGS[k][0] if v == "equal" else SPELLINGS[k][1])
             for k, v in case.items() if v != "absent"}
    given |= {"steps": 20, "log_every": 5, "task": None, "cell": None}  # changeable; not given
    expected = [SPELLINGS[k][2] for k in runner.RUN_DEFINING if case.get(k) == "different"]
    if expected:
        with pytest.raises(runner.RunError) as e:
            runner.prepare_resume(out, given)
        assert str(e.value) == (f"--resume: these options differ from the run in {out}: "
                                + "; ".join(expected))
    else:
        got = runner.prepare_resume(out, given)
        assert got == runner.dataclasses.replace(cfg, steps=20, log_every=5)


def test_resume_of_a_run_older_than_a_field(tmp_path):
    """config.json written before --forget-bias existed: read_config fills its default."""
    out = tmp_path / "r"
    out.mkdir()
    config = runner.dataclasses.asdict(runner.build_config(**RUN, steps=10))
    del config["forget_bias"], config["proj_size"]
    (out / "config.json").write_text(json.dumps(config))
    assert runner.prepare_resume(out, {"forget_bias": 0.0, "proj_size": 0}).forget_bias == 0.0
    with pytest.raises(runner.RunError, match=r"--forget-bias 1\.0 \(the run has 0\.0\)$"):
        runner.prepare_resume(out, {"forget_bias": 1.0})


# --- mixed precision: --compute-dtype -------------------------------------------------

def _compute_dtypes_trained(monkeypatch) -> list:
    """The ``compute_dtype`` of each model a run makes its train step for (``make_step``)."""
    seen, make_step = [], runner.make_step

    def spy(cfg, task, model, *args, **kwargs):
        seen.append(model.compute_dtype)
        return make_step(cfg, task, model, *args, **kwargs)

    monkeypatch.setattr(runner, "make_step", spy)
    return seen


def test_compute_dtype_trains_is_recorded_and_resumes(tmp_path, capsys, monkeypatch):
    """--compute-dtype bfloat16 reaches the trained model (step 1's loss, from the same
    parameters and batch, is not float32's), config.json records it, --resume rebuilds
    the bfloat16 model without being told and refuses another compute dtype."""
    seen = _compute_dtypes_trained(monkeypatch)
    bf16, f32 = tmp_path / "bf16", tmp_path / "f32"
    args = [*TINY, "--log-every", "1", "--checkpoint-every", "2", "--steps", "2"]
    assert main(["train", *args, "--compute-dtype", "bfloat16", "--out", str(bf16)]) == 0
    assert main(["train", *args, "--out", str(f32)]) == 0
    assert seen == ["bfloat16", None]
    assert json.loads((bf16 / "config.json").read_text())["compute_dtype"] == "bfloat16"
    assert json.loads((f32 / "config.json").read_text())["compute_dtype"] is None
    first_bf16, first_f32 = losses(bf16)[1], losses(f32)[1]
    assert first_bf16 != first_f32 and abs(first_bf16 - first_f32) < 0.05 * first_f32

    assert main(["train", "--resume", "--out", str(bf16), "--steps", "4", "--no-progress"]) == 0
    assert seen[-1] == "bfloat16" and sorted(losses(bf16)) == [1, 2, 3, 4]
    assert json.loads((bf16 / "config.json").read_text())["compute_dtype"] == "bfloat16"
    cfg = runner.prepare_resume(bf16, {"compute_dtype": None, "steps": 6})
    assert runner.make_model(cfg, runner.build_task(cfg)).compute_dtype == "bfloat16"

    before = snapshot(bf16)
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(bf16), "--steps", "6",
                 "--compute-dtype", "float16"]) == 2
    assert capsys.readouterr().err == (
        f"jaxrnn train: error: --resume: these options differ from the run in {bf16}: "
        f"--compute-dtype float16 (the run has bfloat16)\n")
    assert main(["train", "--resume", "--out", str(f32), "--steps", "6",
                 "--compute-dtype", "bfloat16"]) == 2
    assert "--compute-dtype bfloat16 (the run has none)\n" in capsys.readouterr().err
    assert snapshot(bf16) == before


def test_compute_dtype_reaches_evaluation_and_sampling(tmp_path, capsys, monkeypatch):
    """A charlm run with --compute-dtype bfloat16 evaluates and samples with the bfloat16
    model, and so does `jaxrnn sample` on it (the model rebuilt from config.json)."""
    import jaxrnn

    used = []
    evaluator, sample = runner._evaluator, jaxrnn.sample
    monkeypatch.setattr(runner, "_evaluator", lambda task, model, mesh: (
        used.append(("evaluate", model.compute_dtype)) or evaluator(task, model, mesh)))
    monkeypatch.setattr(jaxrnn, "sample", lambda model, *a, **kw: (
        used.append(("sample", model.compute_dtype)) or sample(model, *a, **kw)))
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "r"
    assert main(["train", "--task", "charlm", "--text", str(text), "--hidden", "8",
                 "--seq-len", "8", "--batch", "4", "--steps", "1", "--eval-every", "1",
                 "--compute-dtype", "bfloat16", "--no-progress", "--out", str(out)]) == 0
    assert "eval_bpc" in rows(out)[0]
    assert main(["sample", "--out", str(out), "--length", "10", "--prompt", "the "]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("the ")
    assert used == [("evaluate", "bfloat16"), ("sample", "bfloat16"), ("sample", "bfloat16")]


@pytest.mark.parametrize("dtype, compute_dtype", [("bfloat16", "float16"),
                                                  ("float16", "bfloat16")])
def test_compute_dtype_wider_than_the_parameters_refused_before_anything_is_written(
        tmp_path, dtype, compute_dtype):
    """The library's rule (a compute dtype no wider than the parameters'), checked on
    shapes before the run directory is made; the message names --compute-dtype. (The
    command line's parameters are float32, which both of its compute dtypes are narrower
    than: runner.build_config's ``dtype`` reaches this.)"""
    cfg = runner.build_config(**SMALL, steps=2, dtype=dtype, compute_dtype=compute_dtype)
    with pytest.raises(runner.RunError, match=(
            rf"^--compute-dtype={compute_dtype} is wider than the parameters' dtype {dtype}")):
        runner.run(cfg, tmp_path / "r", progress=False, log=lambda *a: None)
    assert not (tmp_path / "r").exists()


def test_compute_dtype_range_is_the_command_s():
    with pytest.raises(runner.RunError, match=r"^--compute-dtype must be one of \('bfloat16', "
                                              r"'float16'\) or none, got 'int8'$"):
        runner.build_config(**SMALL, compute_dtype="int8")
