"""The exact brightness model (ddim_jax.demo.brightness): closed form against Monte Carlo, its optimality,
its predictions through ddim_jax, and the demo part at a small size."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("scipy")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import ddim_jax  # noqa: E402
from ddim_jax.demo import brightness as br  # noqa: E402

PRIOR = br.demo_prior()
SHAPE = (4, 4, 3)  # D = 48
D = int(np.prod(SHAPE))


def noisy_pairs(alpha_bar: float, n: int, seed: int = 0):
    k0, k1 = jax.random.split(jax.random.key(seed))
    x0 = br.sample_data(PRIOR, k0, (n, *SHAPE))
    x_t = np.sqrt(alpha_bar) * x0 + np.sqrt(1 - alpha_bar) * jax.random.normal(k1, x0.shape)
    return np.asarray(x0, np.float64), jnp.asarray(x_t, jnp.float32)


def test_data_brightness_is_the_level_and_matches_the_prior():
    x0 = np.asarray(br.sample_data(PRIOR, jax.random.key(0), (20000, *SHAPE)))
    m = x0.reshape(len(x0), -1).mean(1)
    mean, var = PRIOR.mean_and_variance()
    assert abs(m.mean() - mean) < 0.01 and abs(m.var() / var - 1) < 0.03
    texture = x0 - m[:, None, None, None]
    # texture: per-pixel variance texture_std^2 (D - 1) / D, orthogonal to the ones image
    np.testing.assert_allclose(texture.var(), float(PRIOR.texture_std) ** 2 * (D - 1) / D, rtol=0.02)
    np.testing.assert_allclose(texture.reshape(len(x0), -1).mean(1), 0.0, atol=1e-6)
    # five levels, equally likely: a histogram of m has five separated bumps
    counts = np.histogram(m, bins=[-1, -0.56, -0.19, 0.19, 0.56, 1])[0] / len(m)
    np.testing.assert_allclose(counts, 0.2, atol=0.015)


@pytest.mark.parametrize("alpha_bar", [0.9, 0.1, 0.0047, 1e-4])
def test_level_posterior_matches_importance_sampling(alpha_bar):
    """E[m | pixel mean of x_t]: the closed form against a self-normalised importance estimate."""
    rng = np.random.default_rng(1)
    levels = np.asarray(PRIOR.levels, np.float64)
    m = levels[rng.integers(0, 5, 400_000)] + float(PRIOR.level_std) * rng.normal(size=400_000)
    noise_var = (1 - alpha_bar) / D
    for observed in np.linspace(-0.9, 0.9, 7) * np.sqrt(alpha_bar) + rng.normal(size=7) * np.sqrt(noise_var):
        logw = -((observed - np.sqrt(alpha_bar) * m) ** 2) / (2 * noise_var)
        w = np.exp(logw - logw.max())
        monte_carlo = float(np.sum(w * m) / np.sum(w))
        x_t = jnp.full((1, *SHAPE), observed, jnp.float32)  # no texture: x0_hat is m_hat everywhere
        closed = float(br.posterior_mean(PRIOR, x_t, alpha_bar)[0, 0, 0, 0])
        ess = np.sum(w) ** 2 / np.sum(w**2)
        assert ess > 200
        assert (
            abs(closed - monte_carlo) < 4 * np.sqrt(np.sum(w**2 * (m - monte_carlo) ** 2)) / np.sum(w) + 1e-4
        )


@pytest.mark.parametrize("alpha_bar", [0.95, 0.3, 0.0047])
def test_posterior_mean_is_the_optimum(alpha_bar):
    """Its MSE is below every perturbed denoiser's (scaled, shifted, other texture gain, Gaussian prior)."""
    x0, x_t = noisy_pairs(alpha_bar, 20000)
    best = np.asarray(br.posterior_mean(PRIOR, x_t, alpha_bar), np.float64)
    mean = best.mean(axis=(1, 2, 3), keepdims=True)
    mu, var = PRIOR.mean_and_variance()
    gaussian = br.BrightnessPrior(
        levels=jnp.asarray([mu], jnp.float32),
        level_std=jnp.float32(np.sqrt(var)),
        weights=jnp.ones(1, jnp.float32),
        texture_std=PRIOR.texture_std,
    )
    rival_texture = PRIOR._replace(texture_std=1.5 * PRIOR.texture_std)
    rivals = {
        "scaled 1.3": 1.3 * best,
        "scaled 0.7": 0.7 * best,
        "shifted 0.05": best + 0.05,
        "mean scaled 1.3": best + 0.3 * mean,
        "texture x1.5": np.asarray(br.posterior_mean(rival_texture, x_t, alpha_bar)),
        "gaussian prior": np.asarray(br.posterior_mean(gaussian, x_t, alpha_bar)),
    }
    mse = np.mean((best - x0) ** 2)
    for name, rival in rivals.items():
        # the gap is E|rival - best|^2 for the optimum (no cross term): compare against it
        gap = np.mean((rival - x0) ** 2) - mse
        assert gap > 0.5 * np.mean((rival - best) ** 2), name
    # the residual is orthogonal to functions of x_t (here: x_t itself and its pixel mean)
    resid = (x0 - best).reshape(len(x0), -1)
    flat = np.asarray(x_t, np.float64).reshape(len(x0), -1)
    for product in (np.sum(resid * flat, axis=1), resid.mean(1) * flat.mean(1)):  # one value per image
        assert abs(product.mean()) < 4 * product.std() / np.sqrt(len(product))


