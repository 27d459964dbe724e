"""The command line of the benchmark: ``jaxrnn bench``, ``python -m jaxrnn_lab.bench``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from jaxrnn_app.cli import BENCH_QUICK_TIME, Parser
from jaxrnn_lab.bench.settings import CELL_VARIANTS, CELLS, QUICK, Settings


def parse_point(text: str) -> tuple:
    """A ``--grid`` point: ``T,B,H``, ``T,B,H,L`` or ``T,B,H,L,bi`` (``uni``: one direction).

    Raises:
        ValueError: another form, naming ``--grid``.
    """
    fields = text.split(",")
    try:
        if len(fields) not in (3, 4, 5) or (len(fields) == 5 and fields[4] not in ("bi", "uni")):
            raise ValueError
        sizes = tuple(int(f) for f in fields[:4])
    except ValueError:
        raise ValueError(f"--grid points must be T,B,H[,L[,bi|uni]], got {text!r}") from None
    return sizes + (1,) * (4 - len(sizes)) + (len(fields) == 5 and fields[4] == "bi",)


def parse_args(argv) -> argparse.Namespace:
    parser = Parser(  # the command's: errors in one line, defaults in the help
        prog="jaxrnn bench", description="Times one training step of jaxrnn (bptt, autodiff), "
        "PyTorch and Flax, and the product floor (the step's matrix products alone, fastest "
        "kernel each), on a grid of sizes.")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny sizes and few repeats ({BENCH_QUICK_TIME}; what the tests "
                             f"run) (default: the full grid, much longer)")
    parser.add_argument("--cells", nargs="+", choices=CELLS,
                        help="cells to run (default: all three)")
    parser.add_argument("--variants", nargs="*", choices=list(CELL_VARIANTS),
                        help="cell variants to time, bptt against autodiff, at one point "
                             "(default: all; give none to skip them)")
    parser.add_argument("--grid", nargs="+", metavar="T,B,H[,L[,bi|uni]]",
                        help="grid points (default: the full or the quick grid); input and "
                             "output size H/4, L layers (default 1), bi: both directions")
    parser.add_argument("--repeats", type=int, help="timed rounds of the steps per grid point")
    parser.add_argument("--floor-repeats", type=int,
                        help="timed runs of every kernel on every product of the floor")
    parser.add_argument("--no-bf16", action="store_true",
                        help="do not time bptt and autodiff with compute_dtype=bfloat16 "
                             "(default: timed beside float32)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: runs/benchmark-TIME)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command line: run the benchmark, write its outputs; the exit status (2: bad settings)."""
    args = parse_args(argv)
    try:
        settings = QUICK if args.quick else Settings()
        changes = {}
        if args.cells:
            changes["cells"] = tuple(dict.fromkeys(args.cells))
        if args.variants is not None:
            changes["variants"] = tuple(dict.fromkeys(args.variants))
        if args.grid:
            changes["grid"] = tuple(parse_point(p) for p in args.grid)
        if args.repeats is not None:
            changes["repeats"] = args.repeats
        if args.floor_repeats is not None:
            changes["floor_repeats"] = args.floor_repeats
        if args.no_bf16:
            changes["bf16"] = False
        settings = dataclasses.replace(settings, **changes)
    except ValueError as e:
        print(f"jaxrnn bench: error: {e} (see jaxrnn bench --help)", file=sys.stderr)
        return 2
    out = args.out or f"runs/benchmark-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.quick:
        print(f"bench --quick: {BENCH_QUICK_TIME}; writing {out}", file=sys.stderr, flush=True)
    # imported here, so that --help and bad options answer without importing JAX
    from jaxrnn_lab.bench.report import write_outputs
    from jaxrnn_lab.bench.run import run_benchmark

    bench = run_benchmark(settings, progress=not args.no_progress)
    argv = sys.argv[1:] if argv is None else argv
    bench["command"] = " ".join(["python -m jaxrnn_lab.bench", *argv])  # what reproduces it
    paths = write_outputs(bench, out)
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
