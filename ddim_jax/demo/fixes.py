"""Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed") in miniature.

`brightness_table`: does the sampler reproduce the spread of the data's per-image brightness?
With a schedule whose terminal SNR is not zero, the model learns to read the low frequencies
(the mean brightness) from x_T, so sampling from pure noise gives mid-gray images only. The
paper's fixes: rescale to zero terminal SNR, train with v-prediction, start sampling at the
last timestep (trailing spacing).

`guidance_table`: classifier-free guidance at growing scale w, with and without the guidance
rescale phi (Lin et al. Alg. 2): high w over-exposes, phi = 0.7 is meant to fix it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax.demo.data import mean_brightness
from ddim_jax.demo.experiments import Sampler, balanced_labels
from ddim_jax.demo.metrics import (
    FeatureNet,
    feature_stats,
    frechet_distance,
    out_of_range_fraction,
    std_ratio,
    wasserstein_1d,
)

__all__ = ["CONFIG_NAMES", "brightness_table", "guidance_table", "fixes_markdown", "guidance_grid_images"]

CONFIG_NAMES = {
    "a": "SD: scaled_linear, epsilon, leading, steps_offset 1",
    "b": "zero-SNR, v-prediction, leading",
    "c": "zero-SNR, v-prediction, trailing (the paper's fix)",
}
"""The sampler settings `brightness_table` compares, as the demo names them."""


def brightness_table(
    samplers: Mapping[str, Sampler],
    features: FeatureNet,
    x_reference: np.ndarray,
    x_real_test: np.ndarray,
    *,
    steps: Sequence[int],
    num_samples: int,
    seed: int,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Per sampler and S: the per-image brightness of samples against real data's.

    Every cell decodes the same ``num_samples`` x_T at eta = 0, class-conditional without
    guidance, the ten digits in equal shares (`balanced_labels`). Columns:
    the 1-D Wasserstein distance between the samples' and the held-out data's per-image
    mean brightness ([0, 1] scale, `mean_brightness`), the ratio of their standard
    deviations (1 is right; below 1 the samples are too uniformly gray), the mean
    brightness, and the FCD to ``x_reference``. The floor, ``real_data``: the same
    measures for ``num_samples`` reference images against the held-out ones.

    Returns:
      ``(table, samples)``: the JSON-ready table, and each sampler's samples at the largest S.

    Example (raw pixels stand in for the classifier's features):
      >>> import numpy as np
      >>> from ddim_jax.demo.experiments import Sampler
      >>> from ddim_jax.demo.metrics import FeatureNet
      >>> pixels = FeatureNet(lambda x: np.reshape(x, (len(x), -1)), accuracy=1.0)
      >>> x = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1))
      >>> samplers = {"a": Sampler.untrained()}
      >>> table, _ = brightness_table(samplers, pixels, x, x, steps=[2], num_samples=3, seed=0)
      >>> sorted(table["configs"]["a"]["2"])
      ['fcd', 'mean', 'std_ratio', 'w1']
    """
    ref = feature_stats(features.features(x_reference))
    real = mean_brightness(x_real_test)
    floor = mean_brightness(x_reference[:num_samples])
    x_T = jax.random.normal(jax.random.key(seed), (num_samples, 8, 8, 1), jnp.float32)
    labels = balanced_labels(num_samples)
    configs: dict[str, dict[str, dict[str, float]]] = {}
    last: dict[str, np.ndarray] = {}
    for name, sampler in samplers.items():
        row = {}
        for s in steps:
            images = sampler.sample(x_T, s, 0.0, jax.random.key(seed), labels=labels)
            bright = mean_brightness(images)
            row[str(s)] = {
                "w1": wasserstein_1d(bright, real),
                "std_ratio": std_ratio(bright, real),
                "mean": float(bright.mean()),
                "fcd": frechet_distance(ref, feature_stats(features.features(images))),
            }
            last[name] = images
        configs[name] = row
    table = {
        "metric": "per-image mean brightness on [0, 1]: W1 and std ratio to held-out data; FCD",
        "num_samples": num_samples,
        "num_real": len(real),
        "steps": list(steps),
        "real_mean": float(real.mean()),
        "real_std": float(real.std()),
        "real_data": {"w1": wasserstein_1d(floor, real), "std_ratio": std_ratio(floor, real)},
        "names": {name: CONFIG_NAMES.get(name, name) for name in samplers},
        "configs": configs,
    }
    return table, last


