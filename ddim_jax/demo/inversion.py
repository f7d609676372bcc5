"""Exact inversion on the digits model: DDIM inversion against EDICT and BDIA, side by side.

Each method encodes held-out digits to noise and decodes them with the same model and S;
`inversion_table` reports the reconstruction MSE ([0, 1] pixels, as Table 2) and the largest
round-trip error per method and S, and `inversion_grid` shows originals over reconstructions.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import ddim_jax
from ddim_jax.demo.data import to_unit_range
from ddim_jax.demo.experiments import Sampler

__all__ = ["METHODS", "reconstruct", "inversion_table", "inversion_grid", "inversion_markdown"]

METHODS = ("ddim", "edict", "bdia")
"""Inversion methods: ``ddim`` (`ddim_jax.invert`, `ddim_jax.sample`), ``edict``, ``bdia``."""

_LOOPS = {
    "ddim": (ddim_jax.invert, ddim_jax.sample),
    "edict": (ddim_jax.edict_invert, ddim_jax.edict_sample),
    "bdia": (ddim_jax.bdia_invert, ddim_jax.bdia_sample),
}


@functools.lru_cache(maxsize=32)
def _round_trip(method: str, model: Any, config: ddim_jax.DDIMConfig, num_steps: int) -> Any:
    """The jitted invert-then-sample of ``method`` for (model, config, S); params and x0 traced."""
    state = ddim_jax.set_timesteps(ddim_jax.create_state(config), num_steps)
    invert_fn, sample_fn = _LOOPS[method]

    def model_fn(x, t, params):
        return model.apply(params, x, t)

    def run(params, x0):
        latents = invert_fn(model_fn, state, x0, model_args=(params,))
        return sample_fn(model_fn, state, latents, model_args=(params,))

    return jax.jit(run)


def reconstruct(sampler: Sampler, x0: np.ndarray, num_steps: int, method: str) -> np.ndarray:
    """Encodes ``x0`` with ``method``'s inversion and decodes it with its sampler, S steps each.

    Example:
      >>> import numpy as np
      >>> from ddim_jax import DDIMConfig
      >>> sampler = Sampler.untrained(config=DDIMConfig(clip_sample=False))
      >>> reconstruct(sampler, np.zeros((2, 8, 8, 1)), 2, "bdia").shape
      (2, 8, 8, 1)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    run = _round_trip(method, sampler.model, sampler.config, num_steps)
    return np.asarray(jax.block_until_ready(run(sampler.params, np.asarray(x0, np.float32))))


def inversion_table(
    sampler: Sampler, x0: np.ndarray, *, steps: Sequence[int], methods: Sequence[str] = METHODS
) -> tuple[dict[str, Any], dict[tuple[str, int], np.ndarray]]:
    """Reconstruction error of invert-then-sample per method and S, on the same digits.

    Returns:
      ``(table, reconstructions)``: the table as a JSON-ready dict (``mse`` on [0, 1] pixels,
      ``max_rel_err``: the largest |error| over the largest |x0| in [-1, 1] units, and
      ``seconds`` per cell, compilation included), and the reconstructions per (method, S).

    Example:
      >>> import numpy as np
      >>> from ddim_jax import DDIMConfig
      >>> sampler = Sampler.untrained(config=DDIMConfig(clip_sample=False))
      >>> x0 = np.zeros((2, 8, 8, 1))
      >>> table, recon = inversion_table(sampler, x0, steps=[2], methods=["ddim", "edict"])
      >>> list(table["mse"]), list(table["mse"]["edict"]), recon["edict", 2].shape
      (['ddim', 'edict'], ['2'], (2, 8, 8, 1))
    """
    target = to_unit_range(x0)
    scale = float(np.max(np.abs(x0))) or 1.0
    mse: dict[str, dict[str, float]] = {}
    max_rel: dict[str, dict[str, float]] = {}
    seconds: dict[str, dict[str, float]] = {}
    recon = {}
    for method in methods:
        mse[method], max_rel[method], seconds[method] = {}, {}, {}
        for s in steps:
            start = time.perf_counter()
            out = reconstruct(sampler, x0, s, method)
            seconds[method][str(s)] = time.perf_counter() - start
            mse[method][str(s)] = float(np.mean((to_unit_range(out) - target) ** 2))
            max_rel[method][str(s)] = float(np.max(np.abs(out - x0)) / scale)
            recon[method, s] = out
    table = {
        "metric": "per-pixel MSE on the [0, 1] scale of invert-then-sample, same model, S and conditioning",
        "num_digits": len(x0),
        "steps": list(steps),
        "mse": mse,
        "max_rel_err": max_rel,
        "seconds": seconds,
    }
    return table, recon


