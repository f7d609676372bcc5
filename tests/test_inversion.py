"""DDIM inversion: `inverse_step` against diffusers ``DDIMInverseScheduler``, `invert`, round trips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _diffusers_ref import ORACLE_RTOL, RTOL, max_rel_err, oracle_tables, oracle_x0_and_eps
from _gaussian import MU, SIGMA, exact_encoding, gaussian_model

from ddim_jax import DDIMConfig, create_state, inverse_step, invert, sample, set_timesteps

SHAPE = (2, 3, 4, 4)


def inverse_oracle(config, t, source_t, model_output, sample):
    """diffusers' DDIMInverseScheduler.step in float64 (it clips x0 but never thresholds)."""
    ac, initial, om, initial_om = oracle_tables(config)
    a_t, om_t = (ac[source_t], om[source_t]) if source_t >= 0 else (initial, initial_om)
    x0, eps = oracle_x0_and_eps(config, a_t, om_t, model_output, sample)
    return np.sqrt(ac[t]) * x0 + np.sqrt(om[t]) * eps, x0


def make_state(steps, **config):
    return set_timesteps(create_state(DDIMConfig(**config)), steps)


INVERSE_CONFIGS = [
    {},
    {"set_alpha_to_one": False, "steps_offset": 1},
    {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "clip_sample": False},
    {"prediction_type": "sample", "clip_sample_range": 0.5, "set_alpha_to_one": False},
    {"thresholding": True, "clip_sample": True},  # the inverse scheduler only clips
    {
        "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": True,
        "prediction_type": "v_prediction",
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
    },
    {"beta_schedule": "squaredcos_cap_v2", "set_alpha_to_one": False, "timestep_spacing": "trailing"},
]


@pytest.mark.parametrize("config", INVERSE_CONFIGS)
@pytest.mark.parametrize("steps", [7, 10])
def test_inverse_step_matches_diffusers_inverse_scheduler(config, steps):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import DDIMInverseScheduler

    ref_kwargs = {k: v for k, v in config.items() if k != "thresholding"}
    scheduler = DDIMInverseScheduler(**ref_kwargs)
    scheduler.set_timesteps(steps)
    state = make_state(steps, **config)
    # The inverse scheduler's schedule is the forward one, ascending.
    np.testing.assert_array_equal(scheduler.timesteps.numpy(), np.asarray(state.timesteps)[::-1])

    rng = np.random.default_rng(steps)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    scale = 2.0 if config.get("prediction_type") == "sample" else 1.0  # x0 beyond the clip range
    for t in scheduler.timesteps.tolist():
        model_output = (0.3 * x + scale * rng.standard_normal(SHAPE)).astype(np.float32)
        ref = scheduler.step(torch.from_numpy(model_output), int(t), torch.from_numpy(x))
        ours = inverse_step(state, model_output, t, x)
        assert ours.prev_sample.dtype == jnp.float32
        source_t = min(t - state.config.num_train_timesteps // steps, state.config.num_train_timesteps - 1)
        oracle = inverse_oracle(ref_kwargs, t, source_t, model_output, x)
        diffusers = (ref.prev_sample.numpy(), ref.pred_original_sample.numpy())
        # Within float32 round-off of exact arithmetic; equal to diffusers up to its own round-off
        # (large at small t, where diffusers' 1 - alphas_cumprod loses digits).
        assert max_rel_err(ours, oracle) <= ORACLE_RTOL, t
        assert max_rel_err(ours, diffusers) <= RTOL + max_rel_err(diffusers, oracle), t
        x = diffusers[0]


def test_inverse_step_per_example_timesteps():
    state = make_state(10, clip_sample=False)
    rng = np.random.default_rng(0)
    x, mo = rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)
    ts = np.asarray(state.timesteps)[[2, 7]]
    both = inverse_step(state, mo, jnp.asarray(ts, jnp.int32), x).prev_sample
    for i in range(2):
        one = inverse_step(state, mo[i : i + 1], int(ts[i]), x[i : i + 1]).prev_sample
        np.testing.assert_allclose(both[i : i + 1], one, rtol=1e-6, atol=1e-6)


def model_fn(x, t, w):
    return jnp.tanh(w * x) + 1e-3 * t.astype(x.dtype)


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        {"prev_timestep_rule": "schedule"},
    ],
)
def test_invert_equals_python_loop_of_inverse_step(config):
    state = make_state(6, **config)
    x0 = jax.random.normal(jax.random.key(0), SHAPE)

    @jax.jit
    def one(x, t):
        return inverse_step(state, model_fn(x, t, 0.6), t, x).prev_sample

    ref = x0
    for t in np.asarray(state.timesteps)[::-1].tolist():
        ref = one(ref, jnp.int32(t))
    out, traj = jax.jit(lambda x, w: invert(model_fn, state, x, model_args=(w,), return_trajectory=True))(
        x0, 0.6
    )
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    assert traj.prev_sample.shape == (6, *SHAPE)
    np.testing.assert_array_equal(traj.prev_sample[-1], out)


