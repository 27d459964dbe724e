"""The ``jaxrnn`` command (also ``python -m jaxrnn_app``).

Subcommands:

* ``explain``: the reference worked example, step by step, computed by the library;
* ``train``: a jit-compiled training run with a progress bar, checkpoints and
  resume, writing its outputs to a directory;
* ``sample``: text from a trained character language model;
* ``gradcheck``: handwritten BPTT vs ``jax.grad`` vs finite differences, in float64.

Exit statuses (docs/training-runs.md has the table): 0 done; 1 a run that failed
mid-way (a NaN loss, a write that failed), one line on stderr, resumable; 2 refused
before anything changed (bad input, a run directory in use, unwritable or full), one
line on stderr; 130 interrupted (Ctrl-C, SIGTERM: a run saves a checkpoint first).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import math
import signal
import sys
from pathlib import Path

from jaxrnn_app import rundir
from jaxrnn_app.defaults import COMPUTE_DTYPES, TASKS, default_text

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad command-line input that argparse itself cannot see."""


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, unless it says it already (``default``
    in the text: the task-dependent ones list each task's) or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        value = action.default
        if ("default" in text or value is None or value is False
                or value is argparse.SUPPRESS or not action.option_strings):
            return text
        if isinstance(value, list):
            value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        elif isinstance(value, str) and value != value.strip():
            value = repr(value)
        return f"{text} (default: {value})".lstrip()


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (and the pointer to this command's --help, and
    the nearest option to one it does not know) and exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            message += _did_you_mean(message[len(prefix):].split(), self._option_string_actions)
        else:  # argparse's "invalid choice: 'trian' (choose from 'explain', 'train', ...)"
            import difflib
            import re

            m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
            near = m and difflib.get_close_matches(m.group(1), re.findall(r"'([^']*)'",
                                                                          m.group(2)), n=1)
            if near:
                message += f"; did you mean {near[0]}?"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _did_you_mean(words: list[str], options) -> str:
    """``; did you mean --hidden?`` for the unknown options among ``words`` close to one of
    ``options`` (``difflib``), else nothing."""
    import difflib

    unknown = [w.split("=")[0] for w in words if w.startswith("-")]
    hints = []
    for word in unknown:
        near = difflib.get_close_matches(word, list(options), n=1)
        if near:
            hints.append(near[0] if len(unknown) == 1 else f"{near[0]} (for {word})")
    return f"; did you mean {', '.join(hints)}?" if hints else ""


def _version() -> str:
    """The installed package's version, read without importing it (and JAX): its metadata,
    else ``__version__`` in jaxrnn/__init__.py's text (a source tree not installed)."""
    try:
        from importlib.metadata import version

        return version("jaxrnn")
    except Exception:  # not installed
        import re

        init = Path(__file__).resolve().parent.parent / "jaxrnn" / "__init__.py"
        try:
            found = re.search(r'^__version__\s*=\s*["\']([^"\']+)', init.read_text(), re.M)
        except OSError:
            found = None
        return found.group(1) if found else "unknown"


def _csv_floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _cell_arg(text: str):
    """A built-in cell's name, or ``package.module:ClassName`` of a user's Cell (an instance)."""
    from jaxrnn.extend import CELLS

    if text in CELLS:
        return text
    if ":" not in text:
        raise argparse.ArgumentTypeError(
            f"expected one of {sorted(CELLS)} or package.module:ClassName, got {text!r}")
    import importlib

    from jaxrnn import Cell

    module_name, _, class_name = text.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # an ImportError, or whatever the module raised on import
        raise argparse.ArgumentTypeError(f"cannot import {module_name!r}: {e}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Cell)):
        raise argparse.ArgumentTypeError(
            f"{text!r} must name a subclass of jaxrnn.Cell, got "
            f"{'nothing' if cls is None else type(cls).__name__}")
    try:
        return cls()
    except Exception as e:
        raise argparse.ArgumentTypeError(
            f"cannot make {class_name}() with its defaults: {e}") from None


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {v}")
        return v
    return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return v


def _leak(text: str) -> float:
    v = _finite_float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return v


def _positive_float(text: str) -> float:
    v = _finite_float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return v


# --- explain -----------------------------------------------------------------

def cmd_explain(args) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from jaxrnn_app.explain import format_walkthrough, walkthrough
    from jaxrnn_app.tasks import reference_example

    if args.targets is not None and len(args.targets) != len(args.x):
        raise UsageError(f"--targets needs one value per input: {len(args.x)} inputs (--x), "
                         f"got {len(args.targets)} targets")
    targets = args.targets if args.targets is not None else [0.5 * v for v in args.x]
    ex = reference_example(xs=args.x, targets=targets, w_xh=args.w_xh, w_hh=args.w_hh, w_hy=args.w_hy, h0=args.h0,
                           lr=args.lr, dtype=jnp.float64)
    print(format_walkthrough(walkthrough(ex)))
    return 0


# --- train -------------------------------------------------------------------

def _library_names():
    """The library's ``jaxrnn._src.names`` (its ``Literal`` types of the method and cell
    names), read without importing ``jaxrnn``, whose package imports jax: building the
    parser imports no jax (``jaxrnn --help`` answers at once)."""
    import importlib.util

    if "jaxrnn._src.names" in sys.modules:
        return sys.modules["jaxrnn._src.names"]
    spec = importlib.util.find_spec("jaxrnn")  # finds the package without running it
    path = Path(spec.origin).parent / "_src" / "names.py"
    names_spec = importlib.util.spec_from_file_location("_jaxrnn_names", path)
    module = importlib.util.module_from_spec(names_spec)
    names_spec.loader.exec_module(module)  # it imports typing only
    return module


def _names(literal) -> tuple[str, ...]:
    from typing import get_args

    return get_args(literal)


# The built-in cells (jaxrnn.extend.CELLS's names; tests/test_cli.py checks that the two
# agree) and the gradient methods (jaxrnn.extend.TRAIN_METHODS): the library's
# names.CellName and names.Method.
CELL_NAMES = _names(_library_names().CellName)
TRAIN_METHODS = _names(_library_names().Method)

RUN_OPTIONS = ("task", "text", "cell", "proj_size", "forget_bias", "alpha", "hidden", "layers",
               "bidirectional", "dropout", "method", "online_every", "compute_dtype",
               "diagnostics", "optimizer", "lr", "schedule", "warmup", "clip", "batch",
               "seq_len", "k1", "k2", "bptt_segment", "steps", "seed", "devices", "log_every",
               "eval_every", "checkpoint_every", "target_loss")


def _default_out(task: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{task}-{stamp}"
    n = 1
    while out.exists():
        n += 1
        out = Path("runs") / f"{task}-{stamp}-{n}"
    return out


def cmd_train(args) -> int:
    from jaxrnn_app import distributed

    # Before anything touches a JAX backend: the process flags, then the runtime.
    distributed.check_flags(args.num_processes, args.process_id, args.coordinator,
                            timeout_s=args.coordinator_timeout)
    from jaxrnn_app import runner

    given = {k: getattr(args, k) for k in RUN_OPTIONS}
    if args.resume:
        if args.out is None:
            raise UsageError("--resume needs --out DIR, the run to continue")
        cfg = runner.prepare_resume(Path(args.out), given)
    else:
        cfg = runner.build_config(**given)
    distributed.start(args.num_processes, args.process_id, args.coordinator,
                      timeout_s=args.coordinator_timeout)
    if args.out is not None:
        out = Path(args.out)
    else:  # one name for every process: process 0's (the clock differs between them)
        out = Path(distributed.from_writer("default-out", str(_default_out(cfg.task))))
    result = runner.run(cfg, out, resume=args.resume, progress=not args.no_progress)
    if result.status == "already-finished" or not distributed.is_writer():
        return 130 if result.status == "interrupted" else 0
    rows = result.history
    if rows:
        first, last = rows[0], rows[-1]
        msg = f"{cfg.task}: loss {first['loss']:.4g} -> {last['loss']:.4g} at step {last['step']}"
        evals = [r for r in rows if "eval_loss" in r]
        if evals:
            msg += f"; held-out loss {evals[-1]['eval_loss']:.4g}"
            if "eval_bpc" in evals[-1]:
                msg += f" ({evals[-1]['eval_bpc']:.3f} bits/char)"
        print(msg)
    if result.status == "target":
        why = f"reached --target-loss {cfg.target_loss:g} at step {result.final_step}"
    elif result.status == "interrupted":
        why = (f"interrupted at step {result.final_step}; checkpoint saved, continue with: "
               f"jaxrnn train --resume --out {out}")
    else:
        why = f"ran to step {result.final_step}"
    how = f"method={cfg.method}" + (f", online every {cfg.online_every} steps"
                                    if cfg.online_every is not None else "")
    print(f"{why}; compile (first step) {result.compile_s:.2f} s, then "
          f"{result.steps_per_s:,.1f} steps/s ({how})")
    if result.samples is not None:
        print("sample:", result.samples[:200].replace("\n", " "))
    print(f"wrote {out}/: config.json, metrics.jsonl, checkpoints/, curves.png"
          + (", samples.txt" if result.samples is not None else ""))
    return 130 if result.status == "interrupted" else 0


# --- sample ------------------------------------------------------------------

def _say(msg: str) -> None:
    """What a long silent wait is doing, on stderr (stdout holds the command's result)."""
    print(msg, file=sys.stderr, flush=True)


def cmd_sample(args) -> int:
    try:
        return _sample(args)
    except OSError as e:  # reading the run or its text: nothing was written
        raise UsageError(f"cannot read {rundir.describe(e)}") from None


def _sample(args) -> int:
    import jax
    import numpy as np

    from jaxrnn_app import checkpoint as ckpt
    from jaxrnn_app import runner
    from jaxrnn import sample

    out = Path(args.out)
    cfg = runner.read_config(out)
    if cfg.task != "charlm":
        raise UsageError(f"sample needs a charlm run; --out {out} is a {cfg.task!r} run")
    ckpt_dir = out / "checkpoints"
    if not ckpt_dir.is_dir() or ckpt.latest_step(ckpt_dir) is None:
        raise UsageError(f"--out {out} has no checkpoint (in {ckpt_dir})")
    _say(f"loading the text and the latest checkpoint of {out}...")
    task = runner.build_task(cfg)
    model, params = runner.build_model(cfg, task)
    optimizer = runner.build_optimizer(cfg)
    online = (runner.make_online(cfg, task, model, optimizer).init
              if cfg.online_every is not None else None)
    opt_state = runner.initial_opt_state(cfg, task, optimizer, params, online)
    like = ckpt.CheckpointState(params, opt_state, 0, jax.random.key(0), 0,
                                runner.checkpoint_metadata(cfg))
    def skipped(step, why):
        print(f"warning: checkpoint {step} is unreadable ({why}): skipped", file=sys.stderr)

    # Under the checkpoints' shared lock (Checkpointer.restore): a run training into --out
    # saves and prunes under an exclusive one, so the checkpoint read stays whole.
    with ckpt.Checkpointer(ckpt_dir, read_only=True) as c:
        params = c.restore(like, on_skip=skipped,
                           absent_ok=runner.METADATA_ADDED_LATER).params
    prompt = args.prompt
    unknown = sorted(set(prompt) - set(task.vocab))
    if unknown:
        raise UsageError(f"--prompt has characters outside the model's vocabulary: {unknown}")
    _say(f"compiling the sampler and sampling {args.length} characters...")
    ids = sample(model, params, task.encode(prompt), args.length, jax.random.key(args.seed),
                 temperature=args.temperature)
    print(prompt + task.decode(np.asarray(ids)))
    return 0


# --- gradcheck ---------------------------------------------------------------

def cmd_gradcheck(args) -> int:
    import jax

    from jaxrnn_app.gradcheck import BPTT_TOL, FD_TOL, check_config, format_results, random_configs

    fixed = {name: getattr(args, attr) for name, attr in [
        ("seq_len", "seq_len"), ("batch", "batch"), ("input_size", "input_size"),
        ("hidden_size", "hidden"), ("output_size", "output_size"), ("num_layers", "layers"),
        ("bidirectional", "bidirectional"), ("nonlinearity", "nonlinearity"), ("loss", "loss"),
    ] if getattr(args, attr) is not None}
    configs = random_configs(
        args.trials, seed=args.seed, cells=tuple(args.cell), max_seq_len=args.max_seq_len,
        max_hidden=args.max_hidden, max_layers=args.max_layers,
        directions=(False,) if args.no_bidirectional else (False, True),
        lengths=(False,) if args.no_lengths else (False, True), **fixed)
    key = jax.random.key(args.seed)
    from jaxrnn import check_cell
    from jaxrnn import Cell

    reports = [check_cell(c, seed=args.seed) for c in args.cell if isinstance(c, Cell)]
    for rep in reports:
        print(rep, end="\n\n")
    results = []
    from tqdm.auto import tqdm

    for i, cfg in enumerate(tqdm(configs, desc="gradcheck", disable=args.no_progress)):
        results.append(check_config(cfg, jax.random.fold_in(key, i)))
    print(format_results(results))
    bad = [i for i, r in enumerate(results) if not r.ok]
    worst = max(r.bptt_vs_autodiff for r in results)
    rtrl_errs = [r.rtrl_vs_autodiff for r in results if r.rtrl_vs_autodiff is not None]
    bad_cells = [r.cell for r in reports if not r.ok]
    if bad_cells:
        print(f"MISMATCH: check_cell finds the backward step of {bad_cells} wrong "
              f"(tolerance {BPTT_TOL:g})")
    if bad:
        print(f"MISMATCH in {len(bad)} of {len(results)} configurations: {bad} "
              f"(tolerances: bptt and rtrl vs autodiff {BPTT_TOL:g}, finite differences "
              f"{FD_TOL:g})")
        return 1
    if bad_cells:
        return 1
    rtrl_msg = (f"; rtrl vs autodiff {max(rtrl_errs):.1e} in the {len(rtrl_errs)} "
                f"one-direction configuration(s)" if rtrl_errs else "")
    print(f"all {len(results)} configurations agree: max relative error bptt vs autodiff "
          f"{worst:.1e}{rtrl_msg} (tolerance {BPTT_TOL:g}), finite differences within "
          f"{FD_TOL:g}")
    return 0


# --- parser ------------------------------------------------------------------

# What `jaxrnn bench --quick` takes, measured (jaxrnn_lab.bench.cli says it too).
BENCH_QUICK_TIME = "about 40 s on 2 idle CPU cores, 2 minutes on a busy machine"


def _bench_main():
    """The benchmark's ``main``: it lives in the lab (``jaxrnn_lab.bench``), which sits
    above the application, so the command reaches it by name, only when it runs."""
    import importlib

    return importlib.import_module("jaxrnn_lab.bench.cli").main


def cmd_bench(args) -> int:
    return _bench_main()(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="jaxrnn", description="Recurrent networks in JAX with handwritten BPTT.")
    p.add_argument("--version", action="version", version=f"jaxrnn {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    p.commands = sub.choices  # name -> its parser (main: the errors of a subcommand's options)

    e = sub.add_parser("explain", help="the reference worked example, step by step",
                       description="Forward table, BPTT table, total gradients and one "
                                   "gradient step of the one-unit reference example, all "
                                   "computed by the library.")
    e.add_argument("--x", type=_csv_floats, default=[1.0, 2.0, 3.0],
                   help="inputs, comma-separated (default: 1,2,3)")
    e.add_argument("--targets", type=_csv_floats, default=None,
                   help="targets, comma-separated (default: 0.5,1,1.5; half the inputs)")
    e.add_argument("--w-xh", type=float, default=0.5, help="input weight (default 0.5)")
    e.add_argument("--w-hh", type=float, default=0.1, help="recurrent weight (default 0.1)")
    e.add_argument("--w-hy", type=float, default=1.0, help="output weight (default 1.0)")
    e.add_argument("--h0", type=float, default=0.0, help="initial hidden state (default 0)")
    e.add_argument("--lr", type=float, default=0.1, help="learning rate of the step (default 0.1)")
    e.set_defaults(func=cmd_explain)

    t = sub.add_parser(
        "train", help="train a model (default: the reference example)",
        description="Trains with a jit-compiled optax step, showing a progress bar, and "
                    "writes config.json, metrics.jsonl, checkpoints/ and curves.png to --out. "
                    "Options left out take their defaults, listed below (some per --task).")
    t.add_argument("--task", choices=TASKS, default=None,
                   help="what to train on (default: example, the reference worked example); it sets "
                        "the defaults of the options marked 'per task'")
    t.add_argument("--text", default=None, help="charlm: a UTF-8 text file (default: the "
                   "English documentation Python ships, pydoc_data.topics)")
    t.add_argument("--cell", choices=CELL_NAMES, default=None,
                   help="the recurrent cell " + default_text("cell"))
    t.add_argument("--proj-size", type=int, default=None,
                   help="lstm: project h to this many units, as PyTorch's LSTM(proj_size=P) "
                        "(default: 0, no projection)")
    t.add_argument("--forget-bias", type=_finite_float, default=None,
                   help="LSTM-family cells: added to the forget gate's bias at init, e.g. 1 "
                        + default_text("forget_bias"))
    t.add_argument("--alpha", type=_leak, default=None,
                   help="--cell leaky: the leak alpha in (0, 1] of h = (1-alpha) h + alpha "
                        "phi(W x + U h + b); 1 is the elman cell (default: 0.5)")
    t.add_argument("--hidden", type=_positive_int, default=None, help="hidden units per layer " + default_text("hidden"))
    t.add_argument("--layers", type=_positive_int, default=None, help="stacked layers " + default_text("layers"))
    t.add_argument("--bidirectional", action="store_true", default=None,
                   help="both directions (default: one)")
    t.add_argument("--dropout", type=float, default=None, help="dropout between layers " + default_text("dropout"))
    t.add_argument("--method", choices=TRAIN_METHODS, default=None,
                   help="gradient: handwritten BPTT, jax.grad, or a forward-in-time "
                        "estimator: exact real-time recurrent learning (rtrl, any cell and "
                        "depth) or its approximations (snap1, snap2, uoro, kf_rtrl, rflo, "
                        "eprop; each refuses the cells it is not defined on); one update "
                        "per batch, or online with --online-every " + default_text("method"))
    t.add_argument("--online-every", type=_positive_int, default=None, metavar="K",
                   help="online training with an estimator --method: an update every K "
                        "steps while the sequence runs (1: fully online); a stream task "
                        "(--task lag) carries the network's and the estimator's state from "
                        "batch to batch (default: none, one update per batch)")
    t.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default=None,
                   help="mixed precision: each recurrent step's products and gate math in "
                        "this dtype; the parameters (float32), the state, the gradients and "
                        "the loss keep theirs; --method bptt or autodiff, without "
                        "--diagnostics (default: none, the parameters' dtype)")
    t.add_argument("--diagnostics", action=argparse.BooleanOptionalAction, default=None,
                   help="log per-step gradient norms (dh_first/dh_last/dh_ratio per layer) "
                        "in metrics.jsonl; --method bptt, full BPTT only (--no-diagnostics "
                        "turns it off when resuming a run made with it) (default: off)")
    t.add_argument("--optimizer", default=None, help="any optax optimizer name " + default_text("optimizer"))
    t.add_argument("--lr", type=_positive_float, default=None, help="(peak) learning rate " + default_text("lr"))
    t.add_argument("--schedule", choices=["constant", "cosine", "warmup-cosine"], default=None,
                   help="learning-rate schedule " + default_text("schedule"))
    t.add_argument("--warmup", type=int, default=None, help="warm-up steps of warmup-cosine " + default_text("warmup"))
    t.add_argument("--clip", type=_positive_float, default=None,
                   help="clip the global gradient norm (an optax chain) " + default_text("clip"))
    t.add_argument("--batch", type=_positive_int, default=None, help="sequences per batch " + default_text("batch"))
    t.add_argument("--seq-len", type=_positive_int, default=None, help="steps per sequence " + default_text("seq_len"))
    t.add_argument("--k1", type=_positive_int, default=None,
                   help="truncated BPTT: steps between updates (default: none, full BPTT)")
    t.add_argument("--k2", type=_positive_int, default=None,
                   help="truncated BPTT: steps of backpropagation (default k1)")
    t.add_argument("--bptt-segment", type=_positive_int, default=None, metavar="N",
                   help="memory-lean BPTT: store the state every N steps and recompute "
                        "in the backward pass (about sqrt(--seq-len) is best; same "
                        "gradients); --method bptt, full BPTT only (default: none, every step stored)")
    t.add_argument("--steps", type=_positive_int, default=None, help="training steps (batches) " + default_text("steps"))
    t.add_argument("--seed", type=int, default=None, help="seed of data and initialisation " + default_text("seed"))
    t.add_argument("--devices", type=_positive_int, default=None,
                   help="devices for data parallelism (default: as many as divide the batch)")
    t.add_argument("--log-every", type=_positive_int, default=None,
                   help="steps between rows of metrics.jsonl " + default_text("log_every"))
    t.add_argument("--eval-every", type=int, default=None,
                   help="steps between held-out evaluations, 0: none "
                        + default_text("eval_every"))
    t.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between checkpoints (and one at the end) "
                        + default_text("checkpoint_every"))
    t.add_argument("--target-loss", type=_finite_float, default=None,
                   help="stop once the training loss is at or below this "
                        + default_text("target_loss"))
    t.add_argument("--out", default=None, help="output directory (default runs/TASK-TIME)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    mp = t.add_argument_group(
        "several processes (jax.distributed)",
        "Give all three on every process, or none: then a cluster JAX detects (SLURM, "
        "Open MPI, Cloud TPU, Kubernetes) is used if there is one. Process 0 writes the "
        "files; every process takes part in the checkpoints.")
    mp.add_argument("--num-processes", type=_positive_int, default=None,
                    help="how many processes the run spans (1: an ordinary run) (default: none)")
    mp.add_argument("--process-id", type=_nonnegative_int, default=None,
                    help="this process's index, in [0, --num-processes)")
    mp.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                    help="where process 0 runs the coordination service; the same on "
                         "every process")
    # distributed.DEFAULT_COORDINATOR_TIMEOUT, spelled out so that building the parser
    # imports no jax (tests/test_distributed.py checks that the two agree)
    mp.add_argument("--coordinator-timeout", type=_positive_float, default=None,
                    metavar="SECONDS",
                    help="how long each process waits for the others to join; then it "
                         "exits with status 2, naming the missing ones (default: 120)")
    t.set_defaults(func=cmd_train)

    sp = sub.add_parser("sample", help="sample text from a trained charlm run",
                        description="Restores the latest checkpoint of a charlm run and samples.")
    sp.add_argument("--out", required=True, help="the run's directory")
    sp.add_argument("--length", type=_positive_int, default=400, help="characters to sample")
    sp.add_argument("--temperature", type=_positive_float, default=0.8,
                    help="softmax temperature: lower is more conservative")
    sp.add_argument("--prompt", default="The ", help="text to start from")
    sp.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    sp.set_defaults(func=cmd_sample)

    b = sub.add_parser("bench", help="time a training step: bptt, autodiff, PyTorch, Flax, "
                                     "and the product floor (--quick: " + BENCH_QUICK_TIME + ")",
                       description="The training-step benchmark (jaxrnn_lab/bench); "
                                   "arguments go to it: --quick, --out DIR, --cells, --grid, "
                                   "--repeats, --floor-repeats (see jaxrnn bench --help).",
                       add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)

    g = sub.add_parser("gradcheck", help="check bptt against jax.grad and finite differences",
                       description="Draws random configurations and compares the handwritten "
                                   "BPTT gradient with jax.grad and with central finite "
                                   "differences in float64, and RTRL with jax.grad where it "
                                   "applies (one direction: any cell and depth). Exit status 1 "
                                   "on a mismatch.")
    g.add_argument("--cell", action="append", type=_cell_arg, default=None,
                   help="cell(s) to check: a built-in name (elman, lstm, gru, indrnn, ...) or "
                        "package.module:ClassName of your own jaxrnn.Cell subclass (made with "
                        "its defaults; its step and backward step are checked first with "
                        "check_cell); repeat for several (default: every built-in cell)")
    g.add_argument("--trials", type=_positive_int, default=12,
                   help="random configurations (default 12)")
    g.add_argument("--max-seq-len", type=_positive_int, default=30, help="largest T (default 30)")
    g.add_argument("--max-hidden", type=_positive_int, default=8, help="largest H (default 8)")
    g.add_argument("--max-layers", type=_positive_int, default=3,
                   help="largest number of layers (default 3)")
    g.add_argument("--no-bidirectional", action="store_true", help="one direction only")
    g.add_argument("--no-lengths", action="store_true", help="no variable lengths")
    fixed = g.add_argument_group("fixed settings (default: drawn at random for each "
                                 "configuration)")
    fixed.add_argument("--seq-len", type=_positive_int, help="T")
    fixed.add_argument("--batch", type=_positive_int, help="B")
    fixed.add_argument("--input-size", type=_positive_int, help="D")
    fixed.add_argument("--hidden", type=_positive_int, help="H")
    fixed.add_argument("--output-size", type=_positive_int, help="O")
    fixed.add_argument("--layers", type=_positive_int, help="number of layers")
    fixed.add_argument("--bidirectional", action="store_true", default=None,
                       help="two directions")
    fixed.add_argument("--nonlinearity", choices=["tanh", "relu"], help="Elman nonlinearity")
    fixed.add_argument("--loss", choices=["half_sse", "mse", "xent"], help="the loss")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_gradcheck)
    return p