def inversion_grid(x0: np.ndarray, recon: dict[tuple[str, int], np.ndarray], num_steps: int, ncols: int = 10):
    """Rows of images in [0, 1]: the originals, then each method's reconstructions at ``num_steps``.

    Example:
      >>> import numpy as np
      >>> x = np.zeros((3, 8, 8, 1))
      >>> inversion_grid(x, {("ddim", 5): x, ("bdia", 5): x}, 5).shape
      (9, 8, 8, 1)
    """
    rows = [x0[:ncols]] + [images[:ncols] for (method, s), images in recon.items() if s == num_steps]
    return to_unit_range(np.concatenate(rows))


def inversion_markdown(table: dict[str, Any]) -> str:
    """Renders `inversion_table`'s table as markdown.

    Example:
      >>> t = {"steps": [10], "num_digits": 4, "mse": {"bdia": {"10": 1e-14}},
      ...      "max_rel_err": {"bdia": {"10": 3e-7}}, "seconds": {"bdia": {"10": 1.0}}}
      >>> print(inversion_markdown(t).splitlines()[4])
      | bdia | 1.00e-14 | 3.0e-07 |
    """
    steps = table["steps"]
    lines = [
        f"### Reconstruction of {table['num_digits']} held-out digits: MSE ([0, 1] pixels) | "
        "largest round-trip error / max |x0|",
        "",
        "| method \\ S | " + " | ".join(f"{s} MSE | {s} max err" for s in steps) + " |",
        "|---|" + "---|---|" * len(steps),
    ]
    for method, row in table["mse"].items():
        cells = [f"{row[str(s)]:.2e} | {table['max_rel_err'][method][str(s)]:.1e}" for s in steps]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_inversion_part(
    args: Any,
    model: Any,
    params: Any,
    settings: Any,
    digits: Any,
    out: Any,
    *,
    cached: bool,
    train_time: float,
    start: float,
) -> dict[str, Any]:
    """``ddim-jax demo --part inversion``: the table, the grid, ``inversion.md`` and ``inversion.json``.

    Called by `ddim_jax.demo.cli.run_demo` with the loaded (or trained) model.

    Example (an untrained model; the printed table is swallowed here):
      >>> import argparse, contextlib, io, tempfile
      >>> from pathlib import Path
      >>> from ddim_jax.demo.data import load_digits_split
      >>> from ddim_jax.demo.train import TrainSettings
      >>> s, untrained = TrainSettings(channels=(4,)), Sampler.untrained()
      >>> args = argparse.Namespace(num_recon=2, inversion_steps=(2,))
      >>> with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(io.StringIO()):
      ...     results = run_inversion_part(args, untrained.model, untrained.params, s, load_digits_split(),
      ...                                  Path(d), cached=False, train_time=0.0, start=0.0)
      >>> sorted(results["inversion"]["mse"]), results["files"]
      (['bdia', 'ddim', 'edict'], {'grid': 'inversion_S2.png'})
    """
    import json
    import os

    from ddim_jax.demo.png import image_grid, write_png

    sampler = Sampler(model, params, settings.scheduler_config(False))
    x0 = digits.x_test[: min(args.num_recon, len(digits.x_test))]
    t0 = time.perf_counter()
    table, recon = inversion_table(sampler, x0, steps=args.inversion_steps)
    seconds = time.perf_counter() - t0
    s_grid = min(args.inversion_steps)
    files = {"grid": f"inversion_S{s_grid}.png"}
    write_png(out / files["grid"], image_grid(inversion_grid(x0, recon, s_grid), ncols=10))
    timing = (
        f"\nRows of {files['grid']}: originals, then the reconstructions of "
        f"{', '.join(METHODS)} at S = {s_grid}.\n"
        f"Inversion part {seconds:.1f} s ({len(METHODS) * len(args.inversion_steps)} compilations "
        f"included; denoiser {'loaded' if cached else 'trained'} in {train_time:.1f} s before it) "
        f"on {jax.devices()[0].platform} with {os.cpu_count()} cores.\n"
    )
    markdown = inversion_markdown(table) + timing
    results = {
        "inversion": table,
        "train_settings": settings.to_dict(),
        "params_from_cache": cached,
        "seconds": {"train_or_load": train_time, "inversion": seconds, "total": time.perf_counter() - start},
        "files": files,
    }
    (out / "inversion.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "inversion.md").write_text(markdown)
    print(markdown)
    return results
