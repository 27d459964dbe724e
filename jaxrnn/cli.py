"""The ``jaxrnn`` command (also ``python -m jaxrnn``).

Subcommands:

* ``explain``: the reference worked example, step by step, computed by the library;
* ``train``: a jit-compiled training run with a progress bar, writing its outputs
  to a directory;
* ``gradcheck``: handwritten BPTT vs ``jax.grad`` vs finite differences, in float64.

Bad input is reported as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad command-line input that argparse itself cannot see."""


def _csv_floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return v


# --- explain -----------------------------------------------------------------

def cmd_explain(args) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from jaxrnn.explain import format_walkthrough, walkthrough
    from jaxrnn.tasks import reference_example

    if args.targets is not None and len(args.targets) != len(args.x):
        raise UsageError(f"--targets needs one value per input: {len(args.x)} inputs (--x), "
                         f"got {len(args.targets)} targets")
    targets = args.targets if args.targets is not None else [0.5 * v for v in args.x]
    ex = reference_example(xs=args.x, targets=targets, w_xh=args.w_xh, w_hh=args.w_hh, w_hy=args.w_hy, h0=args.h0,
                           lr=args.lr, dtype=jnp.float64)
    print(format_walkthrough(walkthrough(ex)))
    return 0


# --- train -------------------------------------------------------------------

def _out_dir(args) -> Path:
    if args.out is not None:
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise UsageError(f"--out {out} already holds a run; choose another directory")
        return out
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{args.task}-{stamp}"
    n = 1
    while out.exists():
        n += 1
        out = Path("runs") / f"{args.task}-{stamp}-{n}"
    return out


def cmd_train(args) -> int:
    import jax
    import numpy as np

    from jaxrnn.plots import learning_curve
    from jaxrnn.tasks import reference_example
    from jaxrnn.train import fit, make_optimizer, make_train_step

    optimizer = make_optimizer(args.optimizer, args.lr, args.clip)
    ex = reference_example()
    model, params, batch, loss = ex.model, ex.params, ex.batch, "half_sse"
    out = _out_dir(args)

    step = make_train_step(model, optimizer, loss=loss, method=args.method)
    opt_state = optimizer.init(params)
    result = fit(step, params, opt_state, batch, args.steps, target_loss=args.target_loss,
                 log_every=args.log_every, progress=not args.no_progress, desc=args.task)

    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    config.update(model=model.__class__.__name__, cell=model.cell,
                  input_size=model.input_size, hidden_size=model.hidden_size,
                  output_size=model.output_size, loss=loss,
                  jax_version=jax.__version__, backend=jax.default_backend())
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    with open(out / "metrics.jsonl", "w") as f:
        for row in result.history:
            f.write(json.dumps(row) + "\n")
    rnn_sd, readout_sd = model.to_torch(result.params)
    np.savez(out / "params.npz", **{f"rnn.{k}": v for k, v in rnn_sd.items()},
             **{f"readout.{k}": v for k, v in readout_sd.items()})
    learning_curve(result.history, out / "loss.png", title=f"{args.task}: {loss} ({args.method})")

    last = result.history[-1]
    status = (f"reached --target-loss {args.target_loss:g}" if result.stopped_early
              else f"ran all {args.steps} steps")
    print(f"{args.task}: loss {result.history[0]['loss']:.4g} -> {last['loss']:.4g} after "
          f"{last['step']} steps ({status})")
    print(f"compile {result.compile_s:.2f} s, then {result.steps_per_s:,.0f} steps/s "
          f"(method={args.method}, optimizer={args.optimizer}, lr={args.lr:g})")
    print(f"wrote {out}/: config.json, metrics.jsonl, params.npz, loss.png")
    return 0


# --- gradcheck ---------------------------------------------------------------

def cmd_gradcheck(args) -> int:
    import jax

    from jaxrnn.gradcheck import BPTT_TOL, FD_TOL, check_config, format_results, random_configs

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
    results = []
    from tqdm.auto import tqdm

    for i, cfg in enumerate(tqdm(configs, desc="gradcheck", disable=args.no_progress)):
        results.append(check_config(cfg, jax.random.fold_in(key, i)))
    print(format_results(results))
    bad = [i for i, r in enumerate(results) if not r.ok]
    worst = max(r.bptt_vs_autodiff for r in results)
    if bad:
        print(f"MISMATCH in {len(bad)} of {len(results)} configurations: {bad} "
              f"(tolerances: bptt vs autodiff {BPTT_TOL:g}, finite differences {FD_TOL:g})")
        return 1
    print(f"all {len(results)} configurations agree: max relative error bptt vs autodiff "
          f"{worst:.1e} (tolerance {BPTT_TOL:g}), finite differences within {FD_TOL:g}")
    return 0


# --- parser ------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxrnn", description="Recurrent networks in JAX with handwritten BPTT.")
    from jaxrnn import __version__

    p.add_argument("--version", action="version", version=f"jaxrnn {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

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

    t = sub.add_parser("train", help="train a model (default: the reference example)",
                       description="Trains with a jit-compiled optax step and writes "
                                   "config.json, metrics.jsonl, params.npz and loss.png.")
    t.add_argument("--task", choices=["example"], default="example",
                   help="what to train on (default: the reference example)")
    t.add_argument("--method", choices=["bptt", "autodiff"], default="bptt",
                   help="gradient: handwritten BPTT or jax.grad (default bptt)")
    t.add_argument("--optimizer", default="adam", help="any optax optimizer name (default adam)")
    t.add_argument("--lr", type=_positive_float, default=0.02, help="learning rate (default 0.02)")
    t.add_argument("--clip", type=_positive_float, default=None,
                   help="clip the global gradient norm (optax chain)")
    t.add_argument("--steps", type=_positive_int, default=10000,
                   help="maximum number of steps (default 10000)")
    t.add_argument("--target-loss", type=float, default=1e-4,
                   help="stop once the loss is at or below this (default 1e-4)")
    t.add_argument("--log-every", type=_positive_int, default=1,
                   help="record metrics every N steps (default 1)")
    t.add_argument("--out", default=None, help="output directory (default runs/TASK-TIME)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("gradcheck", help="check bptt against jax.grad and finite differences",
                       description="Draws random configurations and compares the handwritten "
                                   "BPTT gradient with jax.grad and with central finite "
                                   "differences in float64. Exit status 1 on a mismatch.")
    g.add_argument("--cell", action="append", choices=["elman", "lstm", "gru"], default=None,
                   help="cell(s) to check; repeat for several (default: all three)")
    g.add_argument("--trials", type=_positive_int, default=12,
                   help="random configurations (default 12)")
    g.add_argument("--max-seq-len", type=_positive_int, default=30, help="largest T (default 30)")
    g.add_argument("--max-hidden", type=_positive_int, default=8, help="largest H (default 8)")
    g.add_argument("--max-layers", type=_positive_int, default=3,
                   help="largest number of layers (default 3)")
    g.add_argument("--no-bidirectional", action="store_true", help="one direction only")
    g.add_argument("--no-lengths", action="store_true", help="no variable lengths")
    fixed = g.add_argument_group("fixed settings (override the random draw)")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "cell", None) is None and args.command == "gradcheck":
        args.cell = ["elman", "lstm", "gru"]
    try:
        return args.func(args)
    except (ValueError, TypeError, NotImplementedError) as e:
        print(f"jaxrnn {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as e:
        print(f"jaxrnn {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"jaxrnn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
