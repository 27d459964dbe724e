"""Vanishing and exploding gradients in time (Bengio et al. 1994; Pascanu et al. 2013).

Reproduces the classic picture: with the loss on the last step only, the norm of
the backpropagated gradient ||dL/dh_t|| changes geometrically with the distance
T-1-t from the loss. For a tanh Elman network, one BPTT step multiplies the
gradient by diag(tanh'(a_t)) W_hh^T, so (Pascanu et al. 2013, section 2.1) the
gradient must vanish when the largest singular value of W_hh is below 1 (as
tanh' <= 1), and can explode only when it is above 1; while tanh stays linear
the per-step factor tends to the spectral radius of W_hh, and saturation
(tanh' << 1 for large pre-activations) pulls every factor down. The script
rescales W_hh of a default-initialised Elman network to spectral radius 0.5, 1,
1.5 and 2 (eigenvalues by numpy), runs LSTM and GRU at their default (PyTorch)
initialisation, drives each with small inputs (nearly linear tanh) and with
large ones (saturating tanh), and measures ||dL/dh_t|| with the handwritten
reverse scan (``jaxrnn.gradient_diagnostics``, float64 so that norms of 1e-50
are still exact). Over many random networks and batches it reports the
geometric mean, a 10-90 percentile band, and the fitted per-step rate (the
slope of log-norm against distance).

    python experiments/vanishing_gradients.py --quick --out /tmp/vg   # seconds
    python experiments/vanishing_gradients.py     # full: docs/experiments/vanishing_gradients/

Writes ``vanishing_gradients.json`` and ``vanishing_gradients.png`` under ``--out``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from jaxrnn_lab import harness as common  # noqa: E402
import jaxrnn  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Settings:
    seq_len: int = 100  # T: the loss is on step T-1, distances run 0..T-1
    hidden_size: int = 64  # H of every network
    input_size: int = 8  # D of the random inputs
    batch_size: int = 16  # sequences per batch (one batch per seed)
    seeds: int = 32  # random networks + batches per configuration (curves are averaged)
    radii: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)  # spectral radii of the Elman W_hh
    gated: tuple[str, ...] = ("lstm", "gru")  # gated cells, at their default initialisation
    # std of the Gaussian inputs: small (tanh nearly linear), large (tanh saturates)
    input_scales: tuple[float, ...] = (0.01, 5.0)
    fit_from: int = 5  # the rate is fitted over distances fit_from..T-1 (skips the start)
    band: tuple[float, float] = (10.0, 90.0)  # percentiles (over seeds) of the shaded band


FULL = Settings()
QUICK = Settings(seq_len=40, hidden_size=32, batch_size=8, seeds=3)


def configurations(s: Settings) -> list[dict]:
    """Every (cell, radius, input scale) measured, with a label for the figure and the JSON."""
    out = []
    for scale in s.input_scales:
        for r in s.radii:
            out.append({"cell": "elman", "radius": r, "input_scale": scale,
                        "label": f"elman, radius {r:g}"})
        for cell in s.gated:
            out.append({"cell": cell, "radius": None, "input_scale": scale,
                        "label": f"{cell}, default init"})
    return out


def fit_rate(distance: np.ndarray, log_norm: np.ndarray) -> float:
    """The least-squares slope of log-norm against distance: log of the per-step factor."""
    return float(np.polyfit(distance, log_norm, 1)[0])


def measure(s: Settings, config: dict, models: dict) -> dict:
    """||dL/dh_t|| / ||dL/dh_{T-1}|| for ``s.seeds`` random networks and batches of one config."""
    T, B, D = s.seq_len, s.batch_size, s.input_size
    cell = config["cell"]
    if cell not in models:
        model = jaxrnn.RNN(cell=cell, input_size=D, hidden_size=s.hidden_size, output_size=1)
        models[cell] = (model, jax.jit(lambda p, x, m=model: m.features(p, x)[0]))
    model, features = models[cell]
    curves, derivs, sigmas = [], [], []
    for seed in range(s.seeds):
        params = model.init(jax.random.key(seed), jnp.float64)
        if config["radius"] is not None:
            params, sigma = common.with_spectral_radius(params, config["radius"])
            sigmas.append(sigma)
        rng = np.random.default_rng(seed)  # the same inputs for every configuration
        xs = jnp.asarray(config["input_scale"] * rng.standard_normal((T, B, D)))
        targets = jnp.asarray(rng.standard_normal((T, B, 1)))
        diag = jaxrnn.gradient_diagnostics(model, params, xs, targets, loss="mse",
                                           last_only=True)
        norm = np.asarray(diag.dh_norm[0][0])[::-1]  # index = distance T-1-t from the loss
        curves.append(norm / norm[0])
        if cell == "elman":  # how saturated the tanh is: mean tanh'(a_t) = 1 - h_t^2
            derivs.append(float(jnp.mean(1.0 - features(params, xs) ** 2)))
    logc = np.log(np.maximum(np.array(curves), np.finfo(np.float64).tiny))  # (seeds, T)
    distance = np.arange(T)
    geo = np.exp(logc.mean(axis=0))
    lo, hi = np.exp(np.percentile(logc, s.band, axis=0))
    rate = fit_rate(distance[s.fit_from:], logc.mean(axis=0)[s.fit_from:])
    return {
        **config,
        "rate": rate,  # d log||dL/dh_t|| / d distance
        "factor_per_step": math.exp(rate),
        "linear_prediction": (math.log(config["radius"]) if config["radius"] else None),
        "norm_at_max_distance": float(geo[-1]),  # geometric mean of ||dh_0|| / ||dh_{T-1}||
        "mean_tanh_derivative": float(np.mean(derivs)) if derivs else None,
        "sigma_max": float(np.mean(sigmas)) if sigmas else None,
        # per distance 0..T-1, 5 significant digits (keeps the JSON small)
        "geomean": sig(geo), "band_lo": sig(lo), "band_hi": sig(hi),
    }


def sig(a: np.ndarray, digits: int = 5) -> list[float]:
    """The values of ``a`` rounded to ``digits`` significant digits."""
    return [float(f"{v:.{digits - 1}e}") for v in a]


def plot(s: Settings, results: list[dict], path: Path) -> None:
    scales = s.input_scales
    fig, axes = plt.subplots(1, len(scales), figsize=(6.2 * len(scales), 4.8), sharey=True,
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, scale in zip(axes[0], scales):
        rows = [r for r in results if r["input_scale"] == scale]
        for i, r in enumerate(rows):
            d = np.arange(len(r["geomean"]))
            c = colors[i % len(colors)]
            ls = "-" if r["cell"] == "elman" else "--"
            ax.semilogy(d, r["geomean"], ls, color=c,
                        label=f"{r['label']}  (x{r['factor_per_step']:.2f}/step)")
            ax.fill_between(d, r["band_lo"], r["band_hi"], color=c, alpha=0.18, lw=0)
        kind = "tanh nearly linear" if scale < 0.5 else "tanh saturates"
        ax.set_title(f"inputs x ~ N(0, {scale:g}$^2$) ({kind})")
        ax.set_xlabel("distance from the loss, T-1-t (steps)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    axes[0][0].set_ylabel(r"$\|\partial L/\partial h_t\| \;/\; \|\partial L/\partial h_{T-1}\|$")
    fig.suptitle(f"Vanishing and exploding gradients (loss on the last step, T={s.seq_len}, "
                 f"H={s.hidden_size}; geometric mean of {s.seeds} seeds, "
                 f"{s.band[0]:g}-{s.band[1]:g}% band)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(s: Settings, out: Path, progress: bool) -> dict:
    configs = configurations(s)
    models: dict = {}
    with jax.enable_x64(True):  # norms down to ~1e-300 without underflow
        results = [measure(s, c, models)
                   for c in tqdm(configs, desc="configurations", disable=not progress)]
    plot(s, results, out / "vanishing_gradients.png")
    summary = {f"{r['label']}, input std {r['input_scale']:g}": round(r["factor_per_step"], 4)
               for r in results}
    return {"factor_per_step": summary, "configurations": results,
            "figure": "vanishing_gradients.png"}


if __name__ == "__main__":
    sys.exit(common.main("vanishing_gradients", __doc__, FULL, QUICK, run))
