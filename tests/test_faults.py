"""Fault injection: what a training run survives, and how it says so (issue 22).

Each case asserts the exit status, the one line on stderr (no traceback) and, where
the run continues, that its losses are those of an uninterrupted run, bit for bit.
Runs are the smallest the command makes (a 4-unit GRU on 2 sequences of 5 steps); a
subprocess only where a real kill, a second process or a mount needs one.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import pytest

from jaxrnn_app import rundir, runner
from jaxrnn_app.cli import main
from test_runner import cli, losses, rows, snapshot

TINY = ["--task", "sine", "--cell", "gru", "--hidden", "4", "--batch", "2", "--seq-len", "5",
        "--lr", "0.01", "--eval-every", "0", "--log-every", "1", "--checkpoint-every", "3",
        "--no-progress"]
TINY_CONFIG = dict(task="sine", cell="gru", hidden=4, batch=2, seq_len=5, lr=0.01,
                   eval_every=0, log_every=1, checkpoint_every=3)
STEPS = 12
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module", autouse=True)
def float32_like_the_command():
    """In-process runs compute as ``jaxrnn train`` does, without x64 (tests/conftest.py
    turns it on), so that their losses equal a subprocess's bit for bit."""
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run of ``STEPS`` steps: its directory and its losses."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", *TINY, "--steps", str(STEPS), "--out", str(out)]) == 0
    return out, losses(out)


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    return err[:-1]


