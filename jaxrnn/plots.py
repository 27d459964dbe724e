"""Figures: learning curves (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def learning_curve(history: list[dict], path: str | Path, title: str = "training loss",
                   key: str = "loss") -> Path:
    """Plots ``key`` against ``step`` on a log scale and saves a PNG.

    Args:
        history: dicts with ``step`` and ``key``, as ``train.fit`` returns.
        path: where to write the PNG.
        title: the figure's title.
        key: the metric to plot.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    values = [h[key] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(steps, values, lw=1.5)
    if values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
