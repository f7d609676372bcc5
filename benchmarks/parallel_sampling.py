"""Parallel (ParaDiGMS) sampling: `ddim_jax.parallel_sample` against `ddim_jax.sample` on the demo's
trained digits UNet: sequential model rounds against S and tolerance, sample quality (FCD) against
`sample`'s from the same x_T, and wall time at batch 1; on a GPU also a latent-size UNet at batch 1.

Every image is sampled at batch 1 (``parallel_sample`` vmapped over the examples), so each
example's round count is the one it gets alone. The demo's parameters come from its cache
(``$DDIM_JAX_DEMO_CACHE``, default ``~/.cache/ddim_jax``) and are trained there when missing
(1-2 min on a CPU).

Usage: ``python benchmarks/parallel_sampling.py [--quick] [--repeats N]``
"""

from __future__ import annotations

import functools
import math
import os

import _bench as B
import jax
import jax.numpy as jnp
import numpy as np

import ddim_jax

STEPS = (25, 50, 100, 1000)
TOLERANCES = (0.05, 0.1, 0.3)  # diffusers' parallel pipeline defaults to 0.1
TOLERANCES_S1000 = (0.1,)  # S = 1000 costs the most: one tolerance
WINDOW = 32  # steps per batched model call (clamped to S)
NUM_SAMPLES = 200
BOOTSTRAP = 20  # resamples of sample's images for the FCD's noise
# (S, batch) of the wall-time tables: the goal's case, many steps, and a batch that fills the CPU.
LATENCY_CASES = ((100, 1), (1000, 1), (100, 64))
LATENCY_CONTENDERS = ((8, 0.1), (32, 0.1))  # (window, tolerance)
CACHE_DIR = os.environ.get("DDIM_JAX_DEMO_CACHE", os.path.join("~", ".cache", "ddim_jax"))
# On a GPU: a latent-diffusion-sized UNet (random weights) at batch 1.
GPU_UNET = ((1, 64, 64, 4), (64, 128))


def demo_model(quick: bool, with_quality: bool):
    """(model, params, scheduler config, feature net, reference digits): the demo's class-conditional
    epsilon model (part ``ddim``'s); the last two are None without ``with_quality``, and then cached
    parameters load without the digits. References are brightness-varied like the demo's."""
    from ddim_jax.demo.data import load_digits_split, vary_brightness
    from ddim_jax.demo.metrics import FeatureNet, default_feature_net
    from ddim_jax.demo.train import TrainSettings, cache_path, load_or_train, make_model

    if quick:  # a barely trained tiny model and raw-pixel features: a smoke check only
        settings, cache_dir = TrainSettings(channels=(4,), train_steps=2, batch_size=4), None
    else:
        settings, cache_dir = TrainSettings(), CACHE_DIR
    if not with_quality and cache_dir is not None and cache_path(settings, cache_dir).is_file():
        params, _ = load_or_train(settings, None, None, cache_dir, progress=False)  # no scikit-learn needed
        return make_model(settings), params, settings.scheduler_config(), None, None
    digits = load_digits_split()
    params, _ = load_or_train(settings, digits.x_train, digits.y_train, cache_dir, progress=False)
    features = None
    if with_quality:
        pixels = FeatureNet(lambda x: np.reshape(np.asarray(x, np.float64), (len(x), -1)), 1.0)
        features = pixels if quick else default_feature_net(0)
    x_reference = np.asarray(vary_brightness(digits.x_train, jax.random.key(100)))  # as the demo's tables
    return make_model(settings), params, settings.scheduler_config(), features, x_reference


def labelled_model_fn(model):
    """``model_fn(x, t, params, labels)``; ``labels`` (one per example) are ignored by an
    unconditional model (``num_classes == 0``, the GPU part's random UNet)."""

    def model_fn(x, t, params, labels):
        return model.apply(params, x, t, labels=labels if model.num_classes else None)

    return model_fn


@functools.lru_cache(maxsize=16)
def samplers(model, config, steps: int, window: int):
    """Jitted ``sample`` on a batch and ``parallel_sample`` on each example alone (vmapped)."""
    state = ddim_jax.set_timesteps(ddim_jax.create_state(config), steps)
    model_fn = labelled_model_fn(model)

    @jax.jit
    def sequential(params, x, labels):
        return ddim_jax.sample(model_fn, state, x, model_args=(params, labels))

    @jax.jit
    def parallel(params, x, labels, tolerance):
        def one(x, label):
            out = ddim_jax.parallel_sample(
                model_fn, state, x[None], window=window, tolerance=tolerance, model_args=(params, label[None])
            )
            return out.sample[0], out.iterations, out.converged

        return jax.vmap(one)(x, labels)

    return sequential, parallel


