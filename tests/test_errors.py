"""Bad input raises a clear ValueError / TypeError naming the parameter, before any compute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddim_jax import (
    DDIMConfig,
    add_noise,
    create_state,
    get_velocity,
    inverse_step,
    scale_model_input,
    set_timesteps,
    step,
)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"beta_schedule": "cosine"}, ValueError, r"beta_schedule must be one of .*'cosine'"),
        ({"prediction_type": "noise"}, ValueError, r"prediction_type must be one of .*'noise'"),
        ({"timestep_spacing": "uniform"}, ValueError, r"timestep_spacing must be one of .*'uniform'"),
        ({"prev_timestep_rule": "next"}, ValueError, r"prev_timestep_rule must be one of"),
        ({"beta_start": 0.0}, ValueError, r"beta_start must be in \(0.0, 1.0\], got 0.0"),
        ({"beta_start": -0.1}, ValueError, r"beta_start must be in \(0.0, 1.0\]"),
        ({"beta_end": 1.5}, ValueError, r"beta_end must be in \(0.0, 1.0\], got 1.5"),
        ({"beta_end": float("nan")}, ValueError, r"beta_end must be a finite number"),
        ({"trained_betas": [0.1, 0.0]}, ValueError, r"trained_betas must have num_train_timesteps=1000"),
        ({"trained_betas": [0.1, 0.0], "num_train_timesteps": 2}, ValueError, r"trained_betas .*\(0, 1\]"),
        ({"trained_betas": [0.1, 1.2], "num_train_timesteps": 2}, ValueError, r"trained_betas .*got 1.2"),
        ({"trained_betas": ["a", "b"], "num_train_timesteps": 2}, TypeError, r"trained_betas must be a seq"),
        (
            {"dynamic_thresholding_ratio": 0.0},
            ValueError,
            r"dynamic_thresholding_ratio must be in \(0.0, 1.0\]",
        ),
        ({"dynamic_thresholding_ratio": 1.01}, ValueError, r"dynamic_thresholding_ratio must be in"),
        ({"num_train_timesteps": 0}, ValueError, r"num_train_timesteps must be an int >= 2"),
        ({"num_train_timesteps": 10.0}, ValueError, r"num_train_timesteps must be an int"),
        ({"steps_offset": -1}, ValueError, r"steps_offset must be an int >= 0"),
        ({"clip_sample": "yes"}, TypeError, r"clip_sample must be a bool"),
        ({"clip_sample_range": 0.0}, ValueError, r"clip_sample_range must be in"),
        ({"sample_max_value": -1.0}, ValueError, r"sample_max_value must be in"),
    ],
)
def test_bad_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        DDIMConfig(**kwargs)


def test_bad_config_from_dict_and_json(tmp_path):
    with pytest.raises(TypeError, match="config must be a mapping"):
        DDIMConfig.from_dict([("beta_schedule", "linear")])
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        DDIMConfig.from_dict({"beta_schedule": "sigmoid"})
    path = tmp_path / "scheduler_config.json"
    path.write_text('{"beta_schedule": "linear",')
    with pytest.raises(ValueError, match=r"malformed JSON .*scheduler_config\.json"):
        DDIMConfig.from_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"scheduler_config\.json.* must hold a JSON object"):
        DDIMConfig.from_json(path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        DDIMConfig.from_json(tmp_path / "missing.json")


@pytest.mark.parametrize("steps", [0, -3, 1001, 10.0, 2.5, "10", None, True, np.float32(4)])
def test_bad_num_inference_steps(steps):
    with pytest.raises(
        ValueError, match=r"num_inference_steps must be an int in \[1, num_train_timesteps=1000\]"
    ):
        set_timesteps(create_state(DDIMConfig()), steps)


def test_good_num_inference_steps_types():
    state = create_state(DDIMConfig())
    for steps in (1, 1000, np.int64(10), np.int32(10)):
        assert set_timesteps(state, steps).num_inference_steps == int(steps)


def test_steps_offset_past_the_end():
    state = create_state(DDIMConfig(num_train_timesteps=10, steps_offset=1))
    with pytest.raises(
        ValueError, match="steps_offset=1 pushes timestep 10 past num_train_timesteps - 1 = 9"
    ):
        set_timesteps(state, 10)


def test_create_state_needs_a_config():
    with pytest.raises(TypeError, match="config must be a DDIMConfig"):
        create_state({"beta_schedule": "linear"})


@pytest.fixture(scope="module")
def ready():
    state = set_timesteps(create_state(DDIMConfig()), 10)
    x = jnp.ones((2, 3, 4))
    return state, x


def test_step_before_set_timesteps(ready):
    _, x = ready
    with pytest.raises(ValueError, match=r"step needs timesteps: call set_timesteps"):
        step(create_state(DDIMConfig()), x, 0, x)
    with pytest.raises(TypeError, match="state must be a DDIMState"):
        step({"timesteps": None}, x, 0, x)


def test_shape_mismatch(ready):
    state, x = ready
    with pytest.raises(ValueError, match=r"model_output has shape \(2, 3\), expected sample's \(2, 3, 4\)"):
        step(state, x[..., 0], 900, x)
    with pytest.raises(ValueError, match=r"variance_noise has shape \(1, 3, 4\), expected sample's"):
        step(state, x, 900, x, eta=1.0, variance_noise=x[:1])
    with pytest.raises(ValueError, match=r"noise has shape .* expected original_samples'"):
        add_noise(state, x, x[:1], 10)
    with pytest.raises(ValueError, match=r"noise has shape .* expected sample's"):
        get_velocity(state, x, x[:1], 10)


def test_bad_eta_and_noise_sources(ready):
    state, x = ready
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\] \(DDIM's eta.*\), got -0.5"):
        step(state, x, 900, x, eta=-0.5, key=key)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\].*got nan"):
        step(state, x, 900, x, eta=float("nan"), key=key)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\].*got 1.5"):  # was clamped silently
        step(state, x, 900, x, eta=1.5, key=key)
    with pytest.raises(ValueError, match=r"eta must be a scalar"):
        step(state, x, 900, x, eta=jnp.ones(2), key=key)
    with pytest.raises(ValueError, match=r"eta=0.5 > 0 needs a noise source: pass key or variance_noise"):
        step(state, x, 900, x, eta=0.5)
    with pytest.raises(ValueError, match=r"pass either key or variance_noise, not both"):
        step(state, x, 900, x, eta=0.5, key=key, variance_noise=x)
    with pytest.raises(TypeError, match=r"key must be a jax.random key.*or one key per example.*got int"):
        step(state, x, 900, x, eta=0.5, key=0)
    with pytest.raises(TypeError, match=r"key must be a jax.random key.*with dtype float32 and shape \(2,\)"):
        step(state, x, 900, x, eta=0.5, key=jnp.zeros(2))
    with pytest.raises(TypeError, match=r"key must be a jax.random key.*shape \(2, 2\)"):
        step(state, x, 900, x, eta=0.5, key=jax.random.split(key, (2, 2)))
    with pytest.raises(ValueError, match=r"key holds 3 keys: one key per example needs batch = 2"):
        step(state, x, 900, x, eta=0.5, key=jax.random.split(key, 3))
    with pytest.raises(ValueError, match=r"key holds 3 keys: one key per example needs batch = 2"):
        step(state, x, 900, x, eta=0.5, key=jax.random.key_data(jax.random.split(key, 3)))
    with pytest.raises(ValueError, match=r"key holds 1 keys: one key per example needs a batch axis"):
        step(state, x[0, 0, 0], 900, x[0, 0, 0], eta=0.5, key=jax.random.split(key, 1))
    with pytest.raises(ValueError, match=r"eta is traced.*pass key or variance_noise"):
        jax.jit(lambda e: step(state, x, 900, x, eta=e))(jnp.float32(0.5))


@pytest.mark.parametrize("t", [-1, 1000, 5000, [0, 1000], np.array([-2, 3])])
def test_timesteps_out_of_range(ready, t):
    state, x = ready
    match = r"\[0, num_train_timesteps=1000\)"
    with pytest.raises(ValueError, match=r"timestep must be in " + match):
        step(state, x, t, x)
    with pytest.raises(ValueError, match=r"timesteps must be in " + match):
        add_noise(state, x, x, t)
    with pytest.raises(ValueError, match=r"timesteps must be in " + match):
        get_velocity(state, x, x, t)


def test_timestep_bad_shape_or_dtype(ready):
    state, x = ready
    with pytest.raises(
        ValueError, match=r"timestep must be a scalar, have shape \(batch,\) = \(2,\), or hold"
    ):
        step(state, x, jnp.array([900, 800, 700]), x)
    for bad in (jnp.array([[900, 800]]), jnp.zeros((2, 2), jnp.int32), jnp.zeros((0,), jnp.int32)):
        for fn in (add_noise, get_velocity):
            with pytest.raises(ValueError, match=r"timesteps must be a scalar, have shape \(batch,\)"):
                fn(state, x, x, bad)
        with pytest.raises(ValueError, match=r"timestep must be a scalar, have shape"):
            scale_model_input(state, x, bad)
        with pytest.raises(ValueError, match=r"timestep must be a scalar, have shape"):
            inverse_step(state, x, bad, x)
    with pytest.raises(TypeError, match=r"timestep must hold integers, got dtype float32"):
        step(state, x, jnp.float32(900.0), x)
    with pytest.raises(TypeError, match=r"timesteps must hold integers"):
        add_noise(state, x, x, 9.5)


def test_schedule_rule_rejects_timesteps_off_the_schedule():
    state = set_timesteps(create_state(DDIMConfig(prev_timestep_rule="schedule")), 10)
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"timestep must be one of state.timesteps; got \[901\]"):
        step(state, x, 901, x)


def _output_object(x):
    """A stand-in for diffusers' FlaxUNet2DConditionOutput (an ordered dict with .sample)."""
    from collections import OrderedDict

    class FlaxUNet2DConditionOutput(OrderedDict):
        @property
        def sample(self):
            return self["sample"]

    return FlaxUNet2DConditionOutput(sample=x)


@pytest.mark.parametrize(
    ("wrap", "match"),
    [
        (_output_object, r"got a FlaxUNet2DConditionOutput: return its .sample"),
        (lambda x: (x,), r"got a tuple: .*\[0\]"),
        (lambda x: {"sample": x}, r"got a dict: return the array itself, e.g. out\['sample'\]"),
    ],
)
def test_model_fn_returning_an_output_object(wrap, match):
    from ddim_jax import invert, sample

    state = set_timesteps(create_state(DDIMConfig()), 2)
    x = jnp.ones((2, 3))
    for guidance_scale in (None, 7.5):
        with pytest.raises(TypeError, match=r"model_fn must return an array, " + match):
            sample(lambda x, t: wrap(0.1 * x), state, x, guidance_scale=guidance_scale)
    with pytest.raises(TypeError, match=r"model_fn must return an array, " + match):
        invert(lambda x, t: wrap(0.1 * x), state, x)
