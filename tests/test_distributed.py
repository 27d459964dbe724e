"""Runs over several processes (``jaxrnn_app.distributed``, ``jaxrnn train --num-processes``).

The module-scoped ``runs`` fixture starts real multi-process runs on localhost:
``python -m jaxrnn_app train`` in two processes of two CPU devices each
(``--xla_force_host_platform_device_count=2``, ``jax.distributed`` with gloo
collectives), and the same run in one process of four devices. The two-process
run's checkpoint at step 2 is then resumed by two processes, as a run stopped
after that checkpoint would be. Every process has a timeout, so a hung collective
fails the tests instead of hanging them. A process whose peers never come is tested
with a coordinator timeout of a second (one process), and the handshake that names
them (``distributed.meet``) in threads.
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import xla_flags
from jaxrnn_app import cli, distributed
from jaxrnn_app.sharding import make_mesh, process_part
from jaxrnn_app.tasks import check_part, make_task, take_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240  # per phase; a run takes ~10-40 s on a busy 2-core machine
STEPS = 4
RUN = ["--task", "sine", "--cell", "lstm", "--hidden", "4", "--seq-len", "6", "--batch", "8",
       "--lr", "0.05", "--log-every", "1", "--eval-every", str(STEPS),
       "--checkpoint-every", "2", "--no-progress"]
F32_ROUNDING = 2e-6  # a few float32 ulps (eps 1.2e-7): other all-reduce order, 4 steps


_CACHE = {}  # the runs' shared JAX compilation cache (set by the fixture)


def _env(devices: int) -> dict:
    # The persistent compilation cache lets the later processes load what the first
    # ones compiled (the model's init ops, the step): the same executables, less time.
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": xla_flags(f"--xla_force_host_platform_device_count={devices}"),
            "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
            **_CACHE}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(args, devices):
    return subprocess.Popen([sys.executable, "-m", "jaxrnn_app", "train", *args], cwd=ROOT,
                            env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _two(args):
    """Starts ``args`` in two processes of two devices each."""
    coordinator = f"localhost:{_free_port()}"
    return [_start([*args, "--num-processes", "2", "--process-id", str(i),
                    "--coordinator", coordinator], 2) for i in range(2)]


def _wait(procs):
    """(returncode, stdout, stderr) of each process; kills them all after TIMEOUT_S."""
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
        return [(p.returncode, *o) for p, o in zip(procs, outputs)]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"a multi-process run did not finish within {TIMEOUT_S} s (a hung "
                    f"collective?)")


def _ok(results):
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    return results


def _digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("distributed")
    _CACHE.update({"JAX_COMPILATION_CACHE_DIR": str(base / "jax-cache"),
                   "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    one, two, resumed = base / "one", base / "two", base / "resumed"
    # Phase 1: the uninterrupted two-process run.
    two_out = _ok(_wait(_two([*RUN, "--steps", str(STEPS), "--out", str(two)])))
    # A run stopped after its checkpoint at step 2: the directory as it was then (the
    # metrics rows after step 2 stay: a run dies between checkpoints, resume drops them).
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    before = _digest(two)
    # Phase 2, in parallel: one process of four devices; the resume by two processes;
    # the same two-process command again on the finished run (refused).
    procs = [_start([*RUN, "--steps", str(STEPS), "--devices", "4", "--out", str(one),
                     "--checkpoint-every", "0"], 4),  # its one checkpoint: at the end
             *_two(["--resume", "--steps", str(STEPS), "--out", str(resumed), "--no-progress"]),
             *_two([*RUN, "--steps", str(STEPS), "--out", str(two)])]
    results = _wait(procs)
    _ok(results[:3])
    return {"one": one, "two": two, "resumed": resumed, "two_out": two_out,
            "refused": results[3:], "two_before": before, "two_after": _digest(two),
            "final": {name: _final_state(out) for name, out in
                      [("one", one), ("two", two), ("resumed", resumed)]}}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _final_state(out: Path):
    from jaxrnn_app import checkpoint as ckpt
    from jaxrnn_app import runner

    cfg = runner.read_config(out)
    task = runner.build_task(cfg)
    model, params = runner.build_model(cfg, task)
    # No metadata: the arrays are what is compared (which settings a checkpoint must
    # record is the runner's and test_runner's business).
    like = ckpt.CheckpointState(params, runner.build_optimizer(cfg).init(params), 0,
                                jax.random.key(0), 0)
    assert ckpt.latest_step(out / "checkpoints") == STEPS
    state = ckpt.restore(out / "checkpoints", like)
    return [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state))]


def _columns(rows, name):
    return np.array([r[name] for r in rows if name in r], np.float64)


# --- two processes against one -----------------------------------------------
def test_two_processes_log_the_losses_of_one_process_of_four_devices(runs):
    one, two = _rows(runs["one"]), _rows(runs["two"])
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    for name in ("loss", "grad_norm", "eval_loss"):
        a, b = _columns(one, name), _columns(two, name)
        assert a.shape == b.shape and a.size >= 1
        np.testing.assert_allclose(b, a, rtol=F32_ROUNDING, atol=0)
    assert len(_columns(two, "eval_loss")) == 1  # at step 4
    assert _columns(two, "loss")[-1] < _columns(two, "loss")[0]  # it trained


def test_two_processes_end_with_the_parameters_of_one_process(runs):
    one, two = runs["final"]["one"], runs["final"]["two"]
    assert len(one) == len(two) > 4
    for a, b in zip(one, two):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(b, a, rtol=F32_ROUNDING, atol=1e-7)


def test_process_0_alone_writes_the_files_and_the_summary(runs):
    config = json.loads((runs["two"] / "config.json").read_text())
    assert config["processes_used"] == 2 and config["devices_used"] == 4
    assert json.loads((runs["one"] / "config.json").read_text())["processes_used"] == 1
    assert (runs["two"] / "curves.png").stat().st_size > 0
    (_, out0, _), (_, out1, err1) = runs["two_out"]
    assert "wrote " in out0 and "ran to step 4" in out0
    assert "wrote " not in out1 and "loss" not in out1 and err1.strip() == ""
    assert sorted(os.listdir(runs["two"] / "checkpoints")) == ["2", "4"]


# --- resume ------------------------------------------------------------------
def test_resumed_two_process_run_equals_the_uninterrupted_one(runs):
    two, resumed = _rows(runs["two"]), _rows(runs["resumed"])
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # 3, 4 redone once
    for name in ("loss", "grad_norm", "eval_loss"):  # the same program: the same numbers
        np.testing.assert_array_equal(_columns(resumed, name), _columns(two, name))
    for a, b in zip(runs["final"]["two"], runs["final"]["resumed"], strict=True):
        np.testing.assert_array_equal(b, a)


def test_a_refused_multi_process_command_changes_nothing(runs):
    for rc, out, err in runs["refused"]:
        assert rc == 2
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "already holds a run" in err
    assert runs["two_after"] == runs["two_before"]


# --- the flags (no process is started) ---------------------------------------
@pytest.mark.parametrize("flags, match", [
    (["--num-processes", "2"], "--num-processes also needs --process-id and --coordinator"),
    (["--process-id", "0", "--coordinator", "localhost:1234"],
     "--process-id, --coordinator also need --num-processes"),
    (["--num-processes", "2", "--coordinator", "h:1"], "also need --process-id"),
    (["--num-processes", "2", "--process-id", "2", "--coordinator", "localhost:1234"],
     r"--process-id must be an integer in \[0, 2\)"),
    (["--num-processes", "2", "--process-id", "0", "--coordinator", "localhost"],
     "--coordinator must be HOST:PORT"),
    (["--num-processes", "2", "--process-id", "0", "--coordinator", "localhost:0"],
     "--coordinator must be HOST:PORT"),
    (["--num-processes", "2", "--process-id", "1", "--coordinator", "h:99999"],
     "--coordinator must be HOST:PORT"),
    (["--num-processes", "2", "--process-id", "1", "--coordinator", ":1234"],
     "--coordinator must be HOST:PORT"),
])
def test_bad_process_flags_exit_2_with_one_line_and_change_nothing(flags, match, tmp_path,
                                                                   capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}\n")
    before = _digest(tmp_path)
    for out in (tmp_path / "run", tmp_path / "new"):
        assert cli.main(["train", "--steps", "1", "--out", str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert err.startswith("jaxrnn train: error: ")
        assert __import__("re").search(match, err), err
    assert _digest(tmp_path) == before and not (tmp_path / "new").exists()
    assert not jax.distributed.is_initialized()


def test_process_id_below_zero_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--num-processes", "2", "--process-id", "-1",
                  "--coordinator", "localhost:1234"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--process-id" in err and ">= 0" in err


_CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                 "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST",
                 "JAX_COORDINATOR_ADDRESS")


def test_one_process_and_no_cluster_start_nothing(monkeypatch):
    for var in _CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    assert distributed.detected_cluster() is None
    assert distributed.start() == distributed.Layout(0, 1, "single")
    assert distributed.start(1, 0, "localhost:1") == distributed.Layout(0, 1, "single")
    assert not jax.distributed.is_initialized()
    assert distributed.is_writer() and not distributed.is_multiprocess()
    assert distributed.from_writer("x", "mine") == "mine"
    distributed.barrier("nothing to wait for")


def test_a_slurm_job_is_detected_only_with_several_tasks(monkeypatch):
    for var in _CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "0"}
    for var, value in slurm.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.detected_cluster() is None  # a one-task job is a plain run
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.detected_cluster() == ("slurm", 2)


# --- a missing process ---------------------------------------------------------
def test_a_process_whose_peer_never_comes_exits_2_with_one_line_and_writes_nothing(tmp_path):
    # Process 0 without process 1 (before the handshake: 307 s of silence, then SIGABRT,
    # exit 134, and a C++ stack trace). Process 1 without process 0: the next test.
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxrnn_app", "train", *RUN, "--steps", "1",
         "--out", str(tmp_path / "run"), "--num-processes", "2", "--process-id", "0",
         "--coordinator", f"localhost:{port}", "--coordinator-timeout", "1"],
        cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    [(rc, out, err)] = _wait([proc])
    assert err == (f"jaxrnn train: error: process 1 of 2 did not join within 1 s (--coordinator "
                   f"localhost:{port}): start it, or raise --coordinator-timeout\n")
    assert (rc, out) == (2, "")
    assert os.listdir(tmp_path) == []  # no run directory


def test_the_coordinator_timeout_help_states_the_default():
    from jaxrnn_app import cli

    help_text = " ".join(cli.build_parser().commands["train"].format_help().split())
    assert f"(default: {distributed.DEFAULT_COORDINATOR_TIMEOUT})" in help_text


def _meet_all(processes, timeout_s=0.5):
    """``distributed.meet`` of each ``(N, I)`` in ``processes``, in threads: what each ended with."""
    import threading

    coordinator, ended = f"localhost:{_free_port()}", [None] * len(processes)

    def one(k, n, i):
        try:
            distributed.meet(n, i, coordinator, timeout_s)
            ended[k] = "go"
        except distributed.StartRefused as e:
            ended[k] = str(e)

    threads = [threading.Thread(target=one, args=(k, *p)) for k, p in enumerate(processes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return coordinator, ended


def test_processes_meet_or_every_one_that_came_is_refused_with_the_same_line():
    assert _meet_all([(3, 2), (3, 0), (3, 1)])[1] == ["go"] * 3
    coordinator, ended = _meet_all([(2, 1)])
    assert ended == [f"process 0 of 2 (the coordinator, --coordinator {coordinator}) did not "
                     f"answer within 0.5 s: start it, or raise --coordinator-timeout"]
    coordinator, ended = _meet_all([(4, 0), (4, 2)])
    assert ended == [f"processes 1 and 3 of 4 did not join within 0.5 s (--coordinator "
                     f"{coordinator}): start them, or raise --coordinator-timeout"] * 2
    # Told at once, without waiting for the timeout:
    assert _meet_all([(2, 0), (3, 1)], timeout_s=30)[1] == [
        "process 1 was started with --num-processes 3, process 0 with --num-processes 2"] * 2
    coordinator, ended = _meet_all([(3, 0), (3, 1), (3, 1)], timeout_s=30)
    assert ended == [f"two processes were started with --process-id 1 (--coordinator "
                     f"{coordinator})"] * 3


def test_a_coordinator_port_in_use_is_refused():
    with socket.socket() as taken:
        taken.bind(("localhost", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(distributed.StartRefused,
                           match=f"process 0 cannot listen on port {port} .*in use"):
            distributed.meet(2, 0, f"localhost:{port}", 0.5)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "5", True])
def test_a_bad_coordinator_timeout_is_refused(bad):
    with pytest.raises(ValueError, match="--coordinator-timeout must be a number of seconds > 0"):
        distributed.start(2, 0, "localhost:1234", timeout_s=bad)
    assert not jax.distributed.is_initialized()


# --- each process's rows of the batch -----------------------------------------
@pytest.mark.parametrize("name", ["example", "sine", "adding", "charlm"])
def test_a_part_of_a_batch_is_those_rows_of_the_whole_batch(name):
    task = make_task(name) if name == "example" else make_task(name, batch_size=8, seq_len=5)
    B = 1 if name == "example" else 8
    for step in (0, 3):
        whole = task.batch(step)
        for n in (n for n in (1, 2, 4) if B % n == 0):
            parts = [task.batch(step, part=(i, n)) for i in range(n)]
            for i, part in enumerate(parts):
                expected = take_rows(whole, slice(i * B // n, (i + 1) * B // n))
                assert jax.tree.structure(part) == jax.tree.structure(expected)
                for a, e in zip(jax.tree.leaves(part), jax.tree.leaves(expected)):
                    assert a.dtype == e.dtype and a.shape == e.shape
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
            glued = np.concatenate([np.asarray(p.xs) for p in parts], axis=1)
            np.testing.assert_array_equal(glued, np.asarray(whole.xs))


def test_bad_parts_are_refused():
    assert check_part(None, 8) == slice(0, 8) and check_part((3, 4), 8) == slice(6, 8)
    for bad in [(2, 2), (-1, 2), (0, 0), (0,), [0, 2], (True, 2), (0.0, 2)]:
        with pytest.raises(ValueError, match="part must be a pair"):
            check_part(bad, 8)
    with pytest.raises(ValueError, match="n=3 must divide the batch size 8"):
        make_task("sine", batch_size=8).batch(0, part=(0, 3))


def test_one_process_holds_every_row():
    assert process_part(make_mesh(1), 6) == (0, 1)
    with pytest.raises(ValueError, match="batch size 0"):
        process_part(make_mesh(1), 0)