def fcd(features, reference, images) -> float:
    from ddim_jax.demo.metrics import feature_stats, frechet_distance

    return frechet_distance(reference, feature_stats(features.features(images)))


def bootstrap_std(features, reference, images, seed: int = 0) -> float:
    """The FCD's noise at this sample size: its std over resamples (with replacement) of ``images``."""
    from ddim_jax.demo.metrics import feature_stats, frechet_distance

    feats = features.features(images)
    rng = np.random.default_rng(seed)
    draws = [
        frechet_distance(reference, feature_stats(feats[rng.integers(0, len(feats), len(feats))]))
        for _ in range(BOOTSTRAP)
    ]
    return float(np.std(draws))


def quality_rows(model, params, config, features, x_reference, quick: bool) -> tuple[list, list]:
    from ddim_jax.demo.experiments import balanced_labels
    from ddim_jax.demo.metrics import feature_stats

    reference = feature_stats(features.features(x_reference))
    n = 8 if quick else NUM_SAMPLES
    x_T = jax.random.normal(jax.random.key(0), (n, 8, 8, 1), jnp.float32)
    labels = jnp.asarray(balanced_labels(n), jnp.int32)  # the ten digits in equal shares, as Table 1
    rows, skipped = [], []
    for steps in (10,) if quick else STEPS:
        if B.out_of_time():
            skipped.append(f"S={steps}")
            continue
        window = min(WINDOW, steps)
        sequential, parallel = samplers(model, config, steps, window)
        exact = np.asarray(B.block(sequential(params, x_T, labels)))
        base, noise = fcd(features, reference, exact), bootstrap_std(features, reference, exact)
        rows.append([steps, "sample", "-", steps, steps, "1", f"{base:.2f} +- {noise:.2f}", "-", "-"])
        for tolerance in (0.1,) if quick else (TOLERANCES_S1000 if steps == 1000 else TOLERANCES):
            images, iterations, converged = B.block(parallel(params, x_T, labels, jnp.float32(tolerance)))
            images, iterations = np.asarray(images), np.asarray(iterations)
            assert bool(np.all(converged)), (steps, tolerance)
            score = fcd(features, reference, images)
            rms = float(np.sqrt(np.mean((images - exact) ** 2)))
            mean_rounds = float(iterations.mean())
            rows.append(
                [
                    steps,
                    f"parallel, window {window}",
                    tolerance,
                    f"{mean_rounds:.1f}",
                    int(iterations.max()),
                    f"{mean_rounds / steps:.3f}",
                    f"{score:.2f}",
                    f"{score - base:+.2f}",
                    f"{rms:.1e}",
                ]
            )
            label = f"S={steps}, tol={tolerance:g}"
            B.record("parallel_rounds", label, mean_rounds / steps)
            B.record("parallel_fcd_delta", label, (score - base) / noise if noise > 0 else math.inf)
    return rows, skipped


def latency_rows(
    model, params, config, shape, steps: int, repeats: int, fixed_rounds=None
) -> tuple[list, dict]:
    """Wall time at batch 1: ``sample`` against ``parallel_sample`` per (window, tolerance).

    With ``fixed_rounds`` (window -> R) the parallel contenders run exactly R rounds
    (tolerance 0, ``max_iterations=R``): the latency at a round count measured elsewhere.
    """
    state = ddim_jax.set_timesteps(ddim_jax.create_state(config), steps)
    x = B.latents(shape)
    labels = jnp.zeros(shape[:1], jnp.int32)  # digit 0 (ignored by an unconditional model)
    model_fn = labelled_model_fn(model)

    contenders, rounds, compile_s = {}, {}, {}
    compiled, lo, co = B.compile_jit(
        lambda p, x: ddim_jax.sample(model_fn, state, x, model_args=(p, labels)), params, x
    )
    contenders["sample"], rounds["sample"], compile_s["sample"] = (
        functools.partial(lambda c: B.block(c(params, x)), compiled),
        steps,
        lo + co,
    )
    for window, tolerance in LATENCY_CONTENDERS:
        window = min(window, steps)
        cap = None if fixed_rounds is None else fixed_rounds[window]
        tol = tolerance if cap is None else 0.0

        def run(p, x, tol, window=window, cap=cap):
            out = ddim_jax.parallel_sample(
                model_fn, state, x, window=window, tolerance=tol, max_iterations=cap, model_args=(p, labels)
            )
            return out.sample, out.iterations

        label = f"parallel, window {window}, " + (f"tol {tolerance:g}" if cap is None else f"{cap} rounds")
        compiled, lo, co = B.compile_jit(run, params, x, jnp.float32(tol))
        rounds[label] = int(compiled(params, x, jnp.float32(tol))[1])
        compile_s[label] = lo + co
        contenders[label] = functools.partial(
            lambda c, t: B.block(c(params, x, t)), compiled, jnp.float32(tol)
        )
    med = B.interleaved(contenders, repeats)
    base = med["sample"]
    rows = [
        [
            label,
            rounds[label],
            t * 1e3,
            t / rounds[label] * 1e3,
            f"{base / t:.2f}x",
            f"{compile_s[label]:.1f}",
        ]
        for label, t in med.items()
    ]
    return rows, {label: base / t for label, t in med.items() if label != "sample"}