def test_invert_with_guidance_equals_loop_of_guided_inverse_step():
    state = make_state(5, clip_sample=False)
    x0 = jax.random.normal(jax.random.key(1), SHAPE)
    emb = jnp.array([0.0, 0.0, 0.5, -0.4])  # [uncond, cond] per example of the doubled batch

    def cond_model(x, t, emb):
        return jnp.tanh(x) * (1 + emb[:, None, None, None])

    ref = x0
    for t in np.asarray(state.timesteps)[::-1].tolist():
        u, c = cond_model(ref, t, emb[:2]), cond_model(ref, t, emb[2:])
        ref = inverse_step(state, u + 3.0 * (c - u), t, ref).prev_sample
    out = invert(cond_model, state, x0, model_args=(emb,), guidance_scale=3.0)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_invert_no_recompile_and_callback():
    state = make_state(4)
    traces, calls = [], []

    @jax.jit
    def run(x, w, scale):
        traces.append(1)
        return invert(
            lambda x, t, w: jnp.tanh(w * x),
            state,
            x,
            model_args=(w,),
            guidance_scale=scale,
            callback=lambda i, t, x0: calls.append((int(i), int(t))),
            callback_every=2,
        )

    for i in range(3):
        run(jax.random.normal(jax.random.key(i), SHAPE), 0.5 + i, 1.0 + i).block_until_ready()
    jax.effects_barrier()
    assert len(traces) == 1 and run._cache_size() == 1
    ascending = np.asarray(state.timesteps)[::-1].tolist()
    assert sorted(calls) == sorted(3 * [(0, ascending[0]), (2, ascending[2]), (3, ascending[3])])


# The exact Gaussian denoiser (tests/_gaussian.py): DDIM's ODE for it is smooth, so inverting and
# then sampling must reconstruct x0 up to a discretization error that falls with S.


def order(errors, steps):
    """The fitted convergence order: the slope of log(error) against log(1 / S)."""
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])


# Trailing spacing with S = 160 (not a divisor of T) needs the schedule's true previous timestep;
# diffusers' ``t - T // S`` rule encodes to a visibly wrong x_T there (REFERENCE.md, diffusers #9261).
@pytest.mark.parametrize(("spacing", "rule"), [("leading", "diffusers"), ("trailing", "schedule")])
def test_invert_then_sample_reconstructs_and_error_falls_with_steps(spacing, rule):
    x0 = MU + SIGMA * jax.random.normal(jax.random.key(0), (4, 64))
    rms = lambda a, b: float(jnp.sqrt(jnp.mean((a - b) ** 2)))  # noqa: E731
    steps = (10, 40, 160)
    errors, encode_errors = [], []
    for s in steps:
        state = make_state(s, clip_sample=False, timestep_spacing=spacing, prev_timestep_rule=rule)
        model = gaussian_model(state)
        noise = invert(model, state, x0)
        encode_errors.append(rms(noise, exact_encoding(state, x0, 0)))
        errors.append(rms(sample(model, state, noise), x0))
    # Measured: round trip rms ~0.15 / 0.045 / 0.011 (first order in 1/S, as DDIM's Euler-like step).
    assert errors[-1] < 0.02 and encode_errors[-1] < 0.03, (errors, encode_errors)
    assert order(errors, steps) > 0.8 and order(encode_errors, steps) > 0.8, (errors, encode_errors)


def test_partial_inversion_stops_where_sample_starts():
    """invert(start_step=k) runs the full inversion's first S - k steps and stops at timesteps[k];
    sample(start_step=k) from there reconstructs x0 (the exact Gaussian denoiser)."""
    state, k = make_state(40, clip_sample=False), 25
    model = gaussian_model(state)
    x0 = MU + SIGMA * jax.random.normal(jax.random.key(0), (4, 64))
    _, full = invert(model, state, x0, return_trajectory=True)
    x_k = invert(model, state, x0, start_step=k)
    np.testing.assert_allclose(x_k, full.prev_sample[state.num_inference_steps - k - 1], rtol=1e-6, atol=1e-6)
    exact = exact_encoding(state, x0, k)
    # Measured: rms 0.031 from the exact ODE value, 0.033 round trip (0.045 for the full round trip).
    assert float(jnp.sqrt(jnp.mean((x_k - exact) ** 2))) < 0.045
    assert float(jnp.sqrt(jnp.mean((sample(model, state, x_k, start_step=k) - x0) ** 2))) < 0.045
    with pytest.raises(ValueError, match=r"start_step must be an int in \[0, num_inference_steps=40\)"):
        invert(model, state, x0, start_step=40)


def test_invert_bad_inputs():
    state = make_state(4)
    x = jnp.ones(SHAPE)
    with pytest.raises(ValueError, match=r"model_fn output has shape \(3,\)"):
        invert(lambda x, t: jnp.zeros(3), state, x)
    with pytest.raises(TypeError, match="model_args must be a tuple"):
        invert(lambda x, t, w: x, state, x, model_args=1.0)
    with pytest.raises(ValueError, match="callback_every must be an int >= 1"):
        invert(lambda x, t: x, state, x, callback=print, callback_every=-2)
    with pytest.raises(ValueError, match="invert needs timesteps"):
        invert(lambda x, t: x, create_state(DDIMConfig()), x)
    with pytest.raises(ValueError, match=r"Shape mismatch: model_output has shape \(2, 3\)"):
        inverse_step(state, jnp.ones((2, 3)), 0, x)
    with pytest.raises(ValueError, match=r"timestep must be in \[0, num_train_timesteps=1000\)"):
        inverse_step(state, x, 1000, x)
    with pytest.raises(TypeError, match="timestep must hold integers"):
        inverse_step(state, x, 1.5, x)