def guidance_table(
    sampler: Sampler,
    features: FeatureNet,
    x_reference: np.ndarray,
    *,
    scales: Sequence[float],
    rescales: Sequence[float],
    num_steps: int,
    per_digit: int,
    seed: int,
) -> tuple[dict[str, Any], dict[tuple[float, float], np.ndarray]]:
    """Classifier-free guidance at each scale w and rescale phi: accuracy, FCD and over-exposure.

    Every cell decodes the same x_T, ``per_digit`` for each digit 0-9 (labels
    ``repeat(arange(10), per_digit)``), at eta = 0 with S = ``num_steps``. Columns: the
    classifier's accuracy for the requested digit, the FCD to ``x_reference``, the fraction
    of pixels beyond the data's [-1, 1] by more than 0.05 (`out_of_range_fraction`), and the
    ratio of the samples' pixel std to the reference's.

    Returns:
      ``(table, samples)``: the JSON-ready table, and the samples per ``(w, phi)``.

    Example (an untrained model; raw pixels stand in for the features, every image called a 0):
      >>> import numpy as np
      >>> from ddim_jax.demo.experiments import Sampler
      >>> from ddim_jax.demo.metrics import FeatureNet
      >>> net = FeatureNet(lambda x: np.reshape(x, (len(x), -1)), 1.0, lambda x: np.zeros(len(x), int))
      >>> x = np.random.default_rng(0).uniform(-1, 1, (30, 8, 8, 1))
      >>> table, _ = guidance_table(Sampler.untrained(), net, x, scales=[3.0], rescales=[0.0, 0.7],
      ...                           num_steps=2, per_digit=1, seed=0)
      >>> table["cells"]["3"]["0.7"]["accuracy"]  # the one 0 of ten digits
      0.1
    """
    if features.predict is None:
        raise ValueError("features must have a classifier head (predict) to score the requested digits")
    ref = feature_stats(features.features(x_reference))
    labels = np.repeat(np.arange(10), per_digit)
    x_T = jax.random.normal(jax.random.key(seed), (len(labels), 8, 8, 1), jnp.float32)
    cells: dict[str, dict[str, dict[str, float]]] = {}
    samples: dict[tuple[float, float], np.ndarray] = {}
    for w in scales:
        row = {}
        for phi in rescales:
            images = sampler.sample(x_T, num_steps, 0.0, jax.random.key(seed), labels, w, phi)
            samples[(w, phi)] = images
            row[f"{phi:g}"] = {
                "accuracy": float(np.mean(features.predict(images) == labels)),
                "fcd": frechet_distance(ref, feature_stats(features.features(images))),
                "out_of_range": out_of_range_fraction(images),
                "std_ratio": std_ratio(images, x_reference),
            }
        cells[f"{w:g}"] = row
    table = {
        "metric": "accuracy for the requested digit; FCD; fraction of pixels beyond [-1.05, 1.05]; std ratio",
        "num_samples": len(labels),
        "num_steps": num_steps,
        "scales": [float(w) for w in scales],
        "rescales": [float(phi) for phi in rescales],
        "cells": cells,
    }
    return table, samples


