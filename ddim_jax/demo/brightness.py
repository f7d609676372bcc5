"""Lin et al.'s first claim with a perfect model: SD's schedule cannot make dark or bright images.

The data: each image is a brightness level ``m`` times a ones image plus a Gaussian texture
orthogonal to it, ``x0 = m 1 + z``, with ``m`` drawn from a mixture of Gaussian levels (dark
to bright) and ``z = g - mean(g)``, ``g ~ N(0, texture_std^2 I)``. The per-image brightness
(the mean over pixels) is ``m`` exactly. For this data the Bayes-optimal denoiser
``E[x0 | x_t]`` has a closed form under any schedule (`posterior_mean`): the pixel mean of
``x_t`` is ``sqrt(a) m`` plus noise of variance ``(1 - a) / D`` (Gaussian conditioning per
mixture component, weighted by the components' posterior), and the rest is Gaussian
conditioning of the texture. `exact_model` turns it into epsilon, v or x0 predictions for
`ddim_jax.sample`: "the perfectly trained model" of each schedule.

The mechanism: a schedule whose last timestep keeps ``alpha_bar_T > 0`` trains the model to
read the brightness from x_T, where the mean's signal-to-noise ratio is
``alpha_bar_T D Var(m) / (1 - alpha_bar_T)``: it grows with the number of values D.
Sampling starts from pure noise, which to the model says "medium brightness". `run_part`
measures the samples' brightness spread against the data's for four samplers, resolutions,
step counts and eta.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import ddim_jax
from ddim_jax.demo.metrics import std_ratio, wasserstein_1d

__all__ = [
    "SAMPLERS",
    "BrightnessPrior",
    "brightness",
    "brightness_markdown",
    "demo_prior",
    "exact_model",
    "leaked_mean_snr",
    "posterior_mean",
    "run_part",
    "sample_data",
    "sampler_config",
]

SAMPLERS = {
    "a": "SD: scaled_linear, epsilon, leading",
    "b": "SD, trailing",
    "c": "zero-SNR, v-prediction, leading",
    "d": "zero-SNR, v-prediction, trailing (the fix)",
}
"""The samplers `run_part` compares (`sampler_config` gives their configs)."""


class BrightnessPrior(NamedTuple):
    """The data: brightness ``m ~ sum_k weights[k] N(levels[k], level_std^2)`` plus texture.

    Pixel values are on the [-1, 1] scale, brightness ``(m + 1) / 2`` on [0, 1]. A pytree of
    arrays, so it can be a traced model argument.

    Example:
      >>> from ddim_jax.demo.brightness import demo_prior
      >>> demo_prior().levels.tolist()
      [-0.75, -0.375, 0.0, 0.375, 0.75]
    """

    levels: jax.Array
    level_std: jax.Array
    weights: jax.Array
    texture_std: jax.Array

    def mean_and_variance(self) -> tuple[float, float]:
        """The mean and variance of the brightness level ``m`` (pixel scale).

        Example:
          >>> m, v = demo_prior().mean_and_variance()
          >>> round(m, 6), round(v, 4)
          (0.0, 0.2849)
        """
        w, mu = np.asarray(self.weights, np.float64), np.asarray(self.levels, np.float64)
        mean = float(w @ mu)
        return mean, float(w @ (mu - mean) ** 2 + float(self.level_std) ** 2)


def demo_prior() -> BrightnessPrior:
    """Five equally likely levels from dark to bright (brightness 0.125 to 0.875), texture std 0.1.

    Example:
      >>> float(demo_prior().weights.sum()), len(demo_prior().levels)
      (1.0, 5)
    """
    return BrightnessPrior(
        levels=jnp.asarray([-0.75, -0.375, 0.0, 0.375, 0.75], jnp.float32),
        level_std=jnp.float32(0.06),
        weights=jnp.full(5, 0.2, jnp.float32),
        texture_std=jnp.float32(0.1),
    )


@functools.partial(jax.jit, static_argnums=2)
def sample_data(prior: BrightnessPrior, key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """``shape[0]`` images of shape ``shape[1:]`` drawn from the data distribution.

    Example:
      >>> import jax
      >>> x = sample_data(demo_prior(), jax.random.key(0), (3, 4, 4, 1))
      >>> x.shape
      (3, 4, 4, 1)
    """
    k_level, k_m, k_g = jax.random.split(key, 3)
    n = shape[0]
    level = jax.random.categorical(k_level, jnp.log(prior.weights), shape=(n,))
    m = prior.levels[level] + prior.level_std * jax.random.normal(k_m, (n,))
    g = prior.texture_std * jax.random.normal(k_g, tuple(shape))
    return _per_image(m, g) + g - _pixel_mean(g)


def _pixel_mean(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)), keepdims=True)


def _per_image(values: jax.Array, like: jax.Array) -> jax.Array:
    return jnp.reshape(values, (-1,) + (1,) * (like.ndim - 1))


def brightness(x: Any) -> np.ndarray:
    """Per-image brightness on [0, 1]: the mean over pixels, ``(mean + 1) / 2`` (not clipped).

    Example:
      >>> import numpy as np
      >>> brightness(np.stack([-np.ones((2, 2, 3)), np.full((2, 2, 3), 0.5)])).tolist()
      [0.0, 0.75]
    """
    x = np.asarray(x, np.float64)
    return (x.reshape(len(x), -1).mean(axis=1) + 1.0) / 2.0


def posterior_mean(prior: BrightnessPrior, x_t: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """``E[x0 | x_t]`` for ``x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise``, batch first.

    Example (with no noise, the data comes back):
      >>> import jax
      >>> x0 = sample_data(demo_prior(), jax.random.key(0), (2, 4, 4, 3))
      >>> bool(jnp.allclose(posterior_mean(demo_prior(), x0, 1.0), x0, atol=1e-5))
      True
    """
    a = jnp.asarray(alpha_bar, jnp.float32)
    d = np.prod(x_t.shape[1:])
    mean = _pixel_mean(x_t)  # = sqrt(a) m + noise of variance (1 - a) / D
    s2 = prior.level_std**2
    var = a * s2 + (1.0 - a) / d  # per component, of the pixel mean
    resid = jnp.reshape(mean, (-1, 1)) - jnp.sqrt(a) * prior.levels
    logits = jnp.log(prior.weights) - 0.5 * (resid**2 / var + jnp.log(var))
    m_k = prior.levels + jnp.sqrt(a) * s2 * resid / var
    m = jnp.sum(jax.nn.softmax(logits, axis=-1) * m_k, axis=-1)
    tau2 = prior.texture_std**2
    gain = jnp.sqrt(a) * tau2 / (a * tau2 + 1.0 - a)
    return _per_image(m, x_t) + gain * (x_t - mean)


def exact_model(prediction_type: str):
    """The Bayes-optimal ``model_fn(x, t, prior, alphas_cumprod)`` for `ddim_jax.sample`.

    Pass ``model_args=(prior, state.alphas_cumprod)`` (traced, not baked into the program).
    ``prediction_type``: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.

    Example:
      >>> import jax, ddim_jax
      >>> config = ddim_jax.DDIMConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True)
      >>> state = ddim_jax.set_timesteps(ddim_jax.create_state(config), 10)
      >>> x_T = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
      >>> args = (demo_prior(), state.alphas_cumprod)
      >>> ddim_jax.sample(exact_model("v_prediction"), state, x_T, model_args=args).shape
      (2, 8, 8, 3)
    """
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(
            f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}"
        )

    def model_fn(x: jax.Array, t: jax.Array, prior: BrightnessPrior, alphas_cumprod: jax.Array) -> jax.Array:
        a = alphas_cumprod[t]
        x0 = posterior_mean(prior, x, a)
        if prediction_type == "sample":
            return x0
        if prediction_type == "epsilon":
            return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
        return (jnp.sqrt(a) * x - x0) / jnp.sqrt(1.0 - a)

    return model_fn


def sampler_config(name: str) -> ddim_jax.DDIMConfig:
    """The DDIM config of sampler ``name`` in `SAMPLERS` (Stable Diffusion's betas, T = 1000).

    Leading spacing uses SD's ``steps_offset=1``; all use SD's ``set_alpha_to_one=False``
    and no clipping.

    Example:
      >>> sampler_config("d").timestep_spacing, sampler_config("d").prediction_type
      ('trailing', 'v_prediction')
    """
    if name not in SAMPLERS:
        raise ValueError(f"name must be one of {list(SAMPLERS)}, got {name!r}")
    zero_snr, trailing = name in "cd", name in "bd"
    return ddim_jax.DDIMConfig(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction" if zero_snr else "epsilon",
        rescale_betas_zero_snr=zero_snr,
        timestep_spacing="trailing" if trailing else "leading",
        steps_offset=0 if trailing else 1,
        set_alpha_to_one=False,
        clip_sample=False,
    )


def leaked_mean_snr(alpha_bar: float, num_values: int, prior: BrightnessPrior) -> float:
    """The SNR of the brightness in ``x_t``'s pixel mean: ``a D Var(m) / (1 - a)``.

    What the model trained on the schedule expects to read from the noise it starts from.

    Example:
      >>> round(leaked_mean_snr(0.0047, 64 * 64 * 3, demo_prior()), 1)
      16.5
    """
    return alpha_bar * num_values * prior.mean_and_variance()[1] / (1.0 - alpha_bar)


_PROGRAMS: dict[tuple, Any] = {}


def _sample(name: str, num_steps: int, max_steps: int, x_T, eta: float, key, prior) -> np.ndarray:
    """``ddim_jax.sample`` of the exact model; one program per (sampler, shape, eta) for every S.

    eta is a Python float (static): at eta = 0 the program draws no noise, which dominates an
    eta > 0 step here.
    """
    config = sampler_config(name)
    state = ddim_jax.set_timesteps(ddim_jax.create_state(config), num_steps, max_steps=max_steps)
    cache_key = (name, max_steps, x_T.shape, float(eta))
    if cache_key not in _PROGRAMS:
        model_fn = exact_model(config.prediction_type)

        def run(state, x_T, key, prior):
            args = (prior, state.alphas_cumprod)
            return ddim_jax.sample(model_fn, state, x_T, key=key, eta=float(eta), model_args=args)

        _PROGRAMS[cache_key] = jax.jit(run)
    return np.asarray(_PROGRAMS[cache_key](state, x_T, key, prior))


def prediction_sensitivity(
    x_T: jax.Array, num_steps: int, prior: BrightnessPrior, error: float = 1e-3
) -> dict[str, float]:
    """Why v-prediction: the change of the samples when the model's output is off by ``error`` (relative).

    Samples ``x_T`` with sampler d's zero-SNR trailing schedule at eta = 0, once with the exact
    model and once with its output scaled by ``1 + error``, for epsilon and v-prediction;
    returns the RMS pixel change per prediction type. At the first step, alpha_bar = 0: an
    epsilon model's x0 there is ``(x - eps) / sqrt(alpha_bar)`` (ddim_jax clamps
    ``alpha_bar`` to `ddim_jax.MIN_ALPHA_CUMPROD`), so any error in eps is multiplied by
    4096, while v-prediction's x0 is ``-v``.

    Example:
      >>> import jax
      >>> x_T = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
      >>> change = prediction_sensitivity(x_T, 10, demo_prior())
      >>> change["epsilon"] > change["v_prediction"]
      True
    """
    out = {}
    for prediction_type in ("epsilon", "v_prediction"):
        config = dataclasses.replace(sampler_config("d"), prediction_type=prediction_type)
        state = ddim_jax.set_timesteps(ddim_jax.create_state(config), num_steps)
        exact = exact_model(prediction_type)

        def off(x, t, prior, alphas_cumprod, exact=exact):
            return (1.0 + error) * exact(x, t, prior, alphas_cumprod)

        def run(fn, state, x, prior):
            return ddim_jax.sample(fn, state, x, model_args=(prior, state.alphas_cumprod))

        jitted = jax.jit(run, static_argnums=0)
        right, wrong = (np.asarray(jitted(fn, state, x_T, prior)) for fn in (exact, off))
        out[prediction_type] = float(np.sqrt(np.mean((wrong - right) ** 2)))
    return out


def _measures(bright: np.ndarray, data: np.ndarray, central: tuple[float, float]) -> dict[str, float]:
    low, high = central
    return {
        "std_ratio": std_ratio(bright, data),
        "w1": wasserstein_1d(bright, data),
        "min": float(bright.min()),
        "max": float(bright.max()),
        "beyond_central_80": float(np.mean((bright < low) | (bright > high))),
    }


def run_part(
    *,
    sizes: Sequence[int] = (8, 32, 64, 128),
    headline: int = 64,
    channels: int = 3,
    steps: Sequence[int] = (10, 25, 50, 200),
    etas: Sequence[float] = (0.0, 1.0),
    num_samples: int = 200,
    seed: int = 0,
    prior: BrightnessPrior | None = None,
    samplers: Sequence[str] = tuple(SAMPLERS),
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``ddim-jax demo --parts brightness``: brightness of the exact model's samples per sampler.

    At the ``headline`` size every sampler in ``samplers`` (names in `SAMPLERS`) runs every S
    in ``steps`` and eta in ``etas``; at the other ``sizes`` (square, ``channels`` channels)
    every sampler runs S = 50 (or the largest S below it) at eta = 0. Every cell of one size decodes the same
    ``num_samples`` x_T. Per cell, against the data's per-image brightness (20,000 exact
    draws of ``m``): the std ratio, W1 (`ddim_jax.demo.metrics.wasserstein_1d`), the darkest and
    brightest sample, and the fraction beyond the data's central 80%. The mechanism: per
    sampler, ``sqrt(alpha_bar)`` at its first timestep and the leaked mean's SNR there.

    Returns:
      ``(results, samples)``: the JSON-ready results (``histogram`` holds the brightness of
      the headline samples below and 5,000 of the data's), and the headline samples per
      sampler at S = 50 (as above), eta = 0.

    Example (tiny):
      >>> results, samples = run_part(sizes=(4,), headline=4, steps=(5,), etas=(0.0, 1.0), num_samples=8,
      ...                             samplers="ad")
      >>> sorted(results["cells"]["4"]["a"]["5"]["1"]), samples["d"].shape
      (['beyond_central_80', 'max', 'min', 'std_ratio', 'w1'], (8, 4, 4, 3))
    """
    prior = prior or demo_prior()
    for name in samplers:
        sampler_config(name)  # checks the name
    if headline not in sizes:
        raise ValueError(f"headline must be one of sizes {list(sizes)}, got {headline}")
    key = jax.random.key(seed)
    k_data, k_noise = jax.random.split(key)
    data = brightness(sample_data(prior, k_data, (20_000, 1, 1, 1)))  # exactly m: no texture in one value
    central = tuple(float(q) for q in np.quantile(data, [0.1, 0.9]))
    s_mid = max([s for s in steps if s <= 50] or [min(steps)])
    max_steps = max(steps)
    cells: dict[str, Any] = {}
    mechanism: dict[str, Any] = {}
    samples: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    for size in sizes:
        shape = (num_samples, size, size, channels)
        x_T = jax.random.normal(jax.random.fold_in(k_noise, size), shape, jnp.float32)
        grid = [(s, e) for s in steps for e in etas] if size == headline else [(s_mid, 0.0)]
        if size == headline:
            x_headline = x_T
        cells[str(size)] = {}
        for name in samplers:
            row: dict[str, dict[str, Any]] = {}
            for s, eta in grid:
                cell_key = jax.random.fold_in(jax.random.fold_in(key, s), int(round(1000 * eta)))
                images = _sample(name, s, max_steps, x_T, eta, cell_key, prior)
                row.setdefault(str(s), {})[f"{eta:g}"] = _measures(brightness(images), data, central)
                if size == headline and s == s_mid and eta == 0.0:
                    samples[name] = images
            cells[str(size)][name] = row
    d_values = {str(size): size * size * channels for size in sizes}
    for name in samplers:
        state = ddim_jax.create_state(sampler_config(name))
        first = {}
        for s in steps:
            t = int(ddim_jax.set_timesteps(state, s).timesteps[0])
            a = float(state.alphas_cumprod[t])
            snr = {size: leaked_mean_snr(a, d, prior) for size, d in d_values.items()}
            first[str(s)] = {"t": t, "sqrt_alpha_bar": a**0.5, "snr": snr}
        a_last = float(state.alphas_cumprod[-1])
        mechanism[name] = {"sqrt_alpha_bar_T": a_last**0.5, "first_timestep": first}
    mean, var = prior.mean_and_variance()
    results = {
        "names": {name: SAMPLERS[name] for name in samplers},
        "configs": {name: sampler_config(name).to_dict() for name in samplers},
        "sizes": list(sizes),
        "headline": headline,
        "channels": channels,
        "num_values": d_values,
        "steps": list(steps),
        "etas": [float(e) for e in etas],
        "resolution_steps": s_mid,
        "num_samples": num_samples,
        "prior": {k: np.asarray(v).tolist() for k, v in prior._asdict().items()},
        "data": {
            "num": len(data),
            "mean": float(data.mean()),
            "std": float(data.std()),
            "min": float(data.min()),
            "max": float(data.max()),
            "central_80": list(central),
            "level_variance_pixel_scale": var,
            "level_mean_pixel_scale": mean,
        },
        "cells": cells,
        "mechanism": mechanism,
        "prediction_sensitivity": {
            "error": 1e-3,
            "steps": s_mid,
            "rms_change": prediction_sensitivity(x_headline, s_mid, prior),
        },
        "histogram": {
            "steps": s_mid,
            "data": data[:5000].round(4).tolist(),
            "samples": {name: brightness(x).round(4).tolist() for name, x in samples.items()},
        },
        "seconds": time.perf_counter() - start,
    }
    return results, samples


