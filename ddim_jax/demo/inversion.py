"""Exact inversion and editing on the class-conditional digits model: DDIM inversion, EDICT, BDIA.

Each method encodes held-out digits to noise under their own label (classifier-free guidance
at scale w both ways) and decodes the latents twice: under the same label (the reconstruction;
exact for EDICT and BDIA) and under another digit (the edit, ``d -> (d + 5) % 10``, e.g.
3 -> 8). `inversion_table` reports, per method, w and S, the reconstruction MSE ([0, 1]
pixels, as Table 2), the largest round-trip error, the classifier's accuracy for the edit's
target digit and the edit's distance to the original; `inversion_grid` shows them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ddim_jax.demo.data import to_unit_range
from ddim_jax.demo.experiments import Sampler
from ddim_jax.demo.metrics import FeatureNet

__all__ = [
    "EDIT_SHIFT",
    "METHODS",
    "edit_targets",
    "inversion_grid",
    "inversion_markdown",
    "inversion_table",
    "run_inversion_part",
]

METHODS = ("ddim", "edict", "bdia")
"""Inversion methods: ``ddim`` (`ddim_jax.invert`, `ddim_jax.sample`), ``edict``, ``bdia``."""

EDIT_SHIFT = 5
"""Edits turn digit ``d`` into ``(d + EDIT_SHIFT) % 10``."""


def edit_targets(labels: np.ndarray) -> np.ndarray:
    """The target digit of each edit: ``(label + EDIT_SHIFT) % 10``.

    Example:
      >>> edit_targets(np.array([3, 8, 0])).tolist()
      [8, 3, 5]
    """
    return (np.asarray(labels) + EDIT_SHIFT) % 10


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((to_unit_range(a) - to_unit_range(b)) ** 2))


def _swap_distance(x0: np.ndarray, labels: np.ndarray, targets: np.ndarray) -> float | None:
    """Mean MSE ([0, 1] pixels) between each digit and the other digits of its target label in ``x0``."""
    pairs = [_mse(x0[i : i + 1], x0[labels == t]) for i, t in enumerate(targets) if np.any(labels == t)]
    return float(np.mean(pairs)) if pairs else None


def inversion_table(
    sampler: Sampler,
    features: FeatureNet,
    x0: np.ndarray,
    labels: np.ndarray,
    *,
    steps: Sequence[int],
    guidance_scales: Sequence[float],
    methods: Sequence[str] = METHODS,
) -> tuple[dict[str, Any], dict[tuple[str, float, int], tuple[np.ndarray, np.ndarray]]]:
    """Reconstructions and edits of ``x0`` per method, guidance scale w and S, with their metrics.

    Returns:
      ``(table, images)``: the table as a JSON-ready dict, keyed ``[method]["w"][str(S)]``:
      ``mse`` (reconstruction, [0, 1] pixels), ``max_rel_err`` (largest |error| over max |x0|,
      [-1, 1] units), ``edit_accuracy`` (the classifier's accuracy for the target digit),
      ``edit_distance`` (the edit's MSE to the original, [0, 1] pixels) and ``seconds`` (per
      cell, compilation included); and ``images[method, w, S] = (reconstruction, edit)``.

    Example (an untrained model; raw pixels and a constant guess stand in for the classifier):
      >>> from ddim_jax import DDIMConfig
      >>> sampler = Sampler.untrained(config=DDIMConfig(clip_sample=False))
      >>> guess = FeatureNet(lambda x: x.reshape(len(x), -1), 1.0, lambda x: np.full(len(x), 8))
      >>> x0, labels = np.zeros((2, 8, 8, 1)), np.array([3, 1])
      >>> table, images = inversion_table(sampler, guess, x0, labels, steps=[2], guidance_scales=[1.0])
      >>> table["cells"]["bdia"]["1"]["2"]["edit_accuracy"], images["edict", 1.0, 2][1].shape
      (0.5, (2, 8, 8, 1))
    """
    labels = np.asarray(labels)
    targets = edit_targets(labels)
    scale = float(np.max(np.abs(x0))) or 1.0
    cells: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    images = {}
    for method in methods:
        cells[method] = {}
        for w in guidance_scales:
            row = cells[method][f"{w:g}"] = {}
            for s in steps:
                start = time.perf_counter()
                recon, edited = sampler.edit(x0, s, labels, targets, w, method)
                row[str(s)] = {
                    "mse": _mse(recon, x0),
                    "max_rel_err": float(np.max(np.abs(recon - x0)) / scale),
                    "edit_accuracy": float(np.mean(features.predict(edited) == targets)),
                    "edit_distance": _mse(edited, x0),
                    "seconds": time.perf_counter() - start,
                }
                images[method, w, s] = (recon, edited)
    table = {
        "metric": (
            "invert under the digit's label, sample under the same label (reconstruction: MSE on [0, 1] "
            f"pixels) and under (digit + {EDIT_SHIFT}) % 10 (edit: classifier accuracy for the target, "
            "MSE to the original); classifier-free guidance at w both ways"
        ),
        "num_digits": len(x0),
        "steps": list(steps),
        "guidance_scales": list(guidance_scales),
        "cells": cells,
        "original_accuracy": float(np.mean(features.predict(x0) == labels)),
        "original_target_accuracy": float(np.mean(features.predict(x0) == targets)),
        "swap_distance": _swap_distance(x0, labels, targets),
        "config": sampler.config.to_dict(),
    }
    return table, images


def inversion_grid(
    x0: np.ndarray,
    images: dict[tuple[str, float, int], tuple[np.ndarray, np.ndarray]],
    guidance_scale: float,
    num_steps: int,
    ncols: int = 10,
) -> np.ndarray:
    """Rows of images in [0, 1]: the originals, then per method its reconstructions and its edits.

    Example:
      >>> x = np.zeros((3, 8, 8, 1))
      >>> inversion_grid(x, {("ddim", 1.0, 5): (x, x), ("bdia", 1.0, 5): (x, x)}, 1.0, 5).shape
      (15, 8, 8, 1)
    """
    rows = [x0[:ncols]]
    for (_, w, s), pair in images.items():
        if w == guidance_scale and s == num_steps:
            rows += [batch[:ncols] for batch in pair]
    return to_unit_range(np.concatenate(rows))


def inversion_markdown(table: dict[str, Any]) -> str:
    """Renders `inversion_table`'s table as markdown.

    Example:
      >>> cell = {"mse": 1e-14, "max_rel_err": 3e-7, "edit_accuracy": 0.9, "edit_distance": 0.05}
      >>> t = {"steps": [10], "num_digits": 4, "cells": {"bdia": {"3": {"10": cell}}},
      ...      "original_accuracy": 1.0, "original_target_accuracy": 0.0, "swap_distance": 0.1}
      >>> print(inversion_markdown(t).splitlines()[4])
      | bdia | 3 | 1.00e-14 / 3.0e-07 / 0.90 / 0.050 |
    """
    steps = table["steps"]
    swap = table["swap_distance"]
    lines = [
        f"### Inversion and editing: {table['num_digits']} held-out digits, d -> (d + {EDIT_SHIFT}) % 10",
        "",
        "| method | w | "
        + " | ".join(f"S = {s}: MSE / max err / edit acc / edit dist" for s in steps)
        + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for method, rows in table["cells"].items():
        for w, row in rows.items():
            cells = [
                f"{c['mse']:.2e} / {c['max_rel_err']:.1e} / "
                f"{c['edit_accuracy']:.2f} / {c['edit_distance']:.3f}"
                for c in (row[str(s)] for s in steps)
            ]
            lines.append(f"| {method} | {w} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "MSE: reconstruction (invert, then sample under the same label and w), [0, 1] pixels; max err: its "
        "largest |error| over max |x0|; edit acc: the classifier's accuracy for the target digit; edit dist: "
        f"the edit's MSE to the original. Originals: accuracy {table['original_accuracy']:.2f} for their own "
        f"digit, {table['original_target_accuracy']:.2f} for the target; MSE between a digit and held-out "
        f"digits of its target class: {'n/a' if swap is None else f'{swap:.3f}'}.",
    ]
    return "\n".join(lines) + "\n"


def run_inversion_part(
    sampler: Sampler,
    features: FeatureNet,
    x0: np.ndarray,
    labels: np.ndarray,
    out: Path,
    *,
    steps: Sequence[int],
    guidance_scales: Sequence[float],
    figures: dict[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, str], str]:
    """``ddim-jax demo --parts inversion``: the table, one PNG grid per w (at the smallest S), markdown.

    Returns ``(table, files, markdown)``; `ddim_jax.demo.cli.run_demo` adds them to the results.
    With a ``figures`` dict, each grid is also drawn as a labelled figure
    (`ddim_jax.demo.figures.image_rows`) and recorded there.

    Example (an untrained model; a constant guess stands in for the classifier):
      >>> import tempfile
      >>> from ddim_jax import DDIMConfig
      >>> sampler = Sampler.untrained(config=DDIMConfig(clip_sample=False))
      >>> guess = FeatureNet(lambda x: x.reshape(len(x), -1), 1.0, lambda x: np.full(len(x), 8))
      >>> x0, labels = np.zeros((2, 8, 8, 1)), np.array([3, 1])
      >>> with tempfile.TemporaryDirectory() as d:
      ...     table, files, text = run_inversion_part(sampler, guess, x0, labels, Path(d),
      ...                                             steps=[2], guidance_scales=[2.0])
      >>> sorted(table["cells"]), files
      (['bdia', 'ddim', 'edict'], {'inversion_w2': 'inversion_w2_S2.png'})
    """
    from ddim_jax.demo.png import image_grid, write_png

    table, images = inversion_table(
        sampler, features, x0, labels, steps=steps, guidance_scales=guidance_scales
    )
    s_grid, ncols = min(steps), min(10, len(x0))
    files = {}
    for w in guidance_scales:
        name = files[f"inversion_w{w:g}"] = f"inversion_w{w:g}_S{s_grid}.png"
        grid = inversion_grid(x0, images, w, s_grid, ncols)
        write_png(out / name, image_grid(grid, ncols=ncols))
        if figures is not None:
            from ddim_jax.demo.figures import image_rows

            rows = ["original"] + [
                f"{m}: {kind}"
                for (m, w_, s) in images
                if w_ == w and s == s_grid
                for kind in ("round trip", "edit")
            ]
            title = (
                f"Inversion, w = {w:g}, S = {s_grid}: round trip under d, edit d -> (d + {EDIT_SHIFT}) % 10"
            )
            name = figures[f"inversion_w{w:g}"] = f"inversion_w{w:g}_S{s_grid}_labelled.png"
            image_rows(2.0 * grid - 1.0, rows, title, out / name)
    markdown = inversion_markdown(table) + (
        f"\nRows of {', '.join(files.values())}: originals, then per method ({', '.join(METHODS)}) "
        f"its reconstructions and its edits, at S = {s_grid}.\n"
    )
    return table, files, markdown
