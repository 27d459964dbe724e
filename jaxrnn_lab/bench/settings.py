"""What one benchmark run measures: ``Settings``, grid points, the quick mode, contender names."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

CELLS = ("elman", "lstm", "gru")
# The cells that PyTorch does not have in this form (and the LSTM with a projection),
# each timed at one grid point, bptt against autodiff: name -> RNN options.
CELL_VARIANTS = {
    "indrnn": dict(cell="indrnn", nonlinearity="relu"),
    "peephole_lstm": dict(cell="peephole_lstm"),
    "layernorm_lstm": dict(cell="layernorm_lstm"),
    "lstm_proj": dict(cell="lstm", proj_size="H/4"),  # proj_size = H // 4
}


class GridPoint(NamedTuple):
    """One model size of the grid; input and output size are ``H // 4``."""

    T: int  # sequence length
    B: int  # batch
    H: int  # hidden units of every layer and direction
    num_layers: int = 1  # stacked recurrent layers
    bidirectional: bool = False  # every layer runs in both directions

    @property
    def io_size(self) -> int:
        """The input and the output size, ``max(1, H // 4)``."""
        return max(1, self.H // 4)

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1


def grid_point(point) -> GridPoint:
    """A ``GridPoint`` from ``(T, B, H)`` (one layer) or ``(T, B, H, L, bidirectional)``.

    Raises:
        ValueError: another length, a size that is not a positive integer, or a
            ``bidirectional`` that is not a bool.
    """
    point = tuple(point)
    if len(point) == 3:
        point += (1, False)
    if len(point) != 5:
        raise ValueError(f"grid points must be (T, B, H) or (T, B, H, num_layers, "
                         f"bidirectional), got {point!r}")
    *sizes, bidirectional = point
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"grid point sizes T, B, H, num_layers must be positive integers, "
                         f"got {point!r}")
    if not isinstance(bidirectional, bool):
        raise ValueError(f"grid point's bidirectional must be a bool, got {point!r}")
    return GridPoint(*sizes, bidirectional)


# (T, B, H, num_layers, bidirectional); input and output size are H // 4.
DEFAULT_GRID = (
    GridPoint(100, 32, 128), GridPoint(200, 64, 256), GridPoint(1000, 16, 64),
    GridPoint(100, 128, 512), GridPoint(100, 32, 128, 2, True))


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one benchmark run measures.

    ``grid`` accepts ``(T, B, H)`` triples (one unidirectional layer) and
    ``(T, B, H, num_layers, bidirectional)`` tuples; it is stored as ``GridPoint``s.
    """

    cells: tuple[str, ...] = CELLS
    grid: tuple[GridPoint, ...] = DEFAULT_GRID
    variants: tuple[str, ...] = tuple(CELL_VARIANTS)  # names of CELL_VARIANTS
    variant_point: GridPoint = GridPoint(100, 32, 128)  # where the variants are timed
    repeats: int = 10  # timed rounds; each times one step of every contender
    warmup: int = 2  # untimed steps of every contender (and calls of every floor kernel)
    floor_repeats: int = 7  # timed calls of every kernel on every product of the floor
    lr: float = 1e-3  # Adam's learning rate, on every side
    seed: int = 0  # weights and data
    torch_memory: bool = True  # profile one extra PyTorch step for its peak memory
    torch_single_thread: bool = True  # also time PyTorch on 1 thread ("torch_1t")
    bf16: bool = True  # also time bptt and autodiff with compute_dtype=bfloat16 ("*_bf16")
    budget_s: float = 60.0  # cap on one contender's (one floor kernel's) timed seconds per point

    def __post_init__(self):
        unknown = [c for c in self.cells if c not in CELLS]
        if not self.cells or unknown:
            raise ValueError(f"cells must be a non-empty subset of elman, lstm, gru, "
                             f"got {self.cells!r}")
        unknown = [c for c in self.variants if c not in CELL_VARIANTS]
        if unknown:
            raise ValueError(f"variants must be a subset of {', '.join(CELL_VARIANTS)}, "
                             f"got {self.variants!r}")
        object.__setattr__(self, "variant_point", grid_point(self.variant_point))
        if not self.grid:
            raise ValueError("grid must hold at least one point, got ()")
        object.__setattr__(self, "grid", tuple(grid_point(p) for p in self.grid))
        for name in ("repeats", "floor_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.budget_s > 0:
            raise ValueError(f"budget_s must be > 0, got {self.budget_s}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the first step is not timed), "
                             f"got {self.warmup}")


QUICK = Settings(grid=(GridPoint(20, 4, 16),), repeats=5, warmup=1, floor_repeats=3,
                 variants=("lstm_proj",), variant_point=GridPoint(20, 4, 16))

# jaxrnn's steps in mixed precision: name -> (method, compute_dtype). Float32 parameters,
# Adam state and batch as the float32 steps; each recurrent step's products and gate
# math in bfloat16 (``jaxrnn.RNN(compute_dtype=...)``).
MIXED_PRECISION = {"bptt_bf16": ("bptt", "bfloat16"), "autodiff_bf16": ("autodiff", "bfloat16")}

# The timed programs, in the order of the table; the first seven are full training steps.
STEPS = ("bptt", "autodiff", *MIXED_PRECISION, "torch", "torch_1t", "flax")
CONTENDERS = STEPS + ("xla_chain",)
# Every entry of a point's ``methods``: the contenders and the product floor.
METHODS = CONTENDERS + ("floor",)
