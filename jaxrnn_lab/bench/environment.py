"""The machine and the software a benchmark ran on: versions, CPU, its load, thread counts."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import jax
import numpy as np

import jaxrnn


def torch_module():
    """The ``torch`` module, or None when PyTorch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def version(dist: str) -> str:
    """The installed version of distribution ``dist``, or ``"not installed"``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def numpy_blas() -> str:
    """The BLAS numpy's ``matmul`` calls (name and version), or ``"unknown"``."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas.get('version', '')}".strip()
    except Exception:  # the config's layout is not an API: degrade, never fail the run
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# The CPU features that could run bfloat16 arithmetic natively (the ``*_bf16`` contenders):
# AVX-512 BF16 (dot products of bf16 pairs into float32) and AMX (bf16 matrix tiles).
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")


def cpu_flags(wanted: tuple[str, ...] = BF16_FLAGS) -> list[str] | None:
    """Those of ``wanted`` that ``/proc/cpuinfo`` lists among the CPU's flags; None if unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return None


def transparent_hugepages() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise``, ``never``), or None.

    Under ``madvise`` only memory that asks for huge pages gets them: XLA's buffers
    (plain ``malloc``) do not unless ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` is set,
    and their page faults cost the step time (``jaxrnn_lab/perf/huge_pages.py``).
    """
    try:
        words = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split()
    except OSError:
        return None
    return next((w.strip("[]") for w in words if w.startswith("[")), None)


def cpu_pressure() -> dict | None:
    """Linux PSI: the share of time some runnable task waited for a CPU (avg10/60/300, %)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]  # "some avg10=..."
    except (OSError, IndexError):
        return None
    fields = dict(f.split("=") for f in line.split()[1:])
    return {k: float(fields[k]) for k in ("avg10", "avg60", "avg300") if k in fields}


def load_average() -> list[float] | None:
    """The system's load average over 1, 5 and 15 minutes (what ``uptime`` prints), or None."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def jax_threads() -> int:
    """XLA:CPU sizes its intra-op thread pool to the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def environment(threads: int) -> dict:
    """Versions, CPU, thread counts, XLA flags, memory pages, CPU pressure and load (JSON-ready).

    Args:
        threads: XLA:CPU's intra-op thread count (``jax_threads()``).
    """
    torch = torch_module()
    return {
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": version("jaxlib"), "optax": version("optax"),
                     "torch": torch.__version__ if torch else "not installed",
                     "flax": version("flax"), "numpy": np.__version__,
                     "numpy_blas": numpy_blas(), "jaxrnn": jaxrnn.__version__},
        "cpu": cpu_model(),
        "cpu_bf16_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "threads": {"jax_xla_cpu": threads,
                    "torch_intra_op": torch.get_num_threads() if torch else None,
                    "torch_interop": torch.get_num_interop_threads() if torch else None},
        "jax_devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "transparent_hugepages": transparent_hugepages(),
        "torch_mkldnn": bool(torch.backends.mkldnn.is_available()) if torch else None,
        "platform": platform.platform(),
        "cpu_pressure_start": cpu_pressure(),
        "load_average_start": load_average(),
    }
