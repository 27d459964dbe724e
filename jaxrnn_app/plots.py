"""Figures: learning curves (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def learning_curves(rows: list[dict], path: str | Path, title: str = "learning curves",
                    baseline: float | None = None) -> Path:
    """Training loss (and held-out loss, bits per character) against step, saved as PNG.

    Args:
        rows: the rows of ``metrics.jsonl``: ``step``, ``loss``, optionally
            ``eval_loss`` and ``eval_bpc``.
        path: where to write the PNG.
        title: the figure's title.
        baseline: a horizontal reference line (e.g. the adding problem's 0.167).

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    bpc = [(r["step"], r["eval_bpc"]) for r in rows if r.get("eval_bpc") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), lw=1.2, label="training loss")
    if evals:
        ax.plot(*zip(*evals), "o-", lw=1.5, ms=3, label="held-out loss")
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls="--", lw=1,
                   label=f"best constant prediction {baseline:.3g}")
    values = [v for _, v in train + evals]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if bpc:
        ax2 = ax.twinx()
        ax2.plot(*zip(*bpc), "s:", color="C3", ms=3, lw=1, label="held-out bits/char")
        ax2.set_ylabel("bits per character")
        ax2.legend(loc="upper center", fontsize=8)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
