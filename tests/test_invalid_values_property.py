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
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ddim_jax import (
    DDIMConfig,
    add_noise,
    bdia_sample,
    create_state,
    edict_sample,
    get_velocity,
    inverse_step,
    invert,
    parallel_sample,
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


# --- guiders: every parameter of every guider, in every loop that takes it ------------------------

INF = float("inf")
REAL = (-INF, INF, "open")  # every finite number
UNIT = (0.0, 1.0, "closed")
# The range of each numeric parameter of each guider factory (docs/guidance.md's table), read
# against the factories' signatures below: a new guider or parameter without an entry fails
# `test_every_guider_parameter_has_a_range`, so the property test covers it by construction.
GUIDER_RANGES = {
    "cfg": {"guidance_scale": REAL, "guidance_rescale": UNIT},
    "cfg_zero_star": {"guidance_scale": REAL, "zero_init_steps": "steps", "guidance_rescale": UNIT},
    "apg": {
        "guidance_scale": REAL,
        "momentum": REAL,
        "norm_threshold": REAL,
        "eta": REAL,
        "guidance_rescale": UNIT,
    },
    "tangential_cfg": {"guidance_scale": REAL, "guidance_rescale": UNIT},
    "cfg_pp": {"guidance_scale": UNIT},
    "shorthand": {"guidance_scale": REAL, "guidance_rescale": UNIT},  # the loops' cfg arguments
}
WINDOW = {"start": (0.0, 1.0, "half-open"), "stop": "stop"}  # guidance_window's; stop in [start, 1]
NOT_NUMERIC = {"guidance_window": {"guider", "conditional_args"}}
GUIDER_STEPS = 3
GUIDER_STATE = set_timesteps(create_state(CONFIGS[0]), GUIDER_STEPS)


def guider_factories():
    """The public functions that make a `Guider`, from ``ddim_jax.__all__``."""
    import inspect

    import ddim_jax

    return {
        name: getattr(ddim_jax, name)
        for name in ddim_jax.__all__
        if callable(getattr(ddim_jax, name))
        and not isinstance(getattr(ddim_jax, name), type)
        and inspect.signature(getattr(ddim_jax, name)).return_annotation == "Guider"
    }


def test_every_guider_parameter_has_a_range():
    import inspect

    for name, factory in guider_factories().items():
        params = set(inspect.signature(factory).parameters)
        ranges = set(WINDOW) if name == "guidance_window" else set(GUIDER_RANGES.get(name, {}))
        assert params == ranges | NOT_NUMERIC.get(name, set()), (name, params, ranges)


def in_range(value, spec, start=None):
    if spec == "steps":
        return value >= 0
    if spec == "stop":
        return start <= value <= 1
    low, high, kind = spec
    if not np.isfinite(value):
        return False
    return (
        low <= value <= high if kind == "closed" else (low <= value < high if kind == "half-open" else True)
    )


def good_value(spec):
    if spec == "steps":
        return st.integers(0, 3)
    if spec == "stop":
        return st.floats(0.5, 1)  # >= every good start below
    low, high, kind = spec
    return st.floats(max(low, -10.0), min(high, 10.0) if kind != "half-open" else 0.5)


def bad_value(spec):
    """Out of range (for this spec), NaN or inf."""
    if spec == "steps":
        return st.integers(-3, -1)
    low, high, kind = spec if spec != "stop" else (0.0, 1.0, "closed")
    outside = [v for v in (-0.5, 1.5, 7.5) if not in_range(v, (low, high, kind))]
    return st.sampled_from([float("nan"), INF, -INF, *outside])


GUIDED_LOOPS = {
    "sample": lambda state, x, kw: sample(guided_model, state, x, model_args=(LABELS,), **kw),
    "invert": lambda state, x, kw: invert(guided_model, state, x, model_args=(LABELS,), **kw),
    "parallel_sample": lambda state, x, kw: parallel_sample(
        guided_model, state, x, model_args=(LABELS,), window=2, tolerance=0.0, **kw
    ),
    "edict_sample": lambda state, x, kw: edict_sample(guided_model, state, x, model_args=(LABELS,), **kw),
    "bdia_sample": lambda state, x, kw: bdia_sample(guided_model, state, x, model_args=(LABELS,), **kw),
}
LABELS = jnp.array([[0.0], [0.0], [1.0], [2.0]])  # the doubled batch's conditioning, [uncond, cond]


def guided_model(x, t, labels):
    return jnp.tanh(0.5 * x + labels) + 1e-3 * t.astype(x.dtype)


def loop_kwargs(factory, values, window, schedule):
    """The loop's keyword arguments for the drawn guider: ``values`` by parameter name; the one
    named ``schedule`` (if any) as a `scale_schedule` repeating it, S values."""
    import ddim_jax

    values = dict(values)
    if schedule is not None:
        values[schedule] = ddim_jax.scale_schedule(jnp.full(GUIDER_STEPS, values[schedule], jnp.float32))
    if factory == "shorthand":
        return values
    guider = getattr(ddim_jax, factory)(**values)
    if window is not None:
        guider = ddim_jax.guidance_window(guider, *window, conditional_args=(0,))
    return {"guider": guider}


@functools.cache
def traced_guided_loop(loop, factory, names, has_window, schedule):
    def run(values, window, x):
        kw = loop_kwargs(
            factory, dict(zip(names, values, strict=True)), window if has_window else None, schedule
        )
        return GUIDED_LOOPS[loop](GUIDER_STATE, x, kw)

    return jax.jit(run)


@pytest.mark.parametrize("factory", sorted(GUIDER_RANGES))
@settings(RULE, max_examples=4)
@given(data=st.data())
def test_guiders_follow_the_rule(factory, data):
    """A drawn guider (or the loops' CFG shorthand), its parameters valid or not (out of range,
    NaN, inf; a scalar or a per-step scale_schedule), optionally in a guidance_window, in a
    drawn loop that takes it: Python raises naming the parameter exactly when a value is out
    of range, and the traced values give all NaN then, the Python result otherwise."""
    ranges = GUIDER_RANGES[factory]
    names = tuple(sorted(ranges))
    values = {name: data.draw(good_value(ranges[name]), name) for name in names}
    window = None
    if factory != "shorthand" and data.draw(st.booleans(), "windowed"):
        window = [data.draw(good_value(WINDOW["start"]), "start"), data.draw(good_value("stop"), "stop")]
    bad = data.draw(st.sampled_from([None, *names, *(("start", "stop") if window else ())]), "bad")
    if bad in ("start", "stop"):  # stop below start is drawn as a bad stop too
        spec = WINDOW["start"] if bad == "start" else "stop"
        window[bad == "stop"] = data.draw(st.one_of(bad_value(spec), st.just(-0.25)), bad)
    elif bad is not None:
        values[bad] = data.draw(bad_value(ranges[bad]), bad)
    floats = [
        n for n in names if ranges[n] != "steps" and not (factory == "cfg_pp" or n == "guidance_rescale")
    ]
    schedule = data.draw(st.sampled_from([None, *floats]), "schedule") if floats else None
    stateful = factory == "apg"  # apg with momentum carries a state: sample and invert only
    loops = ["sample", "invert"] if stateful else sorted(GUIDED_LOOPS)
    if factory == "cfg_pp":
        loops = [name for name in loops if name != "edict_sample"]  # one output per EDICT call
    loop = data.draw(st.sampled_from(loops), "loop")
    valid = all(in_range(values[n], ranges[n]) for n in names)
    if window is not None:
        start, stop = (float(np.float32(v)) for v in window)  # the window computes in float32
        valid = valid and in_range(start, WINDOW["start"]) and in_range(stop, "stop", start)
    window = tuple(window) if window else None
    x = jnp.linspace(-1.0, 1.0, 4).reshape(2, 2)
    traced = traced_guided_loop(loop, factory, names, window is not None, schedule)
    dtypes = [jnp.int32 if ranges[n] == "steps" else jnp.float32 for n in names]
    traced_values = tuple(jnp.asarray(values[n], d) for n, d in zip(names, dtypes, strict=True))
    outcome = check_rule(
        lambda: GUIDED_LOOPS[loop](GUIDER_STATE, x, loop_kwargs(factory, values, window, schedule)),
        lambda: traced(traced_values, jnp.asarray(window or (0.0, 1.0), jnp.float32), x),
        names + ("start", "stop"),
    )
    event(f"{outcome}: {factory}{' in a window' if window else ''}")  # --hypothesis-show-statistics
    assert outcome == ("ran" if valid else "refused"), (factory, values, window, loop)
