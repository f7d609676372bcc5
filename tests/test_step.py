"""step under jit / vmap / grad, retracing, per-example timesteps, dtypes, NaN safety."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddim_jax import MIN_ALPHA_CUMPROD, DDIMConfig, create_state, set_timesteps, step

SHAPE = (3, 2, 4, 4)
CONFIGS = [
    DDIMConfig(),
    DDIMConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    DDIMConfig(
        prediction_type="sample", thresholding=True, sample_max_value=2.0, timestep_spacing="linspace"
    ),
    DDIMConfig(timestep_spacing="trailing", prev_timestep_rule="schedule", clip_sample=False),
]


def _inputs(seed: int = 0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(k1, SHAPE),
        2 * jax.random.normal(k2, SHAPE),
        jax.random.normal(k3, SHAPE),
    )


@pytest.mark.parametrize("config", CONFIGS)
def test_jit_equals_eager(config):
    state = set_timesteps(create_state(config), 7)
    sample, model_output, noise = _inputs()
    jitted = jax.jit(step, static_argnames="use_clipped_model_output")
    kwargs = {"eta": 0.7, "variance_noise": noise, "use_clipped_model_output": True}
    for t in (int(state.timesteps[0]), int(state.timesteps[-1])):
        for a, b in zip(
            step(state, model_output, t, sample), jitted(state, model_output, t, sample), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        eager = step(state, model_output, t, sample, **kwargs)
        jit = jitted(state, model_output, jnp.int32(t), sample, **kwargs)
        for a, b in zip(eager, jit, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_jitted_step_does_not_retrace_on_new_values():
    traces = []

    @jax.jit
    def jitted(state, model_output, t, sample, eta, key):
        traces.append(1)
        return step(state, model_output, t, sample, eta=eta, key=key)

    state = set_timesteps(create_state(DDIMConfig()), 10)
    for i, t in enumerate(state.timesteps.tolist()[:4]):
        sample, model_output, _ = _inputs(i)
        out = jitted(state, model_output, jnp.int32(t), sample, jnp.float32(i / 10), jax.random.key(i))
    # a state with other timestep values but the same S and config
    other = set_timesteps(create_state(DDIMConfig()), 10)
    jitted(other, model_output, jnp.int32(5), sample, jnp.float32(1.0), jax.random.key(99))
    assert len(traces) == 1
    assert np.isfinite(out.prev_sample).all()


def test_per_example_timesteps_equal_separate_calls():
    for config in CONFIGS[1:3]:
        state = set_timesteps(create_state(config), 9)
        sample, model_output, noise = _inputs(1)
        t = state.timesteps[jnp.array([0, 4, 8])]
        kwargs = {"eta": 0.5, "use_clipped_model_output": True}
        batched = step(state, model_output, t, sample, variance_noise=noise, **kwargs)
        for i in range(SHAPE[0]):
            single = step(
                state, model_output[i : i + 1], int(t[i]), sample[i : i + 1], variance_noise=noise[i : i + 1],
                **kwargs,
            )  # fmt: skip
            for a, b in zip(batched, single, strict=True):
                np.testing.assert_allclose(a[i : i + 1], b, rtol=1e-6, atol=1e-6)
        jitted = jax.jit(lambda s, m, t, x, n: step(s, m, t, x, eta=0.5, variance_noise=n))
        np.testing.assert_allclose(
            jitted(state, model_output, t, sample, noise).prev_sample,
            step(state, model_output, t, sample, eta=0.5, variance_noise=noise).prev_sample,
            rtol=1e-6,
            atol=1e-6,
        )


def test_vmap_over_examples():
    state = set_timesteps(create_state(CONFIGS[2]), 9)
    sample, model_output, noise = _inputs(2)
    t = state.timesteps[jnp.array([1, 3, 8])]

    def one(m, tt, x, n):  # one example, kept batch-first for thresholding
        out = step(state, m[None], tt, x[None], eta=1.0, variance_noise=n[None])
        return jax.tree_util.tree_map(lambda a: a[0], out)

    mapped = jax.vmap(one)(model_output, t, sample, noise)
    batched = step(state, model_output, t, sample, eta=1.0, variance_noise=noise)
    for a, b in zip(mapped, batched, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "config",
    [DDIMConfig(clip_sample=False), DDIMConfig(rescale_betas_zero_snr=True, timestep_spacing="trailing")],
)
def test_grad_is_finite_including_eta_one_at_the_last_step(config):
    state = set_timesteps(create_state(config), 10)
    sample, model_output, noise = _inputs(3)

    def loss(m, x, eta, t):
        out = step(state, m, t, x, eta=eta, variance_noise=noise)
        return jnp.sum(out.prev_sample**2) + jnp.sum(out.pred_original_sample)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    # the last step: a_prev = 1, so 1 - a_prev - std^2 = 0 at eta = 1; the first at zero SNR: a_t = 0
    for t in (int(state.timesteps[-1]), int(state.timesteps[0])):
        for eta in (0.0, 0.5, 1.0):
            for g in grad(model_output, sample, jnp.float32(eta), jnp.int32(t)):
                assert np.isfinite(g).all(), (t, eta)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_model_output_gives_float32(dtype):
    state = set_timesteps(create_state(CONFIGS[1]), 10)
    sample, model_output, noise = _inputs(4)
    low = model_output.astype(dtype)
    for x in (sample, sample.astype(dtype)):
        out = step(state, low, int(state.timesteps[2]), x, eta=0.5, variance_noise=noise)
        assert out.prev_sample.dtype == jnp.float32 and out.pred_original_sample.dtype == jnp.float32
        ref = step(state, low.astype(jnp.float32), int(state.timesteps[2]), x.astype(jnp.float32), eta=0.5,
                   variance_noise=noise)  # fmt: skip
        np.testing.assert_array_equal(out.prev_sample, ref.prev_sample)


def test_float64_stays_float64_with_x64():
    with jax.enable_x64(True):
        state = set_timesteps(create_state(CONFIGS[0]), 10)
        rng = np.random.default_rng(0)
        sample, model_output = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
        assert sample.dtype == np.float64
        jitted = jax.jit(lambda m, x: step(state, m, state.timesteps[3], x, eta=0.3, variance_noise=x))
        out = jitted(model_output, sample)
        assert out.prev_sample.dtype == jnp.float64 and out.pred_original_sample.dtype == jnp.float64
        out32 = jitted(model_output.astype(np.float32), sample.astype(np.float32))
        assert out32.prev_sample.dtype == jnp.float32
    assert jnp.zeros(1).dtype == jnp.float32  # x64 did not leak


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_eta_one_never_nan(spacing, zero_snr):
    """diffusers #5969: at eta = 1, 1 - a_prev - std^2 rounds below 0 in float32 (NaN there)."""
    config = DDIMConfig(
        timestep_spacing=spacing, rescale_betas_zero_snr=zero_snr, set_alpha_to_one=zero_snr,
        prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    )  # fmt: skip
    sample, model_output, noise = _inputs(5)
    for steps in (7, 50, 1000):
        state = set_timesteps(create_state(config), steps)
        t = state.timesteps
        idx = jnp.arange(0, steps, max(1, steps // 40))
        for i in idx.tolist():
            tt = jnp.full((SHAPE[0],), t[i], jnp.int32)
            out = step(state, model_output, tt, sample, eta=1.0, variance_noise=noise)
            assert np.isfinite(out.prev_sample).all(), (steps, int(t[i]))


def test_zero_snr_epsilon_is_finite_by_the_documented_clamp():
    config = DDIMConfig(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    state = set_timesteps(create_state(config), 10)
    assert float(state.alphas_cumprod[-1]) == 0.0 and int(state.timesteps[0]) == 999
    sample, model_output, noise = _inputs(6)
    for kwargs in ({}, {"eta": 1.0, "variance_noise": noise}):
        out = step(state, model_output, 999, sample, **kwargs)
        assert np.isfinite(out.prev_sample).all() and np.isfinite(out.pred_original_sample).all()
    a = MIN_ALPHA_CUMPROD
    expected = (sample - np.sqrt(1 - a) * model_output) / np.sqrt(a)
    np.testing.assert_allclose(out.pred_original_sample, expected, rtol=1e-5)


def test_key_noise_and_eta_zero():
    state = set_timesteps(create_state(CONFIGS[0]), 10)
    sample, model_output, _ = _inputs(7)
    t, key = int(state.timesteps[1]), jax.random.key(3)
    drawn = jax.random.normal(key, SHAPE, jnp.float32)
    with_key = step(state, model_output, t, sample, eta=0.8, key=key)
    with_noise = step(state, model_output, t, sample, eta=0.8, variance_noise=drawn)
    np.testing.assert_array_equal(with_key.prev_sample, with_noise.prev_sample)
    plain = step(state, model_output, t, sample)
    np.testing.assert_array_equal(
        step(state, model_output, t, sample, eta=0.0, key=key).prev_sample, plain.prev_sample
    )
    assert not np.allclose(with_key.prev_sample, plain.prev_sample)
