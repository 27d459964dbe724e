"""The command line as a newcomer meets it: --help and --version at once (no JAX import),
each option's default in the help, messages naming only options given, the nearest option
to a mistyped one, a notice while the first step compiles, and the benchmark's legend."""

import importlib.metadata
import json
import subprocess
import sys
import time

import pytest

from jaxrnn_app import defaults
from jaxrnn_app.cli import build_parser, main

SUBCOMMANDS = ("explain", "train", "sample", "gradcheck")


def test_help_and_version_import_no_jax():
    """Each answer, in a fresh interpreter: exit 0, and neither JAX nor numpy imported."""
    cases = [["--help"], ["--version"], ["bench", "--help"]] + [[c, "--help"] for c in SUBCOMMANDS]
    code = (
        "import contextlib, io, json, sys\n"
        "from jaxrnn_app.cli import main\n"
        "seen = []\n"
        f"for args in {cases!r}:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            main(args)\n"
        "            code = 0\n"
        "        except SystemExit as e:\n"
        "            code = e.code\n"
        "    seen.append([args, code, 'jax' in sys.modules, 'numpy' in sys.modules,\n"
        "                 len(out.getvalue())])\n"
        "print(json.dumps(seen))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for args, status, jax_imported, numpy_imported, printed in json.loads(r.stdout):
        assert status == 0 and printed > 0, args
        assert not jax_imported, f"jaxrnn {' '.join(args)} imported jax"
        assert not numpy_imported, f"jaxrnn {' '.join(args)} imported numpy"


def test_version_is_the_installed_packages(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"jaxrnn {importlib.metadata.version('jaxrnn')}"


def _help(command: str) -> str:
    return build_parser().commands[command].format_help()


@pytest.mark.parametrize("name", ["hidden", "seq_len", "batch", "steps", "lr", "cell",
                                  "clip", "eval_every", "checkpoint_every", "target_loss"])
def test_train_help_lists_each_tasks_default(name):
    text = " ".join(_help("train").split())  # argparse wraps the lines
    expected = "(default per task: " + ", ".join(
        f"{t} {defaults._show(defaults.TASK_DEFAULTS[t].get(name, defaults.RUN_DEFAULTS[name]))}"
        for t in defaults.TASKS) + ")"
    assert expected in text


def test_train_help_hidden_defaults_by_task():
    text = " ".join(_help("train").split())
    assert "(default per task: example 1, sine 32, adding 64, lag 32, charlm 128)" in text


def test_every_option_with_a_value_shows_its_default():
    """Every option says its default, but for a flag that is off unless given, the output
    directory, the processes' options and gradcheck's fixed settings (drawn at random,
    as their group's title says)."""
    parser = build_parser()
    no_default = {"--out", "--resume", "--no-progress", "--process-id", "--coordinator",
                  "--no-bidirectional", "--no-lengths", "-h"}
    fixed = {"--seq-len", "--batch", "--input-size", "--hidden", "--output-size", "--layers",
             "--bidirectional", "--nonlinearity", "--loss"}
    for command in SUBCOMMANDS:
        sub = parser.commands[command]
        assert "(default: None)" not in sub.format_help()
        skip = no_default | (fixed if command == "gradcheck" else set())
        for action in sub._actions:
            if action.option_strings and not set(action.option_strings) & skip:
                shown = sub._get_formatter()._get_help_string(action)
                assert "default" in shown, (command, action.option_strings)


def test_help_defaults_are_the_runs_defaults():
    """One home: the runner applies the same per-task table the help lists."""
    from jaxrnn_app import runner

    assert runner.TASK_DEFAULTS is defaults.TASK_DEFAULTS
    for task in defaults.TASKS:
        cfg = runner.build_config(task=task)
        for name in ("hidden", "batch", "seq_len", "steps", "lr", "cell"):
            assert getattr(cfg, name) == defaults.task_default(task, name), (task, name)


def _refusal(args, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        sys.exit(main(args))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_sample_of_a_missing_run_names_out_not_resume(tmp_path, capsys):
    err = _refusal(["sample", "--out", str(tmp_path / "nope")], capsys)
    assert f"--out {tmp_path / 'nope'} holds no run" in err
    assert "--resume" not in err


def test_sample_of_a_run_without_checkpoints_names_out(tmp_path, capsys):
    from jaxrnn_app import runner

    out = tmp_path / "r"
    out.mkdir()
    cfg = runner.build_config(task="charlm")
    (out / "config.json").write_text(json.dumps(runner.dataclasses.asdict(cfg)))
    err = _refusal(["sample", "--out", str(out)], capsys)
    assert f"--out {out} has no checkpoint" in err and "--resume" not in err


def test_unknown_option_points_to_the_subcommands_help_and_the_nearest(capsys):
    err = _refusal(["train", "--hiden", "8"], capsys)
    assert "jaxrnn train: error: unrecognized arguments: --hiden 8" in err
    assert "did you mean --hidden?" in err
    assert "(see jaxrnn train --help)" in err and "see jaxrnn --help" not in err


def test_unknown_option_from_the_console_script():
    r = subprocess.run([sys.executable, "-m", "jaxrnn_app", "train", "--hiden", "8"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "did you mean --hidden?" in r.stderr and "jaxrnn train --help" in r.stderr


def test_mistyped_command_and_choice_suggest_the_nearest(capsys):
    assert "did you mean train?" in _refusal(["trian"], capsys)
    err = _refusal(["train", "--cell", "lstmm"], capsys)
    assert "did you mean lstm?" in err and "jaxrnn train --help" in err


@pytest.mark.parametrize("message, expected", [
    ("seq_len must be an integer >= 2, got 1", "--seq-len must be an integer >= 2, got 1"),
    ("proj_size=2 applies to cell='lstm' only", "--proj-size=2 applies to --cell 'lstm' only"),
    ("optimizer 'x' is not an optax optimizer", "--optimizer 'x' is not an optax optimizer"),
    ("text_path must name a text file, got a directory: /d/seq_len",
     "--text must name a text file, got a directory: /d/seq_len"),
    ("bidirectional=True is not supported", "--bidirectional is not supported"),
])
def test_library_messages_name_the_commands_options(message, expected):
    from jaxrnn_app.runner import option_message

    assert option_message(message) == expected


def test_a_compiling_notice_comes_before_training(tmp_path, capsys):
    from jaxrnn_app import runner

    cfg = runner.build_config(task="sine", cell="gru", hidden=4, batch=2, seq_len=5, steps=3,
                              eval_every=0, log_every=1)
    runner.run(cfg, tmp_path / "r", progress=True, log=lambda *a: None)
    err = capsys.readouterr().err
    assert "compiling the training step" in err
    assert err.index("compiling the training step") < err.index("3/3")


def test_the_progress_bars_clock_starts_after_the_first_step(monkeypatch):
    """The first (compiling) step is not in the bar's elapsed time, hence not in its ETA."""
    import jax.numpy as jnp

    from jaxrnn._src import loop

    bars = []
    original = loop._progress_bar

    def keep(*a, **k):
        bars.append(original(*a, **k))
        return bars[-1]

    monkeypatch.setattr(loop, "_progress_bar", keep)
    calls = []

    def step_fn(params, opt_state, batch):
        if not calls:
            time.sleep(1.5)  # a slow compile
        calls.append(1)
        return params, opt_state, {"loss": jnp.asarray(1.0)}

    loop.train_loop(step_fn, jnp.zeros(2), (), lambda step: None, 4, progress=True)
    assert len(calls) == 4
    assert bars[0].format_dict["elapsed"] < 1.0


def _bench_results(ran: set[str]) -> dict:
    def method(name):
        if name not in ran:
            return {"status": "not installed"}
        if name == "floor":
            return {"status": "ok", "floor_ms": 0.5}
        return {"status": "ok", "median_ms": 1.0, "q1_ms": 0.9, "q3_ms": 1.1}

    names = ("bptt", "autodiff", "torch", "torch_1t", "flax", "xla_chain", "floor")
    return {"environment": {"threads": {"jax_xla_cpu": 2}, "cpu": "test cpu"},
            "results": [{"cell": cell, "T": 20, "B": 4, "H": 16, "num_layers": 1,
                         "bidirectional": False, "methods": {n: method(n) for n in names}}
                        for cell in ("elman", "lstm")]}


def test_bench_legend_lists_only_contenders_that_ran(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxrnn_lab.bench import report

    fig = report.figure(_bench_results({"bptt", "autodiff", "torch", "floor"}))
    try:
        labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    finally:
        plt.close(fig)
    assert labels == ["jaxrnn bptt", "jaxrnn autodiff", "torch (2 threads)", "product floor"]
    assert "flax" not in labels and "torch (1 thread)" not in labels
    report.chart(_bench_results({"bptt"}), tmp_path / "b.png")  # one contender: still a chart
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_quick_says_how_long_it_takes():
    from jaxrnn_app.cli import BENCH_QUICK_TIME

    r = subprocess.run([sys.executable, "-m", "jaxrnn_app", "bench", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert BENCH_QUICK_TIME in " ".join(r.stdout.split())
    assert BENCH_QUICK_TIME in " ".join(build_parser().format_help().split())
