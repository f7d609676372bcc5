"""Property test of the bad-input rule (docs/exactness.md): for drawn configs, shapes and values,
valid and invalid, the Python call either raises a ValueError / TypeError naming the parameter,
or returns a finite result; the same values traced under jit give all-NaN outputs where the
Python call raised, and the Python call's result (to float32 round-off) where it did not."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddim_jax import (
    DDIMConfig,
    add_noise,
    create_state,
    get_velocity,
    inverse_step,
    sample,
    scale_model_input,
    set_timesteps,
    step,
)

T = 1000
MAX_STEPS = 6
RULE = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples on every run (CI)
    suppress_health_check=[HealthCheck.too_slow],
)

CONFIGS = [
    DDIMConfig(clip_sample=False),
    DDIMConfig(prediction_type="v_prediction", timestep_spacing="trailing", prev_timestep_rule="schedule"),
    DDIMConfig(prediction_type="sample", set_alpha_to_one=False, timestep_spacing="linspace"),
]


@functools.cache
def state_for(config_index: int, num_steps: int):
    return set_timesteps(create_state(CONFIGS[config_index]), num_steps)


def model_fn(x, t):
    return jnp.tanh(x) + 1e-3 * t.astype(x.dtype)


def _step(state, t, eta, x):
    return step(state, 0.1 * x, t, x, eta=eta, variance_noise=0.5 * x)


def _inverse_step(state, t, eta, x):
    return inverse_step(state, 0.1 * x, t, x)


def _add_noise(state, t, eta, x):
    return add_noise(state, x, 0.5 * x, t)


def _get_velocity(state, t, eta, x):
    return get_velocity(state, x, 0.5 * x, t)


def _scale_model_input(state, t, eta, x):
    return scale_model_input(state, x, t)


CALLS = {f.__name__[1:]: f for f in (_step, _inverse_step, _add_noise, _get_velocity, _scale_model_input)}
NAMES = {
    "step": ("timestep", "eta"),
    "inverse_step": ("timestep",),
    "sample": ("num_inference_steps", "start_step"),
}


@functools.cache
def jitted(name: str):
    return jax.jit(CALLS[name])


def leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)]


def check_rule(python_call, traced_call, names):
    """Python: a clear error, or finite; traced: all NaN where Python raised, else equal."""
    try:
        expected = python_call()
    except (ValueError, TypeError) as err:
        assert any(name in str(err) for name in names), err
        got = traced_call()
        assert all(np.isnan(a).all() for a in leaves(got)), str(err)
        return "refused"
    got = traced_call()
    for a, b in zip(leaves(got), leaves(expected), strict=True):
        assert np.isfinite(b).all()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    return "ran"


timestep_values = st.one_of(
    st.integers(-3, 3),
    st.integers(T - 3, T + 3),
    st.integers(0, T - 1),
    st.sampled_from([-(2**31), 2**31 - 1]),
)


@RULE
@given(
    name=st.sampled_from(sorted(CALLS)),
    config_index=st.integers(0, len(CONFIGS) - 1),
    num_steps=st.sampled_from([1, 10]),
    batch=st.sampled_from([1, 2]),
    timestep=st.one_of(timestep_values, st.integers(0, 9).map(lambda i: -(i + 1))),
    per_example=st.booleans(),
    on_schedule=st.integers(0, 9),
    eta=st.one_of(st.floats(0, 1), st.sampled_from([-0.5, 1.5, float("nan"), float("inf")])),
)
def test_timestep_functions_follow_the_rule(
    name, config_index, num_steps, batch, timestep, per_example, on_schedule, eta
):
    state = state_for(config_index, num_steps)
    if timestep < 0 and timestep > -11:  # half of the draws: a timestep of the schedule
        timestep = int(state.timesteps[on_schedule % num_steps])
    x = jnp.linspace(-1.0, 1.0, batch * 3).reshape(batch, 3)
    t = [timestep] * batch if per_example else timestep
    t_array = jnp.asarray(t, jnp.int32)
    check_rule(
        lambda: CALLS[name](state, t, eta, x),
        lambda: jitted(name)(state, t_array, jnp.float32(eta), x),
        NAMES.get(name, ("timestep",)),
    )


@functools.cache
def runtime_sample(config_index: int):
    base = create_state(CONFIGS[config_index])

    def run(num_steps, start_step, eta, x, key):
        state = set_timesteps(base, num_steps, max_steps=MAX_STEPS)
        return sample(model_fn, state, x, start_step=start_step, eta=eta, key=key)

    return run, jax.jit(run)


@settings(RULE, max_examples=12)
@given(
    config_index=st.integers(0, len(CONFIGS) - 1),
    num_steps=st.integers(-1, MAX_STEPS + 1),
    start_step=st.integers(-1, MAX_STEPS + 1),
    eta=st.one_of(st.floats(0, 1), st.sampled_from([-0.25, 1.25])),
)
def test_runtime_sample_follows_the_rule(config_index, num_steps, start_step, eta):
    python_run, traced_run = runtime_sample(config_index)
    x, key = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), jax.random.key(1)
    outcome = check_rule(
        lambda: python_run(num_steps, start_step, eta, x, key),
        lambda: traced_run(jnp.int32(num_steps), jnp.int32(start_step), jnp.float32(eta), x, key),
        NAMES["sample"] + ("eta",),
    )
    valid = 1 <= num_steps <= MAX_STEPS and 0 <= start_step < num_steps and 0 <= eta <= 1
    assert outcome == ("ran" if valid else "refused")


@pytest.mark.parametrize("value", [2**32 + 3, -(2**32) + 3, 2**40])
def test_int64_values_are_checked_before_the_int32_cast(value):
    """The x64 case of the rule: a traced int64 timestep that wraps into range in int32."""
    state = state_for(0, 10)
    x = jnp.ones((1, 3))
    with jax.enable_x64(True):
        check_rule(
            lambda: step(state, 0.1 * x, np.int64(value), x),
            lambda: jax.jit(lambda t: step(state, 0.1 * x, t, x))(jnp.int64(value)),
            ("timestep",),
        )