def guidance_grid_images(
    samples: Mapping[tuple[float, float], np.ndarray], scales: Sequence[float], rescales: Sequence[float]
) -> np.ndarray:
    """Images for a grid: a row per scale w, the first sample of each digit 0-9 per rescale phi, side by side.

    Expects `guidance_table`'s samples (digit-major). Between the phi blocks is one blank
    (gray) tile, so ``ncols = 10 * len(rescales) + len(rescales) - 1``.

    Example:
      >>> import numpy as np
      >>> s = {(w, p): np.zeros((20, 8, 8, 1)) for w in (1.0, 3.0) for p in (0.0, 0.7)}
      >>> guidance_grid_images(s, [1.0, 3.0], [0.0, 0.7]).shape  # 2 rows of 21 tiles
      (42, 8, 8, 1)
    """
    rows = []
    for w in scales:
        for j, phi in enumerate(rescales):
            images = np.asarray(samples[(w, phi)])
            per_digit = len(images) // 10
            if j:
                rows.append(np.zeros((1, *images.shape[1:]), np.float32))  # gray in [-1, 1] terms
            rows.append(images[::per_digit][:10])
    return np.concatenate(rows)


def fixes_markdown(brightness: dict[str, Any] | None, guidance: dict[str, Any] | None) -> str:
    """Renders `brightness_table` and `guidance_table` results (either may be None) as markdown.

    Example:
      >>> b = {"steps": [10], "num_samples": 4, "num_real": 5, "real_mean": 0.4, "real_std": 0.15,
      ...      "real_data": {"w1": 0.01, "std_ratio": 1.0},
      ...      "names": {"a": "SD"}, "configs": {"a": {"10": {"w1": 0.1, "std_ratio": 0.5, "mean": 0.4,
      ...      "fcd": 3.0}}}}
      >>> print(fixes_markdown(b, None).splitlines()[4])
      | a: SD | 0.100 / 0.50 / 0.40 / 3.00 |
    """
    lines: list[str] = []
    if brightness is not None:
        steps = brightness["steps"]
        lines += [
            "### Zero terminal SNR: per-image brightness, W1 / std ratio / mean / FCD, "
            f"{brightness['num_samples']} samples per cell",
            "",
            "| sampler \\ S | " + " | ".join(str(s) for s in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        for name, row in brightness["configs"].items():
            cells = (row[str(s)] for s in steps)
            lines.append(
                f"| {name}: {brightness['names'][name]} | "
                + " | ".join(
                    f"{c['w1']:.3f} / {c['std_ratio']:.2f} / {c['mean']:.2f} / {c['fcd']:.2f}" for c in cells
                )
                + " |"
            )
        lines += [
            "",
            f"Held-out data ({brightness['num_real']} brightness-varied digits): mean brightness "
            f"{brightness['real_mean']:.2f}, std {brightness['real_std']:.3f}. W1 lower is better; "
            "std ratio 1 is right. Real-data floor (as many reference digits against the held-out ones): "
            f"W1 {brightness['real_data']['w1']:.3f}, std ratio {brightness['real_data']['std_ratio']:.2f}.",
            "",
        ]
    if guidance is not None:
        rescales = guidance["rescales"]
        head = " | ".join(f"phi={phi:g}: acc / FCD / out / std" for phi in rescales)
        lines += [
            f"### Guidance: {guidance['num_samples']} samples per cell (10 digits), "
            f"S = {guidance['num_steps']}",
            "",
            f"| w | {head} |",
            "|---|" + "---|" * len(rescales),
        ]
        for w, row in guidance["cells"].items():
            cells = (row[f"{phi:g}"] for phi in rescales)
            lines.append(
                f"| {w} | "
                + " | ".join(
                    f"{c['accuracy']:.2f} / {c['fcd']:.2f} / {c['out_of_range']:.3f} / {c['std_ratio']:.2f}"
                    for c in cells
                )
                + " |"
            )
        lines += [
            "",
            "acc: the classifier's accuracy for the requested digit; out: fraction of pixels beyond "
            "the data's [-1, 1] by more than 0.05; std: the samples' pixel std over the data's.",
            "",
        ]
    return "\n".join(lines)
