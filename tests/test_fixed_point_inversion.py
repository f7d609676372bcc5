"""`fixed_point_invert`: plain `sample` undoes it (far closer than DDIM inversion), the iterations
converge, runtime-length states and start steps equal the static program in one compilation,
the cost in model calls, and the bad-input rule for ``iterations``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _gaussian import gaussian_model

from ddim_jax import (
    DDIMConfig,
    apg,
    cfg_pp,
    create_state,
    fixed_point_invert,
    inverse_step,
    invert,
    sample,
    set_timesteps,
)

SHAPE = (2, 3, 4, 4)
M = 12  # max_steps of the runtime-length states
EPSILON = DDIMConfig(clip_sample=False)
# the demo model's setting: v-prediction, zero terminal SNR (alpha_cumprod = 0 at the last step)
VELOCITY = DDIMConfig(
    clip_sample=False,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    rescale_betas_zero_snr=True,
)


def model_fn(x, t, w):
    return jnp.tanh(w * x) * (0.5 + t.astype(x.dtype) / 1000)


def latents(seed=0):
    return jax.random.normal(jax.random.key(seed), SHAPE)


def max_error(x, ref):
    return float(jnp.abs(x - ref).max())


@pytest.mark.parametrize("config", [EPSILON, VELOCITY], ids=["epsilon", "v_prediction"])
def test_sample_undoes_it_far_closer_than_ddim_inversion(config):
    state = set_timesteps(create_state(config), 10)
    x0, args = latents(1), {"model_args": (0.8,)}
    ddim = max_error(sample(model_fn, state, invert(model_fn, state, x0, **args), **args), x0)
    x_T = fixed_point_invert(model_fn, state, x0, iterations=10, **args)
    fixed_point = max_error(sample(model_fn, state, x_T, **args), x0)
    assert ddim > 0.5 and fixed_point < 1e-3 * ddim, (ddim, fixed_point)


def test_an_iteration_is_inverse_step_with_the_model_at_the_target():
    """For an epsilon model: z_next = inverse_step(z_t, eps(z_next, t_next)), from DDIM inversion's z_next."""
    state = set_timesteps(create_state(EPSILON), 4)
    x0, t = latents(7), state.timesteps[3]  # start_step=3: the one step from x0 up to timesteps[3]
    eps = lambda z: model_fn(z, t, 0.8)  # noqa: E731
    z = inverse_step(state, eps(x0), t, x0).prev_sample  # DDIM inversion's estimate
    for iterations in (1, 2):
        z = inverse_step(state, eps(z), t, x0).prev_sample
        got = fixed_point_invert(model_fn, state, x0, iterations=iterations, model_args=(0.8,), start_step=3)
        np.testing.assert_allclose(got, z, rtol=1e-5, atol=1e-6)


def traced_iterations():
    traces = []

    @jax.jit
    def round_trip(iterations, x0):
        traces.append(1)  # runs only when jax traces (compiles)
        state = set_timesteps(create_state(EPSILON), 20)
        exact = gaussian_model(state)  # the exact denoiser of Gaussian data: a contraction
        return sample(exact, state, fixed_point_invert(exact, state, x0, iterations=iterations))

    return round_trip, traces


def test_iterations_converge_in_one_compilation():
    round_trip, traces = traced_iterations()
    x0 = latents(2)
    errors = [max_error(round_trip(k, x0), x0) for k in range(1, 9)]
    assert all(later < 0.3 * earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-5 and len(traces) == 1
    state = set_timesteps(create_state(EPSILON), 5)
    exact = gaussian_model(state)
    static = fixed_point_invert(exact, state, x0, iterations=3)  # a Python int: a scan
    traced = jax.jit(lambda k: fixed_point_invert(exact, state, x0, iterations=k))(3)
    np.testing.assert_allclose(traced, static, rtol=1e-6, atol=1e-6)


def runtime_runner(config=VELOCITY, model=model_fn):
    traces = []

    @jax.jit
    def runtime(num_steps, start, iterations, x0):
        traces.append(1)
        state = set_timesteps(create_state(config), num_steps, max_steps=M)
        return fixed_point_invert(
            model, state, x0, iterations=iterations, model_args=(0.8,), start_step=start
        )

    return runtime, traces


RUNTIME, RUNTIME_TRACES = runtime_runner()


def test_runtime_length_and_start_step_equal_the_static_program():
    x0 = latents(3)
    for num_steps, start, iterations in [(12, 0, 2), (5, 2, 3), (12, 11, 1)]:
        state = set_timesteps(create_state(VELOCITY), num_steps)
        want = fixed_point_invert(
            model_fn, state, x0, iterations=iterations, model_args=(0.8,), start_step=start
        )
        got = RUNTIME(num_steps, start, iterations, x0)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * float(jnp.abs(want).max()))
        args = {"model_args": (0.8,), "start_step": start}  # a partial inversion and its round trip
        ddim = max_error(sample(model_fn, state, invert(model_fn, state, x0, **args), **args), x0)
        assert max_error(sample(model_fn, state, want, **args), x0) < 0.1 * ddim, (num_steps, start)
    assert len(RUNTIME_TRACES) == 1