def test_texture_gain_matches_regression():
    alpha_bar = 0.9
    x0, x_t = noisy_pairs(alpha_bar, 4000, seed=3)
    x_t = np.asarray(x_t, np.float64)
    orth = lambda x: (x - x.mean(axis=(1, 2, 3), keepdims=True)).ravel()  # noqa: E731
    slope = np.dot(orth(x_t), orth(x0)) / np.dot(orth(x_t), orth(x_t))
    best = np.asarray(br.posterior_mean(PRIOR, jnp.asarray(x_t, jnp.float32), alpha_bar), np.float64)
    gain = np.dot(orth(x_t), orth(best)) / np.dot(orth(x_t), orth(x_t))
    assert gain == pytest.approx(slope, rel=0.03)


@pytest.mark.parametrize("name", ["a", "d"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predictions_give_the_posterior_mean_through_ddim_jax_step(name, prediction_type):
    config = dataclasses.replace(br.sampler_config(name), prediction_type=prediction_type)
    state = ddim_jax.set_timesteps(ddim_jax.create_state(config), 10)
    _, x_t = noisy_pairs(0.3, 4)
    model = br.exact_model(prediction_type)
    for t in (int(state.timesteps[1]), int(state.timesteps[-1])):
        out = model(x_t, jnp.int32(t), PRIOR, state.alphas_cumprod)
        x0 = ddim_jax.step(state, out, t, x_t).pred_original_sample
        expected = br.posterior_mean(PRIOR, x_t, state.alphas_cumprod[t])
        np.testing.assert_allclose(x0, expected, atol=2e-4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="prediction_type must be"):
        br.exact_model("noise")
    with pytest.raises(ValueError, match="name must be one of"):
        br.sampler_config("e")
    with pytest.raises(ValueError, match="headline must be one of sizes"):
        br.run_part(sizes=(8,), headline=16)


def test_part_small_sd_schedule_narrows_brightness_zero_snr_does_not():
    """The claim at 16x16x3 (D = 768): under SD's schedule the perfect model narrows the brightness."""
    results, samples = br.run_part(
        sizes=(4, 16), headline=16, steps=(50,), etas=(0.0,), num_samples=300, seed=0, samplers="ad"
    )
    cells = results["cells"]
    a, d = cells["16"]["a"]["50"]["0"], cells["16"]["d"]["50"]["0"]
    assert a["std_ratio"] < 0.85 < 0.95 < d["std_ratio"] < 1.1
    assert a["w1"] > d["w1"]
    assert a["beyond_central_80"] < d["beyond_central_80"]
    assert a["min"] > d["min"] and a["max"] < d["max"]
    # it grows with resolution: at 4x4x3 (D = 48) SD's schedule barely narrows it
    assert cells["4"]["a"]["50"]["0"]["std_ratio"] > a["std_ratio"] + 0.1
    assert results["mechanism"]["d"]["sqrt_alpha_bar_T"] == 0.0
    assert results["mechanism"]["a"]["sqrt_alpha_bar_T"] == pytest.approx(0.0683, abs=1e-3)
    assert set(samples) == set("ad") and samples["a"].shape == (300, 16, 16, 3)
    assert "| d: zero-SNR" in br.brightness_markdown(results)
