"""Part ``guidance``, continued: each guidance method beside CFG on the class-conditional model.

At each scale w, every method decodes the same x_T under the same labels as `guidance_table`,
and is scored the same way: the classifier's accuracy for the requested digit, FCD, the
fraction of over-exposed pixels and the pixel std ratio. One compiled program per method
(w is traced).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import ddim_jax
from ddim_jax.demo.experiments import Sampler
from ddim_jax.demo.metrics import (
    FeatureNet,
    feature_stats,
    frechet_distance,
    out_of_range_fraction,
    std_ratio,
)
from ddim_jax.demo.train import NULL_LABEL, denoiser_fn

__all__ = ["GUIDERS", "guiders_figure", "guiders_markdown", "guiders_table"]

CFG_PP_PER_W = 1 / 12.5  # CFG++'s lambda for CFG's w: the paper compares lambda = 0.6 with w = 7.5

GUIDERS: dict[str, tuple[str, Callable[[jax.Array, int], ddim_jax.Guider]]] = {
    "cfg": ("CFG", lambda w, s: ddim_jax.cfg(w)),
    "cfg_rescale": ("CFG, rescale 0.7", lambda w, s: ddim_jax.cfg(w, 0.7)),
    "cfg_zero_star": ("CFG-Zero* (1 zero-init step)", lambda w, s: ddim_jax.cfg_zero_star(w, 1)),
    "apg": (
        "APG (eta 0, momentum -0.5, r 2.5)",
        lambda w, s: ddim_jax.apg(w, momentum=-0.5, norm_threshold=2.5, eta=0.0),
    ),
    "tangential_cfg": ("Tangential CFG", lambda w, s: ddim_jax.tangential_cfg(w)),
    "cfg_pp": ("CFG++ (lambda = w / 12.5)", lambda w, s: ddim_jax.cfg_pp(w * CFG_PP_PER_W)),
    "window": (
        "CFG in the window [0.2, 0.8)",
        lambda w, s: ddim_jax.guidance_window(ddim_jax.cfg(w), 0.2, 0.8, conditional_args=(1,)),
    ),
    "schedule": (
        "CFG, w falling linearly to 1",
        lambda w, s: ddim_jax.cfg(ddim_jax.scale_schedule(1 + (w - 1) * jnp.linspace(1.0, 0.0, s))),
    ),
}
"""Method key -> (label, ``factory(w, S) -> Guider``). Settings are the papers' or diffusers',
not tuned on this model."""


def _program(sampler: Sampler, method: str, num_steps: int) -> Callable[..., jax.Array]:
    state = ddim_jax.set_timesteps(ddim_jax.create_state(sampler.config), num_steps)
    model_fn = denoiser_fn(sampler.model)
    factory = GUIDERS[method][1]

    @jax.jit
    def run(params, x_T, labels, w):
        both = jnp.concatenate([jnp.full_like(labels, NULL_LABEL), labels])  # [uncond, cond]
        guider = factory(w, num_steps)
        return ddim_jax.sample(model_fn, state, x_T, model_args=(params, both), guider=guider)

    return run


def guiders_table(
    sampler: Sampler,
    features: FeatureNet,
    x_reference: np.ndarray,
    *,
    scales: Sequence[float],
    num_steps: int,
    per_digit: int,
    seed: int,
    methods: Sequence[str] = tuple(GUIDERS),
) -> tuple[dict[str, Any], dict[tuple[str, float], np.ndarray]]:
    """Each method of `GUIDERS` at each scale w: accuracy, FCD, out-of-range fraction, std ratio.

    The x_T and labels are `guidance_table`'s (``per_digit`` of each digit, eta = 0, S =
    ``num_steps``), so the CFG rows equal its phi = 0 and 0.7 columns.

    Returns:
      ``(table, samples)``: the JSON-ready table (``cells[method][w]``), the samples per (method, w).

    Example (an untrained model; raw pixels stand in for the features, every image called a 0):
      >>> import numpy as np
      >>> from ddim_jax.demo.experiments import Sampler
      >>> from ddim_jax.demo.metrics import FeatureNet
      >>> net = FeatureNet(lambda x: np.reshape(x, (len(x), -1)), 1.0, lambda x: np.zeros(len(x), int))
      >>> x = np.random.default_rng(0).uniform(-1, 1, (30, 8, 8, 1))
      >>> table, _ = guiders_table(Sampler.untrained(), net, x, scales=[3.0], num_steps=2, per_digit=1,
      ...                          seed=0, methods=["cfg", "apg"])
      >>> sorted(table["cells"]), table["cells"]["apg"]["3"]["accuracy"]
      (['apg', 'cfg'], 0.1)
    """
    if features.predict is None:
        raise ValueError("features must have a classifier head (predict) to score the requested digits")
    unknown = [m for m in methods if m not in GUIDERS]
    if unknown:
        raise ValueError(f"methods must be keys of GUIDERS {list(GUIDERS)}, got {unknown}")
    ref = feature_stats(features.features(x_reference))
    labels = np.repeat(np.arange(10), per_digit)
    x_T = jax.random.normal(jax.random.key(seed), (len(labels), 8, 8, 1), jnp.float32)
    cells: dict[str, dict[str, dict[str, float]]] = {}
    samples: dict[tuple[str, float], np.ndarray] = {}
    for method in methods:
        run = _program(sampler, method, num_steps)
        cells[method] = {}
        for w in scales:
            images = np.asarray(run(sampler.params, x_T, jnp.asarray(labels, jnp.int32), jnp.float32(w)))
            samples[(method, w)] = images
            cells[method][f"{w:g}"] = {
                "accuracy": float(np.mean(features.predict(images) == labels)),
                "fcd": frechet_distance(ref, feature_stats(features.features(images))),
                "out_of_range": out_of_range_fraction(images),
                "std_ratio": std_ratio(images, x_reference),
            }
    table = {
        "metric": "accuracy for the requested digit; FCD; fraction of pixels beyond [-1.05, 1.05]; std ratio",
        "num_samples": len(labels),
        "num_steps": num_steps,
        "scales": [float(w) for w in scales],
        "methods": {m: GUIDERS[m][0] for m in methods},
        "cells": cells,
    }
    return table, samples


def guiders_markdown(table: dict[str, Any]) -> str:
    """The table as markdown: a row per method, a column per w, cells ``acc / FCD / out / std``.

    Example:
      >>> cell = {"accuracy": 1.0, "fcd": 12.3, "out_of_range": 0.01, "std_ratio": 1.1}
      >>> t = {"num_samples": 10, "num_steps": 5, "scales": [3.0], "methods": {"cfg": "CFG"},
      ...      "cells": {"cfg": {"3": cell}}}
      >>> print(guiders_markdown(t).splitlines()[4])
      | CFG | 1.00 / 12.3 / 0.010 / 1.10 |
    """
    scales = [f"{w:g}" for w in table["scales"]]
    lines = [
        f"### Guidance methods: {table['num_samples']} samples per cell (10 digits), "
        f"S = {table['num_steps']}",
        "",
        "| method \\ w | " + " | ".join(scales) + " |",
        "|---|" + "---|" * len(scales),
    ]
    for method, label in table["methods"].items():
        row = table["cells"][method]
        cells = [
            f"{c['accuracy']:.2f} / {c['fcd']:.1f} / {c['out_of_range']:.3f} / {c['std_ratio']:.2f}"
            for c in (row[w] for w in scales)
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cells: accuracy for the requested digit / FCD (lower is better) / fraction of pixels beyond "
        "the data's [-1, 1] by more than 0.05 / the samples' pixel std over the data's (1 is right).",
        "",
    ]
    return "\n".join(lines)


def guiders_figure(table: dict[str, Any], path: str | Path) -> None:
    """Writes a labelled 2 x 2 figure (accuracy, FCD, over-exposure, std ratio against w) to ``path``.

    Example:
      >>> import os, tempfile
      >>> cell = {"accuracy": 1.0, "fcd": 12.3, "out_of_range": 0.01, "std_ratio": 1.1}
      >>> t = {"num_samples": 10, "num_steps": 5, "scales": [3.0, 5.0], "methods": {"cfg": "CFG"},
      ...      "cells": {"cfg": {"3": cell, "5": cell}}}
      >>> path = os.path.join(tempfile.mkdtemp(), "g.png")
      >>> guiders_figure(t, path); os.path.getsize(path) > 0
      True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("accuracy", "digit accuracy (higher is better)", "linear"),
        ("fcd", "FCD (lower is better)", "log"),
        ("out_of_range", "over-exposed pixel fraction", "linear"),
        ("std_ratio", "pixel std / data's (1 is right)", "linear"),
    ]
    scales = table["scales"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    for ax, (key, title, scale) in zip(axes.flat, panels, strict=True):
        for method, label in table["methods"].items():
            values = [table["cells"][method][f"{w:g}"][key] for w in scales]
            ax.plot(scales, values, marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("guidance scale w")
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
    axes[1, 1].axhline(1.0, color="gray", lw=0.8, ls="--")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(
        f"Guidance methods on the digits model: {table['num_samples']} samples per point, "
        f"S = {table['num_steps']}"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