def run(quick: bool = False, repeats: int | None = None) -> str:
    repeats = repeats or B.default_repeats(quick)
    # Rounds and quality do not depend on the device: measured on a CPU, skipped on a GPU.
    with_quality = quick or not B.on_gpu()
    model, params, config, features, x_reference = demo_model(quick, with_quality)
    text = ""
    if with_quality:
        quality, skipped = quality_rows(model, params, config, features, x_reference, quick)
        n = 8 if quick else NUM_SAMPLES
        text = (
            f"### Parallel sampling (ParaDiGMS): rounds and quality on the demo's digits UNet, eta = 0\n\n"
            f"{n} images, each sampled at batch 1 from the same x_T by `sample` and by "
            f"`parallel_sample` (window {WINDOW}, clamped to S). rounds = sequential model calls "
            "(mean and max over the images; `sample`: S). FCD as in the demo's Table 1 (against the "
            "training digits), with the std of sample's FCD over bootstrap resamples of its images as "
            "the metric's noise; rms = root-mean-square pixel distance ([-1, 1] scale) to sample's "
            "images.\n\n"
            + B.table(
                [
                    "S",
                    "sampler",
                    "tolerance",
                    "rounds (mean)",
                    "rounds (max)",
                    "rounds / S",
                    "FCD",
                    "FCD - sample's",
                    "rms",
                ],
                quality,
            )
            + "\n"
            + (f"\nSkipped (time budget spent): {', '.join(skipped)}\n" if skipped else "")
        )
    if B.out_of_time():
        return text + "\nLatency: skipped (time budget spent)\n"
    header = ["contender", "rounds", "ms / call", "ms / round", "speedup vs sample", "compile s"]
    goal_rows = None
    cases = ((10, 1),) if quick else LATENCY_CASES
    for steps, batch in cases:
        if B.out_of_time():
            text += f"\nLatency S = {steps}, batch {batch}: skipped (time budget spent)\n"
            continue
        rows, ratios = latency_rows(model, params, config, (batch, 8, 8, 1), steps, repeats)
        if (steps, batch) == cases[0]:
            goal_rows = rows
        for label, ratio in ratios.items():
            B.record("parallel_latency", f"digits, B={batch}, S={steps}, {label}", ratio)
        text += (
            f"\n### Parallel sampling: wall time, digits UNet, batch {batch}, S = {steps} "
            f"(median of {repeats} interleaved repeats)\n\n" + B.table(header, rows) + "\n"
        )
        if batch > 1:
            text += "\nOne window for the whole batch: its rounds are those of the slowest example.\n"
    if B.on_gpu() and goal_rows and not B.out_of_time():
        from unet_e2e import make_model

        shape, channels = GPU_UNET
        big, big_params = make_model(shape, channels)
        # window -> the rounds the digits model needed at the contender's tolerance
        fixed = {int(row[0].split("window ")[1].split(",")[0]): row[1] for row in goal_rows[1:]}
        steps = cases[0][0]
        big_rows, big_ratios = latency_rows(
            big, big_params, ddim_jax.DDIMConfig(**B.SD_CONFIG), shape, steps, repeats, fixed_rounds=fixed
        )
        for label, ratio in big_ratios.items():
            B.record("parallel_latency", f"UNet {B.shape_str(shape)}, B=1, S={steps}, {label}", ratio)
        text += (
            f"\n### Parallel sampling: wall time at batch 1, UNet {B.shape_str(shape)} ch={channels} "
            f"(random weights), S = {steps}\n\nThe parallel contenders run exactly the rounds the digits "
            "model needed above at tolerance 0.1 (random weights say nothing about convergence).\n\n"
            + B.table(header, big_rows)
            + "\n"
        )
    return text


def main() -> None:
    args = B.parser(__doc__.splitlines()[0]).parse_args()
    print(run(args.quick, args.repeats))


if __name__ == "__main__":
    main()
