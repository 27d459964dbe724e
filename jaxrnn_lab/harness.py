"""What every experiment script shares: its command line, its output files, its figure style.

Each experiment is one script with its settings in a frozen dataclass ``Settings``
and a ``QUICK`` instance (seconds, run by the tests); ``main(argv)`` here parses

    python experiments/NAME.py [--quick] [--out DIR] [--no-progress]

(plus a script's own options, ``Option``, whose values ``run`` gets as keyword
arguments), runs ``run(settings, out, progress) -> dict`` and writes
``DIR/NAME.json`` (the settings, the environment and the results). A
``UsageError`` raised by ``run`` before it writes anything is a refused command
line: one line on stderr, exit status 2. Figures are written by the script
itself as ``DIR/*.png``. Scripts import this module as ``common`` (Python puts the
script's folder first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, NamedTuple


class Option(NamedTuple):
    """An extra command-line option of one script: ``parser.add_argument(flag, **kwargs)``.

    Its value reaches ``run`` as a keyword argument (``--only`` -> ``only=``).
    """

    flag: str
    kwargs: dict


class UsageError(ValueError):
    """A refused command line found by ``run`` before it writes anything: ``main``
    prints its message as one line and exits with status 2."""


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def with_spectral_radius(params, radius: float):
    """``params`` (an ``RNNParams``) with the first layer's ``W_hh`` rescaled to spectral radius ``radius``.

    Returns:
        ``(params, sigma)``: the new parameters and the largest singular value of
        the rescaled ``W_hh`` (Pascanu et al.'s sufficient condition for vanishing
        gradients is sigma < 1 for tanh).
    """
    import jax.numpy as jnp
    import numpy as np

    cell = params.layers[0][0]
    w = np.asarray(cell.w_hh, dtype=np.float64)
    w = w * (radius / np.max(np.abs(np.linalg.eigvals(w))))
    cell = cell._replace(w_hh=jnp.asarray(w, cell.w_hh.dtype))
    layers = ((cell,) + tuple(params.layers[0][1:]),) + tuple(params.layers[1:])
    return params._replace(layers=layers), float(np.linalg.norm(w, 2))


def versions() -> dict[str, str]:
    """Versions of the libraries an experiment's numbers depend on, and the CPU."""
    out = {"python": platform.python_version(), "machine": platform.machine(),
           "cpus": str(os.cpu_count())}
    for dist in ("jax", "jaxlib", "optax", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, tuples, numpy / jax scalars and arrays -> plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / jax arrays and scalars
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and obj != obj:
        return None  # NaN is not JSON
    return obj


def write_json(path: Path, obj: Any) -> Path:
    """Writes ``obj`` as JSON atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(to_jsonable(obj), f, indent=1)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone to read
    os.replace(tmp, path)
    return path


def parse_args(name: str, doc: str | None, argv: list[str] | None,
               options: tuple[Option, ...] = ()) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"experiments/{name}.py", description=(doc or "").strip().split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings that finish in seconds (what the tests run)")
    parser.add_argument("--out", default=None,
                        help=f"output directory (default: runs/{name}-quick or docs/experiments/{name})")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    for opt in options:
        parser.add_argument(opt.flag, **opt.kwargs)
    return parser.parse_args(argv)


def run_worker(worker: str, arg: Any, env: dict[str, str]) -> dict:
    """Runs the Python source ``worker`` in a fresh process with ``env`` added to the environment.

    Settings read once at start-up (``XLA_FLAGS`` by XLA, ``GLIBC_TUNABLES`` by the C
    library) need a process each. ``worker`` gets ``json.dumps(arg)`` as
    ``sys.argv[1]`` and prints its result as one line ``RESULT <json>``.

    Returns:
        ``{"status": "ok", "rows": <the worker's JSON>}``, or a status
        ``"failed (exit N): [last stderr line]"`` (an unknown flag aborts jaxlib).
    """
    import subprocess

    proc = subprocess.run([sys.executable, "-c", worker, json.dumps(arg)],
                          env=dict(os.environ, **env), capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"status": f"failed (exit {proc.returncode}): "
                          f"{proc.stderr.strip().splitlines()[-1:]}"}
    return {"status": "ok", "rows": json.loads(lines[-1][len("RESULT "):])}


def run_with_xla_flags(worker: str, arg: Any, flags: str) -> dict:
    """``run_worker`` with ``XLA_FLAGS=flags``; the result also names the flags."""
    return {"flags": flags, **run_worker(worker, arg, {"XLA_FLAGS": flags})}


def main(name: str, doc: str | None, settings_full: Any, settings_quick: Any,
         run: Callable[..., dict], argv: list[str] | None = None,
         options: tuple[Option, ...] = ()) -> int:
    """The command line of an experiment script: parse, run, write ``OUT/NAME.json``.

    Args:
        name: the script's name (the JSON file's and the default folder's).
        doc: the script's docstring (its first line is the ``--help`` description).
        settings_full, settings_quick: the two ``Settings`` instances.
        run: ``run(settings, out_dir, progress) -> results`` (JSON-ready), writing
            its own figures under ``out_dir``.
        argv: the arguments (default: ``sys.argv[1:]``).
        options: the script's extra options; ``run`` gets their values as keyword
            arguments.

    Returns:
        The exit status: 0, or 2 for a bad ``--out`` (a file, not a folder) or a
        ``UsageError`` from ``run`` (then a folder this call made is removed again).
    """
    args = parse_args(name, doc, argv, options)
    extras = {opt.flag.lstrip("-").replace("-", "_"): None for opt in options}
    extras = {k: getattr(args, k) for k in extras}
    settings = settings_quick if args.quick else settings_full
    out = Path(args.out if args.out else
               (f"runs/{name}-quick" if args.quick else f"docs/experiments/{name}"))
    if out.exists() and not out.is_dir():
        print(f"experiments/{name}.py: error: --out {out} is a file, not a directory",
              file=sys.stderr)
        return 2
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        results = run(settings, out, not args.no_progress, **extras)
    except UsageError as e:
        if made and not any(out.iterdir()):
            out.rmdir()
        print(f"experiments/{name}.py: error: {e}", file=sys.stderr)
        return 2
    record = {"experiment": name, "quick": bool(args.quick), "settings": settings,
              "environment": versions(), "wall_s": time.perf_counter() - t0,
              "results": results}
    path = write_json(out / f"{name}.json", record)
    print(f"wrote {path} and the figures in {out}/ ({record['wall_s']:.0f} s)")
    return 0