def python(code: str, *args: str, prefix: tuple = (), **kw) -> subprocess.Popen:
    return subprocess.Popen([*prefix, sys.executable, "-c", code, *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def wait_for(condition, p: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        if p.poll() is not None:
            pytest.fail(f"the run ended (status {p.returncode}): {p.communicate()[1][-3000:]}")
        if time.time() > deadline:
            pytest.fail("timed out")
        time.sleep(0.05)


# A Python that runs ``jaxrnn`` with its arguments and reports each command's status
# and stderr as one JSON line (several commands in one interpreter: one import of JAX).
COMMANDS = """
import contextlib, io, json, sys
from jaxrnn_app.cli import main
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    print(json.dumps([code, err.getvalue()]))
"""


def run_commands(commands: list[list[str]], prefix: tuple = ()) -> list[tuple[int, str]]:
    p = python(COMMANDS, json.dumps(commands), prefix=prefix)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    return [tuple(json.loads(line)) for line in out.splitlines()]


# --- one run, one writer ----------------------------------------------------------

def test_one_writer_at_a_time_and_sample_reads_while_it_trains(tmp_path, capsys):
    """A second `train` and a `train --resume` on a directory being trained exit 2 at
    once naming the holder's pid, writing nothing; `sample` reads its checkpoints
    meanwhile (under their shared lock); SIGKILL leaves no stale lock; every step is in
    metrics.jsonl once. (Before: both runs trained, every step twice, or orbax's
    FileNotFoundError.)"""
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "r"
    args = ["--task", "charlm", "--text", str(text), "--hidden", "8", "--seq-len", "8",
            "--batch", "4", "--eval-every", "0", "--log-every", "1", "--checkpoint-every", "2",
            "--no-progress"]
    p = cli("train", *args, "--steps", "100000", "--out", str(out))
    try:
        wait_for(lambda: (out / "checkpoints" / "2").is_dir(), p)
        capsys.readouterr()
        for resume in ([], ["--resume"]):
            assert main(["train", *args, *resume, "--steps", "5", "--out", str(out)]) == 2
            assert one_line(capsys.readouterr().err) == (
                f"jaxrnn train: error: --out {out} is in use: another run (pid {p.pid}) holds "
                f"its lock; wait for it to end, or choose another --out")
        assert main(["sample", "--out", str(out), "--length", "5"]) == 0
        assert capsys.readouterr().out.startswith("The ")
        assert p.poll() is None  # it trained (saving, pruning) all along
    finally:
        p.kill()
        p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    rundir.lock(out).release()  # what the next run takes: free, the killed holder gone
    steps = [r["step"] for r in rows(out)]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no step twice


# --- kills and torn writes ---------------------------------------------------------

# ``jaxrnn train`` that dies by SIGKILL in the middle of saving checkpoint 6: its arrays
# written into 6.orbax-checkpoint-tmp, not yet renamed into place.
KILL_MID_SAVE = """
import os, signal, sys
import orbax.checkpoint as ocp
from jaxrnn_app.cli import main

atomic = ocp.path.atomicity.AtomicRenameTemporaryPath
finalize = atomic.finalize

async def kill_at_6(self):
    if "6.orbax-checkpoint-tmp" in str(self.get()):
        os.kill(os.getpid(), signal.SIGKILL)
    return await finalize(self)

atomic.finalize = kill_at_6
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_save_resumes_as_an_uninterrupted_run(tmp_path, reference, capsys):
    out = tmp_path / "r"
    p = python(KILL_MID_SAVE, "train", *TINY, "--steps", "100000", "--out", str(out))
    _, err = p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL, err
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == [
        "3", "6.orbax-checkpoint-tmp"]
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--steps", str(STEPS),
                 "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == ["12", "6", "9"]
    assert losses(out) == reference[1]


def test_a_row_torn_by_a_full_disk_is_set_aside_and_rewritten(tmp_path, reference, capsys,
                                                             monkeypatch):
    """ENOSPC in the middle of row 5 (an errno injected at the write call, after half the
    row went out): exit 1 with one line naming the file, the cause and checkpoint 3
    (read back whole); --resume keeps the torn bytes in metrics.jsonl.torn, says so in
    one line and rewrites the rows after checkpoint 3 as an uninterrupted run's."""
    out, write_all = tmp_path / "r", rundir._write_all

    def disk_fills_in_row_5(fd, data):
        if data.startswith(b'{"step": 5,'):
            write_all(fd, data[:len(data) // 2])
            raise OSError(28, os.strerror(28))
        write_all(fd, data)

    monkeypatch.setattr(rundir, "_write_all", disk_fills_in_row_5)
    assert main(["train", *TINY, "--steps", str(STEPS), "--out", str(out)]) == 1
    metrics, where = out / "metrics.jsonl", out / "checkpoints"
    assert one_line(capsys.readouterr().err) == (
        f"jaxrnn train: cannot write {metrics}: No space left on device (ENOSPC); stopped: "
        f"the last good checkpoint is step 3 in {where} (read back whole; --resume "
        f"continues from it)")
    torn = metrics.read_bytes().rsplit(b"\n", 1)[1]
    assert torn.startswith(b'{"step": 5,') and len(torn) > 10

    monkeypatch.undo()
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert one_line(capsys.readouterr().err) == (
        f"warning: the last row of {metrics} is torn ({len(torn)} bytes without a newline: "
        f"a write cut short): resuming from checkpoint 3; moved it aside to {metrics}.torn")
    assert (out / "metrics.jsonl.torn").read_bytes() == torn
    assert losses(out) == reference[1]


# --- full disks, read-only places, nowhere to write ---------------------------------

def _mount_namespace(tmp_path: Path) -> tuple:
    """A prefix that runs a command in its own mount namespace, where it may mount (a
    user namespace where the kernel allows them: ``unshare -rm``; as root: ``unshare
    -m``); skips where neither can mount a tmpfs."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed: cannot make a private mount")
    probe, why = tmp_path / "probe", ""
    probe.mkdir()
    for prefix in (("unshare", "-rm"), ("unshare", "-m")):
        r = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=64k", "none",
                            str(probe)], capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            return prefix
        why = r.stderr.strip()
    pytest.skip(f"cannot mount in a private mount namespace here ({why})")


FULL_DISK = """
set -u
M="$1"; shift
mount -t tmpfs -o size=2m none "$M"
"$PY" -m jaxrnn_app train "$@" --steps 100000 --out "$M/r" >"$M.out1" 2>"$M.err1" &
P=$!
while [ ! -d "$M/r/checkpoints/3" ] && kill -0 $P 2>/dev/null; do sleep 0.02; done
dd if=/dev/zero of="$M/fill" bs=4k 2>/dev/null
wait $P; echo $? >"$M.rc1"
rm "$M/fill"
"$PY" -m jaxrnn_app train --resume --out "$M/r" --steps "$STEPS" --no-progress \
    >"$M.out2" 2>"$M.err2"; echo $? >"$M.rc2"
cp -a "$M/r" "$M.r"
"""


def test_a_full_disk_mid_run_ends_in_one_line_and_the_run_resumes(tmp_path, reference):
    """A real full file system (a 2 MB tmpfs filled once checkpoint 3 exists): orbax's
    save (or a row) fails with ENOSPC; exit 1 with one line (none of orbax's threads'
    tracebacks) naming the last good checkpoint; with space again, --resume gives the
    uninterrupted run's losses."""
    prefix = _mount_namespace(tmp_path)
    m = tmp_path / "m"
    m.mkdir()
    r = subprocess.run([*prefix, "bash", "-c", FULL_DISK, "full-disk", str(m), *TINY],
                       env={**ENV, "PY": sys.executable, "STEPS": str(STEPS)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rc1, err1 = (tmp_path / "m.rc1").read_text().strip(), (tmp_path / "m.err1").read_text()
    assert rc1 == "1", err1
    line = one_line(err1)
    failed = re.fullmatch(rf"jaxrnn train: cannot (save checkpoint (\d+) in {m}/r/checkpoints|"
                          rf"write {m}/r/metrics\.jsonl): No space left on device \(ENOSPC\); "
                          rf"stopped: the last good checkpoint is step (\d+) in "
                          rf"{m}/r/checkpoints \(read back whole; --resume continues from "
                          rf"it\)", line)
    assert failed, line
    assert failed.group(2) is None or int(failed.group(3)) == int(failed.group(2)) - 3
    assert (tmp_path / "m.rc2").read_text().strip() == "0", (tmp_path / "m.err2").read_text()
    assert "Traceback" not in (tmp_path / "m.err2").read_text()
    assert losses(tmp_path / "m.r") == reference[1]


READ_ONLY = """
set -u
for d in "$@"; do mount --bind "$d" "$d" && mount -o remount,bind,ro "$d"; done
"$PY" -c "$CODE" "$COMMANDS"
"""


def test_read_only_places_are_refused_before_anything_is_written(tmp_path, reference):
    """Read-only bind mounts (EROFS): the run directory, its checkpoints/ alone, a parent
    of a new --out. Each: exit 2, one line naming the place and the cause; no byte
    changed (before: a traceback, or 200 steps trained before failing)."""
    prefix = _mount_namespace(tmp_path)
    run, ckpts_only, parent = tmp_path / "run", tmp_path / "ckpts", tmp_path / "parent"
    shutil.copytree(reference[0], run)
    shutil.copytree(reference[0], ckpts_only)
    parent.mkdir()
    before = {d: snapshot(d) for d in (run, ckpts_only, parent)}
    commands = [["train", "--resume", "--out", str(run), "--steps", "20", "--no-progress"],
                ["train", "--resume", "--out", str(ckpts_only), "--steps", "20",
                 "--no-progress"],
                ["train", *TINY, "--out", str(parent / "new")]]
    r = subprocess.run([*prefix, "bash", "-c", READ_ONLY, "read-only", str(run),
                        str(ckpts_only / "checkpoints"), str(parent)],
                       env={**ENV, "PY": sys.executable, "CODE": COMMANDS,
                            "COMMANDS": json.dumps(commands)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    results = [tuple(json.loads(line)) for line in r.stdout.splitlines()]
    assert [code for code, _ in results] == [2, 2, 2], results
    assert [one_line(err) for _, err in results] == [
        f"jaxrnn train: error: cannot write in {run}: Read-only file system (EROFS)",
        f"jaxrnn train: error: cannot write in {ckpts_only / 'checkpoints'}: Read-only file "
        f"system (EROFS)",
        f"jaxrnn train: error: cannot create --out: {parent / 'new'}: Read-only file system "
        f"(EROFS)"]
    assert {d: snapshot(d) for d in before} == before


def test_no_write_permission_is_refused_for_another_user(tmp_path, reference):
    """Root may write in a chmod-555 directory, so the refused commands run as uid 65534
    (setpriv): a new --out in a directory it may not write, and --resume of a run it
    may read but not write. Each: exit 2, one line naming the place (EACCES)."""
    who = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    r = subprocess.run([*who, sys.executable, "-c", "import jaxrnn_app.cli"],
                       capture_output=True, text=True, env=ENV, timeout=120)
    if r.returncode != 0:
        pytest.skip(f"this interpreter does not run as uid 65534 here: "
                    f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
    base = Path(tempfile.mkdtemp(prefix="jaxrnn-eacces-", dir="/tmp"))
    try:
        base.chmod(0o755)  # others may enter and read, not write
        run = base / "run"
        shutil.copytree(reference[0], run)
        before = snapshot(run)
        results = run_commands(
            [["train", *TINY, "--out", str(base / "new")],
             ["train", "--resume", "--out", str(run), "--steps", "20", "--no-progress"]],
            prefix=who)
        assert [one_line(err) for _, err in results] == [
            f"jaxrnn train: error: cannot create --out: {base / 'new'}: Permission denied "
            f"(EACCES)",
            f"jaxrnn train: error: cannot write in {run}: Permission denied (EACCES)"]
        assert [code for code, _ in results] == [2, 2]
        assert snapshot(run) == before and not (base / "new").exists()
    finally:
        shutil.rmtree(base)


def test_nowhere_to_write_is_refused_with_one_line(tmp_path, capsys, monkeypatch):
    """--out a file, a path under a file, a path under /proc, and a file system without
    room for one checkpoint: exit 2, one line naming the path and the cause, nothing
    made."""
    a_file = tmp_path / "file"
    a_file.write_text("not a directory\n")
    cases = [(a_file, f"--out {a_file} is a file, not a directory: choose a directory"),
             (a_file / "r", f"cannot create --out: {a_file / 'r'}: Not a directory (ENOTDIR)")]
    if Path("/proc/self").is_dir():
        cases.append((Path("/proc/jaxrnn/r"), "cannot create --out: /proc/jaxrnn: No such "
                                               "file or directory (ENOENT)"))
    for out, message in cases:
        assert main(["train", *TINY, "--out", str(out)]) == 2
        assert one_line(capsys.readouterr().err) == f"jaxrnn train: error: {message}"
    assert a_file.read_text() == "not a directory\n"

    monkeypatch.setattr(rundir, "free_bytes", lambda directory: 1000)
    out = tmp_path / "new" / "r"
    assert main(["train", *TINY, "--out", str(out)]) == 2
    assert re.fullmatch(rf"jaxrnn train: error: no space for a checkpoint in {out}: 1\.0 kB "
                        rf"free on its file system, a checkpoint needs about \d+\.\d kB; free "
                        rf"some space, or choose another --out",
                        one_line(capsys.readouterr().err))
    assert not (tmp_path / "new").exists()  # the directories it made are gone again


# --- damaged, missing and foreign records --------------------------------------------

@pytest.mark.parametrize("content, why", [
    ("[1, 2, 3]", "holds a JSON array, not an object"),
    ("null", "holds a JSON null, not an object"),
    ("{garbage", "is not JSON (Expecting property name enclosed in double quotes: line 1 "
                 "column 2 (char 1))"),
    ('{"task": "sine", "hidden": "8"}', ": hidden is '8', not of type int"),
    (None, "is a directory, not a JSON file"),
])
def test_a_damaged_config_json_is_named(tmp_path, capsys, content, why):
    out = tmp_path / "r"
    out.mkdir()
    config = out / "config.json"
    if content is None:
        config.mkdir()
    else:
        config.write_text(content)
    damaged = "the run's configuration is damaged: restore it, or start a new run"
    assert main(["train", "--resume", "--out", str(out)]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"jaxrnn train: error: --resume: {config}{'' if why[0] == ':' else ' '}{why}: "
        f"{damaged}")
    assert main(["sample", "--out", str(out)]) == 2
    assert one_line(capsys.readouterr().err).startswith(f"jaxrnn sample: error: {config}")


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(tmp_path, reference,
                                                                     capsys):
    """What such a run leaves: config.json, its first rows, an unfinished save."""
    out = tmp_path / "r"
    (out / "checkpoints" / "3.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    cfg = runner.build_config(**TINY_CONFIG, steps=STEPS)
    (out / "config.json").write_text(json.dumps(runner.dataclasses.asdict(cfg)))
    first_rows = (reference[0] / "metrics.jsonl").read_text().splitlines(keepends=True)[:2]
    (out / "metrics.jsonl").write_text("".join(first_rows))
    assert main(["train", *TINY, "--out", str(out)]) == 2  # a new run: still refused
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert one_line(capsys.readouterr().err) == (
        f"--resume: {out} has no checkpoint yet (the run stopped before its first): "
        f"starting it from step 0 with its stored configuration")
    assert losses(out) == reference[1]
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == ["12", "6", "9"]


def test_another_runs_checkpoints_are_refused_and_old_ones_stay_resumable(tmp_path, reference,
                                                                         capsys):
    """Checkpoints of an lr 0.01 run copied into an lr 0.05 run: exit 2, one line naming
    the setting, nothing changed. Checkpoints made before they recorded their run (no
    "run" record) resume as before."""
    other = tmp_path / "other"
    other.mkdir()
    cfg = runner.build_config(**{**TINY_CONFIG, "lr": 0.05}, steps=STEPS)
    (other / "config.json").write_text(json.dumps(runner.dataclasses.asdict(cfg)))
    shutil.copytree(reference[0] / "checkpoints", other / "checkpoints")
    before = snapshot(other)
    assert main(["train", "--resume", "--out", str(other), "--steps", "20"]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"jaxrnn train: error: --resume: checkpoint {other / 'checkpoints' / str(STEPS)} was "
        f"made by another run than {other}: --lr 0.01 in the checkpoint, 0.05 in config.json")
    assert snapshot(other) == before

    old = tmp_path / "old"
    shutil.copytree(reference[0], old)
    for meta in old.glob("checkpoints/*/meta/metadata"):
        record = json.loads(meta.read_text())
        del record["metadata"]["run"]
        meta.write_text(json.dumps(record))
    assert main(["train", "--resume", "--out", str(old), "--no-progress"]) == 0
    assert f"the run already reached step {STEPS}" in capsys.readouterr().out


# --- signals ---------------------------------------------------------------------

def test_ctrl_c_during_the_imports_exits_130_quietly(tmp_path):
    """SIGINT while JAX is being imported (a third of a second in): status 130, at most
    one line and no traceback, nothing written (before: a traceback, a crash in an
    extension's initialisation, or a KeyboardInterrupt swallowed and the run went on)."""
    out = tmp_path / "r"
    p = cli("train", *TINY, "--out", str(out))
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err in ("", "jaxrnn train: interrupted\n")
    assert not out.exists()