def test_traced_iterations_out_of_range_give_nan():
    x0 = latents(4)
    assert np.isfinite(RUNTIME(5, 1, 100, x0)).all()
    for iterations in (0, -1, 101):
        assert np.isnan(RUNTIME(5, 1, iterations, x0)).all(), iterations


@pytest.mark.parametrize("iterations", [0, 101, -3, True, 2.5, "3", np.array([1, 2]), jnp.float32(2)])
def test_bad_python_iterations_are_value_errors(iterations):
    state = set_timesteps(create_state(EPSILON), 4)
    with pytest.raises(ValueError, match=r"iterations must be an int in \[1, 100\]"):
        fixed_point_invert(model_fn, state, latents(), iterations=iterations, model_args=(0.8,))


def test_a_stateful_guider_is_refused():
    state = set_timesteps(create_state(EPSILON), 4)
    x = latents()
    with pytest.raises(ValueError, match="fixed_point_invert needs a stateless guider"):
        fixed_point_invert(lambda x, t: x, state, x, guider=apg(3.0, momentum=-0.5))


def guided_model(x, t, cond):
    return jnp.tanh(0.8 * x) + 0.3 * cond.reshape((-1,) + (1,) * (x.ndim - 1))


@pytest.mark.parametrize(
    "guidance", [{"guidance_scale": 3.0}, {"guider": cfg_pp(0.6)}], ids=["cfg", "cfg_pp"]
)
def test_guided_round_trip(guidance):
    state = set_timesteps(create_state(VELOCITY), 10)
    x0 = latents(5)
    args = {"model_args": (jnp.array([0.0, 0.0, 1.0, -1.0]),), **guidance}  # [uncond, cond]
    ddim = max_error(sample(guided_model, state, invert(guided_model, state, x0, **args), **args), x0)
    x_T = fixed_point_invert(guided_model, state, x0, iterations=10, **args)
    assert max_error(sample(guided_model, state, x_T, **args), x0) < 1e-3 * ddim


def test_model_calls_trajectory_callback_and_gradients():
    """(1 + iterations) calls a step; the trajectory ends at the result; remat gives the same
    gradient."""
    calls, seen = [], []

    def counting_model(x, t, w):
        jax.debug.callback(lambda: calls.append(1))
        return model_fn(x, t, w)

    count, _ = runtime_runner(model=counting_model)
    x0 = latents(6)
    for num_steps, start, iterations in [(12, 1, 3), (4, 0, 1)]:
        calls.clear()
        jax.block_until_ready(count(num_steps, start, iterations, x0))
        jax.effects_barrier()
        assert len(calls) == (1 + iterations) * (num_steps - start)
    state = set_timesteps(create_state(EPSILON), 4)
    out, trajectory = fixed_point_invert(
        model_fn,
        state,
        x0,
        iterations=2,
        model_args=(0.8,),
        return_trajectory=True,
        callback=lambda i, t, x0: seen.append(int(t)),
    )
    jax.effects_barrier()
    assert trajectory.prev_sample.shape == (4, *SHAPE) and seen == sorted(np.asarray(state.timesteps))
    np.testing.assert_array_equal(trajectory.prev_sample[-1], out)

    def loss(w, remat):
        x_T = fixed_point_invert(model_fn, state, x0, iterations=2, model_args=(w,), remat=remat)
        return jnp.sum(x_T**2)

    grad = jax.grad(loss)(0.8, False)
    assert np.isfinite(grad) and grad != 0
    np.testing.assert_allclose(jax.grad(loss)(0.8, True), grad, rtol=1e-5)