def brightness_markdown(results: dict[str, Any]) -> str:
    """Renders `run_part`'s results as markdown: the headline table, resolutions, mechanism.

    Example:
      >>> results, _ = run_part(sizes=(4,), headline=4, steps=(5,), etas=(0.0,), num_samples=8, samplers="a")
      >>> print(brightness_markdown(results).splitlines()[0])
      ### Brightness with the exact (Bayes-optimal) model: 4x4x3, 8 samples per cell
    """
    h, c, n = results["headline"], results["channels"], results["num_samples"]
    steps, etas, data = results["steps"], results["etas"], results["data"]
    lo, hi = data["central_80"]
    lines = [
        f"### Brightness with the exact (Bayes-optimal) model: {h}x{h}x{c}, {n} samples per cell",
        "",
        "Per cell: std ratio / W1 / darkest-brightest / fraction beyond the data's central 80%.",
        "",
        "| sampler | eta | " + " | ".join(f"S = {s}" for s in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for name, label in results["names"].items():
        row = results["cells"][str(h)][name]
        for eta in etas:
            cells = [row[str(s)][f"{eta:g}"] for s in steps]
            text = [
                f"{m['std_ratio']:.2f} / {m['w1']:.3f} / {m['min']:.2f}-{m['max']:.2f} / "
                f"{m['beyond_central_80']:.2f}"
                for m in cells
            ]
            lines.append(f"| {name}: {label} | {eta:g} | " + " | ".join(text) + " |")
    lines += [
        "",
        f"Data ({data['num']} exact draws): brightness mean {data['mean']:.3f}, std {data['std']:.3f}, "
        f"range {data['min']:.2f}-{data['max']:.2f}, central 80% {lo:.3f}-{hi:.3f} (so 0.20 of the data "
        "lies beyond it). Std ratio 1 and W1 0 are right.",
        "",
        f"### Growth with resolution: std ratio (W1), S = {results['resolution_steps']}, eta = 0",
        "",
        "| sampler | "
        + " | ".join(f"{s}x{s}x{c} (D = {results['num_values'][str(s)]})" for s in results["sizes"])
        + " |",
        "|---|" + "---|" * len(results["sizes"]),
    ]
    s_mid = str(results["resolution_steps"])
    for name, label in results["names"].items():
        cells = [results["cells"][str(s)][name][s_mid]["0"] for s in results["sizes"]]
        lines.append(
            f"| {name}: {label} | "
            + " | ".join(f"{m['std_ratio']:.2f} ({m['w1']:.3f})" for m in cells)
            + " |"
        )
    sens = results["prediction_sensitivity"]
    lines += [
        "",
        f"Why v-prediction (sampler d's schedule, {h}x{h}x{c}, S = {sens['steps']}, eta = 0): a model output "
        f"off by {100 * sens['error']:g}% changes the samples by RMS {sens['rms_change']['epsilon']:.4f} "
        f"with epsilon prediction, {sens['rms_change']['v_prediction']:.4f} with v-prediction (at "
        "alpha_bar = 0 epsilon's x0 = (x - eps) / sqrt(alpha_bar) multiplies any error in eps by 4096).",
    ]
    lines += [
        "",
        "### The mechanism: what the first step's model expects to read from pure noise",
        "",
        "sqrt(alpha_bar) at the last training timestep T - 1 and at each sampler's first timestep t_1; "
        "the SNR of the brightness in x_t's pixel mean there, alpha_bar D Var(m) / (1 - alpha_bar), per "
        "resolution. A perfect model trusts that signal; pure noise carries none, so it reads medium "
        "brightness. For a Gaussian brightness prior the eta = 0 std ratio would be about "
        "1 / sqrt(1 + SNR).",
        "",
        "| sampler | sqrt(alpha_bar_T) | S | t_1 | sqrt(alpha_bar) at t_1 | "
        + " | ".join(f"SNR {s}x{s}" for s in results["sizes"])
        + " |",
        "|---|---|---|---|---|" + "---|" * len(results["sizes"]),
    ]
    for name in results["names"]:
        mech = results["mechanism"][name]
        for s in steps:
            first = mech["first_timestep"][str(s)]
            snr = " | ".join(f"{first['snr'][str(size)]:.3g}" for size in results["sizes"])
            lines.append(
                f"| {name} | {mech['sqrt_alpha_bar_T']:.4f} | {s} | {first['t']} | "
                f"{first['sqrt_alpha_bar']:.4f} | {snr} |"
            )
    return "\n".join(lines) + "\n"
