"""Labelled matplotlib figures of the demo's results (titles, axis labels, legends), written as PNG files.

Each function takes a part's results dict (as in ``results.json``), and images where it shows
them, writes one figure to ``path`` and returns ``path``. matplotlib's object API only
(no pyplot state), so it works without a display.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "brightness_by_resolution",
    "brightness_by_steps",
    "brightness_extremes",
    "brightness_histograms",
    "fcd_by_steps",
    "guidance_exposure",
    "image_rows",
    "schedule_fcd",
]

_Path = str | os.PathLike


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: _Path) -> _Path:
    fig.savefig(path)
    return path


def _show(ax: Any, image: np.ndarray, low: float = -1.0, high: float = 1.0) -> None:
    """An image with values in [low, high] (channels last; 1 or 3 channels), no ticks."""
    image = np.clip((np.asarray(image, np.float64) - low) / (high - low), 0.0, 1.0)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def brightness_histograms(results: Mapping[str, Any], path: _Path) -> _Path:
    """Per sampler: a histogram of its samples' per-image brightness over the data's.

    ``results``: `ddim_jax.demo.brightness.run_part`'s (its ``histogram`` entry).

    Example:
      >>> import os, tempfile
      >>> from ddim_jax.demo.brightness import run_part
      >>> results, _ = run_part(sizes=(4,), headline=4, steps=(5,), etas=(0.0,), num_samples=8, samplers="a")
      >>> path = brightness_histograms(results, os.path.join(tempfile.mkdtemp(), "h.png"))
      >>> os.path.getsize(path) > 0
      True
    """
    hist = results["histogram"]
    names = list(hist["samples"])
    fig = _figure(3.2 * len(names), 3.0)
    axes = np.atleast_1d(fig.subplots(1, len(names), sharey=True))
    bins = np.linspace(0.0, 1.0, 41)
    for ax, name in zip(axes, names, strict=True):
        ax.hist(hist["data"], bins=bins, density=True, color="0.75", label="data")
        ax.hist(hist["samples"][name], bins=bins, density=True, histtype="step", lw=2, label="samples")
        ax.set_title(f"{name}: {results['names'][name]}", fontsize=9)
        ax.set_xlabel("per-image brightness")
    axes[0].set_ylabel("density")
    axes[0].legend(loc="upper left", fontsize=8)
    h = results["headline"]
    fig.suptitle(
        f"The perfect model's per-image brightness, {h}x{h}x{results['channels']}, "
        f"S = {hist['steps']}, eta = 0"
    )
    return _save(fig, path)


def brightness_extremes(
    samples: Mapping[str, np.ndarray], data: np.ndarray, names: Mapping[str, str], path: _Path, k: int = 5
) -> _Path:
    """A row per sampler (and the data first): its ``k`` darkest and ``k`` brightest images.

    Example:
      >>> import os, tempfile, numpy as np
      >>> x = np.random.default_rng(0).uniform(-1, 1, (12, 4, 4, 3))
      >>> path = brightness_extremes({"a": x}, x, {"a": "SD"}, os.path.join(tempfile.mkdtemp(), "e.png"))
      >>> os.path.getsize(path) > 0
      True
    """
    rows = {"data": np.asarray(data), **{f"{n}: {names[n]}": np.asarray(x) for n, x in samples.items()}}
    fig = _figure(0.75 * 2 * k + 2.6, 0.9 * len(rows) + 0.6)  # about one screen pixel per 64x64 pixel
    axes = fig.subplots(len(rows), 2 * k, squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        order = np.argsort(images.reshape(len(images), -1).mean(1))
        picks = np.concatenate([order[:k], order[-k:]])
        for c, i in enumerate(picks):
            ax = axes[r, c]
            _show(ax, images[i])
            ax.set_xlabel(f"{(images[i].mean() + 1) / 2:.2f}", fontsize=7, labelpad=1)
            if r == 0:
                ax.set_title("darkest" if c < k else "brightest", fontsize=8)
        axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle("Darkest and brightest images (per-image brightness under each)")
    return _save(fig, path)


def brightness_by_steps(results: Mapping[str, Any], path: _Path) -> _Path:
    """The brightness std ratio against S per sampler, eta = 0 solid and eta = 1 dashed.

    Example:
      >>> import os, tempfile
      >>> from ddim_jax.demo.brightness import run_part
      >>> tiny = {"num_samples": 8, "samplers": "a", "etas": (0.0,)}
      >>> results, _ = run_part(sizes=(4,), headline=4, steps=(2, 5), **tiny)
      >>> os.path.getsize(brightness_by_steps(results, os.path.join(tempfile.mkdtemp(), "s.png"))) > 0
      True
    """
    h = str(results["headline"])
    steps = results["steps"]
    fig = _figure(10.0, 4.0)
    ax = fig.subplots()
    for i, name in enumerate(results["names"]):
        for eta in results["etas"]:
            ratio = [results["cells"][h][name][str(s)][f"{eta:g}"]["std_ratio"] for s in steps]
            style = "-" if eta == 0 else "--"
            label = f"{name}: {results['names'][name]}, eta = {eta:g}"
            ax.plot(steps, ratio, style, marker="o", color=f"C{i}", label=label)
    ax.axhline(1.0, color="k", lw=0.8, label="the data's spread")
    ax.set_xscale("log")
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xticks([], minor=True)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("sampling steps S")
    ax.set_ylabel("std of per-image brightness: samples / data")
    ax.set_title(f"Brightness spread of the perfect model, {h}x{h}x{results['channels']}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def brightness_by_resolution(results: Mapping[str, Any], path: _Path) -> _Path:
    """The brightness std ratio against the number of values D per sampler (S as in the results, eta = 0).

    The Gaussian-prior estimate ``1 / sqrt(1 + SNR)`` of sampler a is drawn dotted.

    Example:
      >>> import os, tempfile
      >>> from ddim_jax.demo.brightness import run_part
      >>> tiny = {"num_samples": 8, "samplers": "a", "etas": (0.0,)}
      >>> results, _ = run_part(sizes=(4, 8), headline=4, steps=(5,), **tiny)
      >>> os.path.getsize(brightness_by_resolution(results, os.path.join(tempfile.mkdtemp(), "r.png"))) > 0
      True
    """
    sizes, s = results["sizes"], str(results["resolution_steps"])
    d = [results["num_values"][str(size)] for size in sizes]
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    for i, name in enumerate(results["names"]):
        ratio = [results["cells"][str(size)][name][s]["0"]["std_ratio"] for size in sizes]
        ax.plot(d, ratio, marker="o", color=f"C{i}", label=f"{name}: {results['names'][name]}")
    first = next(iter(results["names"]))
    snr = results["mechanism"][first]["first_timestep"][s]["snr"]
    estimate = [1.0 / np.sqrt(1.0 + snr[str(size)]) for size in sizes]
    ax.plot(d, estimate, ":", color="C0", label=f"{first}: 1 / sqrt(1 + SNR of the leaked mean)")
    ax.set_xscale("log")
    ax.set_xticks(d, [f"{size}x{size}x{results['channels']}" for size in sizes])
    ax.set_xticks([], minor=True)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("image size (values D)")
    ax.set_ylabel("std of per-image brightness: samples / data")
    ax.set_title(f"The effect grows with resolution (S = {s}, eta = 0)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def fcd_by_steps(quality: Mapping[str, Any], path: _Path) -> _Path:
    """Part ddim's Table 1: FCD against S, a line per eta, with the real-data floor.

    Example:
      >>> import os, tempfile
      >>> q = {"steps": [10, 20], "eta": {"0": {"10": 9.0, "20": 7.0}}, "real_data_floor": 4.0,
      ...      "num_samples": 8}
      >>> os.path.getsize(fcd_by_steps(q, os.path.join(tempfile.mkdtemp(), "f.png"))) > 0
      True
    """
    steps = quality["steps"]
    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    for eta, row in quality["eta"].items():
        ax.plot(steps, [row[str(s)] for s in steps], marker="o", label=f"eta = {eta}")
    ax.axhline(quality["real_data_floor"], color="k", ls="--", lw=1, label="real held-out digits (floor)")
    ax.set_xscale("log")
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xticks([], minor=True)
    ax.set_xlabel("sampling steps S")
    ax.set_ylabel("FCD (lower is better)")
    ax.set_title(f"DDIM Table 1 in miniature: sample quality, {quality['num_samples']} samples per point")
    ax.legend()
    return _save(fig, path)


def schedule_fcd(table: Mapping[str, Any], path: _Path) -> _Path:
    """Part schedule: FCD and brightness W1 against S, a line per sampler (SD; zero-SNR v leading; trailing).

    Example:
      >>> import os, tempfile
      >>> cell = {"fcd": 3.0, "w1": 0.01, "std_ratio": 0.9, "mean": 0.5}
      >>> t = {"steps": [10, 25], "num_samples": 8, "names": {"a": "SD"},
      ...      "configs": {"a": {"10": cell, "25": cell}}, "real_data": {"w1": 0.01, "std_ratio": 1.0}}
      >>> os.path.getsize(schedule_fcd(t, os.path.join(tempfile.mkdtemp(), "s.png"))) > 0
      True
    """
    steps = table["steps"]
    fig = _figure(9.0, 3.6)
    left, right = fig.subplots(1, 2)
    for name, row in table["configs"].items():
        label = f"{name}: {table['names'][name]}"
        left.plot(steps, [row[str(s)]["fcd"] for s in steps], marker="o", label=label)
        right.plot(steps, [row[str(s)]["w1"] for s in steps], marker="o", label=label)
    right.axhline(table["real_data"]["w1"], color="k", ls="--", lw=1, label="real digits (floor)")
    left.set_ylabel("FCD (lower is better)")
    left.set_title("Sample quality")
    right.set_ylabel("W1 of per-image brightness to the data")
    right.set_title("Brightness")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_xticks([], minor=True)
        ax.set_xlabel("sampling steps S")
        ax.legend(fontsize=7)
    fig.suptitle(f"Trained digits models under each fix, {table['num_samples']} samples per point, eta = 0")
    return _save(fig, path)


def guidance_exposure(guidance: Mapping[str, Any], path: _Path) -> _Path:
    """Part guidance: over-exposure and pixel spread against w, a line per guidance rescale phi.

    Example:
      >>> import os, tempfile
      >>> cell = {"out_of_range": 0.1, "std_ratio": 1.2, "accuracy": 1.0, "fcd": 3.0}
      >>> g = {"scales": [1.0, 3.0], "rescales": [0.0], "num_steps": 25, "num_samples": 20,
      ...      "cells": {"1": {"0": cell}, "3": {"0": cell}}}
      >>> os.path.getsize(guidance_exposure(g, os.path.join(tempfile.mkdtemp(), "g.png"))) > 0
      True
    """
    scales = guidance["scales"]
    fig = _figure(9.0, 3.6)
    left, right = fig.subplots(1, 2)
    for phi in guidance["rescales"]:
        cells = [guidance["cells"][f"{w:g}"][f"{phi:g}"] for w in scales]
        label = "no rescale (phi = 0)" if phi == 0 else f"rescale phi = {phi:g}"
        left.plot(scales, [c["out_of_range"] for c in cells], marker="o", label=label)
        right.plot(scales, [c["std_ratio"] for c in cells], marker="o", label=label)
    left.set_ylabel("fraction of pixels beyond [-1.05, 1.05]")
    left.set_title("Over-exposure")
    right.axhline(1.0, color="k", lw=0.8, label="the data's spread")
    right.set_ylabel("pixel std: samples / data")
    right.set_title("Contrast")
    for ax in (left, right):
        ax.set_xlabel("guidance scale w")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Classifier-free guidance with and without rescale, S = {guidance['num_steps']}, "
        f"{guidance['num_samples']} samples per point"
    )
    return _save(fig, path)


def image_rows(
    images: np.ndarray, row_labels: Sequence[str], title: str, path: _Path, col_labels: Sequence[str] = ()
) -> _Path:
    """``images`` (``len(row_labels) * ncols`` of them, row-major, values in [-1, 1]) as a labelled grid.

    Example:
      >>> import os, tempfile, numpy as np
      >>> x = np.zeros((6, 8, 8, 1))
      >>> path = image_rows(x, ["originals", "edits"], "t", os.path.join(tempfile.mkdtemp(), "g.png"))
      >>> os.path.getsize(path) > 0
      True
    """
    images = np.asarray(images)
    nrows = len(row_labels)
    if nrows == 0 or len(images) % nrows:
        raise ValueError(
            f"len(images) = {len(images)} must be a positive multiple of len(row_labels) = {nrows}"
        )
    ncols = len(images) // nrows
    fig = _figure(0.8 * ncols + 2.0, 0.8 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, image in enumerate(images):
        ax = axes[i // ncols, i % ncols]
        _show(ax, image)
        if i < ncols and i < len(col_labels):
            ax.set_title(col_labels[i], fontsize=8)
    for r, label in enumerate(row_labels):
        axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title)
    return _save(fig, path)