# What each command imports before it runs (JAX and the libraries it loads: seconds).
# ``main`` imports them with SIGINT deferred: a Ctrl-C then exits 130 quietly once they
# are in, rather than a traceback from inside an import, a crash in an extension's
# initialisation, or a KeyboardInterrupt that a garbage-collection callback swallows
# (the run then went on).
_IMPORTS = {"train": ("jaxrnn_app.runner",), "sample": ("jaxrnn_app.runner",),
            "explain": ("jax",), "gradcheck": ("jax",)}


@contextlib.contextmanager
def _sigint_deferred():
    """SIGINT during the block is noted, not raised; KeyboardInterrupt after it."""
    got = []
    try:
        old = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if got:
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own options (argparse.REMAINDER cannot pass --help on)
        return _bench_main()(argv[1:])
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's parser says it: its --help, its nearest option
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        with _sigint_deferred():
            import importlib

            for module in _IMPORTS.get(args.command, ()):
                importlib.import_module(module)
        if getattr(args, "cell", None) is None and args.command == "gradcheck":
            from jaxrnn.extend import CELLS

            args.cell = list(CELLS)
        return args.func(args)
    except (ValueError, TypeError, NotImplementedError) as e:
        print(f"jaxrnn {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FloatingPointError, ConnectionError, rundir.WriteFailed) as e:
        # a NaN loss; processes that never met; a write that failed mid-run
        print(f"jaxrnn {args.command}: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # one not turned into a message above: still one line
        print(f"jaxrnn {args.command}: error: {rundir.describe(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"jaxrnn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
