"""ddim_jax.compat.FlaxDDIMScheduler: diffusers v0.35's FlaxDDIMSchedulerTest checks, the old
API's loop patterns, and what the drop-in adds (options, eta noise from a key, clear errors)."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddim_jax
from ddim_jax.compat import FlaxDDIMScheduler, FlaxDDIMSchedulerOutput

CONFIG_FILE = Path(__file__).resolve().parents[1] / "examples" / "scheduler_config.json"

# FlaxDDIMSchedulerTest.get_scheduler_config() (diffusers v0.35; clip_sample left at its default).
BASE = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
NUM_ELEMS = 4 * 3 * 8 * 8


def sample_deter() -> jax.Array:
    x = np.arange(NUM_ELEMS).reshape(3, 8, 8, 4) / NUM_ELEMS
    return jnp.asarray(x.transpose(3, 0, 1, 2), jnp.float32)


def sample_random() -> jax.Array:
    return jax.random.uniform(jax.random.key(0), (4, 3, 8, 8))


def dummy_model(x, t):
    return x * t / (t + 1)


def round_trip_outputs(tmp_path, time_step=0, num_inference_steps=50, **overrides):
    """FlaxDDIMSchedulerTest.check_over_configs / check_over_forward: save_config, then
    from_pretrained gives ``(scheduler, state)``; both step alike."""
    scheduler = FlaxDDIMScheduler(**{**BASE, **overrides})
    state = scheduler.create_state()
    scheduler.save_config(tmp_path)
    new_scheduler, new_state = FlaxDDIMScheduler.from_pretrained(tmp_path)
    assert dict(new_scheduler.config) == dict(scheduler.config)
    state = scheduler.set_timesteps(state, num_inference_steps)
    new_state = new_scheduler.set_timesteps(new_state, num_inference_steps)
    sample = sample_random()
    out = scheduler.step(state, 0.1 * sample, time_step, sample).prev_sample
    new_out = new_scheduler.step(new_state, 0.1 * sample, time_step, sample).prev_sample
    assert float(jnp.sum(jnp.abs(out - new_out))) < 1e-5
    assert bool(jnp.isfinite(out).all())
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        *({"num_train_timesteps": n} for n in (100, 500, 1000)),  # test_timesteps
        *({"steps_offset": k} for k in (0, 1)),  # test_steps_offset
        *({"beta_start": a, "beta_end": b} for a, b in ((0.0001, 0.002), (0.001, 0.02), (0.01, 0.2))),
        *({"beta_schedule": s} for s in ("linear", "squaredcos_cap_v2")),  # test_schedules
        *({"prediction_type": p} for p in ("epsilon", "sample", "v_prediction")),  # test_prediction_type
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_check_over_configs(overrides, tmp_path):
    round_trip_outputs(tmp_path, **overrides)


@pytest.mark.parametrize(
    ("time_step", "num_inference_steps"),
    [(1, 50), (10, 50), (49, 50), (1, 10), (50, 500)],  # test_time_indices, test_inference_steps
)
def test_check_over_forward_and_save_pretrained(time_step, num_inference_steps, tmp_path):
    round_trip_outputs(tmp_path, time_step, num_inference_steps)


def test_beta_end_above_one_refused():
    with pytest.raises(ValueError, match=r"beta_end must be in \(0.0, 1.0\], got 2"):
        FlaxDDIMScheduler(**{**BASE, "beta_start": 0.1, "beta_end": 2})


def test_outputs_equivalence_and_step_shape():
    scheduler = FlaxDDIMScheduler(**BASE)
    state = scheduler.set_timesteps(scheduler.create_state(), 50)
    sample = sample_random()
    as_output = scheduler.step(state, 0.1 * sample, 0, sample)
    as_tuple = scheduler.step(state, 0.1 * sample, 0, sample, return_dict=False)
    assert isinstance(as_output, FlaxDDIMSchedulerOutput) and type(as_tuple) is tuple
    np.testing.assert_allclose(as_tuple[0], as_output.prev_sample, atol=1e-5)
    assert as_output.state is state and as_output.to_tuple()[1] is state
    out_1 = scheduler.step(state, 0.1 * sample, 1, sample).prev_sample
    assert as_output.prev_sample.shape == out_1.shape == sample.shape


def test_steps_offset_timesteps():
    scheduler = FlaxDDIMScheduler(**BASE, steps_offset=1)
    state = scheduler.set_timesteps(scheduler.create_state(), 5)
    assert state.timesteps.tolist() == [801, 601, 401, 201, 1]


def test_variance():
    """test_variance's values, as std^2 of an eta = 1 step with x0 = epsilon = 0."""
    scheduler = FlaxDDIMScheduler(**BASE)
    zeros, ones = jnp.zeros((1, 1)), jnp.ones((1, 1))
    for (t, steps), expected in [((420, 50), 0.14771), ((980, 50), 0.32460), ((487, 1000), 0.00979)]:
        state = scheduler.set_timesteps(scheduler.create_state(), steps)
        std = scheduler.step(state, zeros, t, zeros, eta=1.0, variance_noise=ones).prev_sample[0, 0]
        assert abs(float(std) ** 2 - expected) < 1e-5


@pytest.mark.parametrize(
    ("overrides", "golden_sum", "golden_mean"),
    [
        ({}, 172.0067, 0.223967),  # test_full_loop_no_noise
        ({"set_alpha_to_one": True, "beta_start": 0.01}, 149.8295, 0.1951),
        ({"set_alpha_to_one": False, "beta_start": 0.01}, 149.0784, 0.1941),
    ],
)
def test_full_loop(overrides, golden_sum, golden_mean):
    """FlaxDDIMSchedulerTest.full_loop, written as it was for the old class."""
    scheduler = FlaxDDIMScheduler(**{**BASE, **overrides})
    state = scheduler.set_timesteps(scheduler.create_state(), 10)
    sample = sample_deter()
    for t in state.timesteps:
        output = scheduler.step(state, dummy_model(sample, t), t, sample)
        sample, state = output.prev_sample, output.state
    assert abs(float(jnp.abs(sample).sum()) - golden_sum) < 1e-2
    assert abs(float(jnp.abs(sample).mean()) - golden_mean) < 1e-3


def test_pipeline_fori_loop_with_guidance_equals_sample():
    """FlaxStableDiffusionPipeline's loop (fori_loop over scheduler.step, doubled batch for
    guidance, state in the carry) under jit equals ddim_jax.sample; one compile for new values."""
    scheduler = FlaxDDIMScheduler.from_config(
        {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085}
    )
    params = scheduler.create_state()
    latents = jax.random.normal(jax.random.key(0), (2, 4, 8, 8))
    weights = jnp.array([0.3, 0.1])  # "uncond" and "cond" weights of a stand-in unet
    traces = []

    def unet(x, t, w):
        return jnp.repeat(w, x.shape[0] // 2)[:, None, None, None] * x * (t / 1000.0)

    @jax.jit
    def old_loop(state, latents, w, guidance_scale):
        traces.append(1)
        state = scheduler.set_timesteps(state, num_inference_steps=8, shape=latents.shape)

        def loop_body(step, args):
            latents, state = args
            latents_input = jnp.concatenate([latents] * 2)
            t = jnp.array(state.timesteps, dtype=jnp.int32)[step]
            timestep = jnp.broadcast_to(t, latents_input.shape[0])
            latents_input = scheduler.scale_model_input(state, latents_input, t)
            noise_pred = unet(latents_input, timestep[0], w)
            uncond, text = jnp.split(noise_pred, 2, axis=0)
            noise_pred = uncond + guidance_scale * (text - uncond)
            return scheduler.step(state, noise_pred, t, latents).to_tuple()

        latents = latents * state.init_noise_sigma
        latents, _ = jax.lax.fori_loop(0, 8, loop_body, (latents, state))
        return latents

    old = old_loop(params, latents, weights, 7.5)
    state = ddim_jax.set_timesteps(params, 8)
    new = ddim_jax.sample(unet, state, latents, model_args=(weights,), guidance_scale=7.5)
    np.testing.assert_allclose(old, new, atol=1e-5)
    old_loop(params, latents + 1, weights * 2, 3.0)
    assert len(traces) == 1


def test_eta_needs_a_key_and_then_adds_noise():
    scheduler = FlaxDDIMScheduler(**BASE)
    state = scheduler.set_timesteps(scheduler.create_state(), 10)
    x = sample_random()
    with pytest.raises(ValueError, match=r"eta=0.5 needs a noise source: pass key=.*silently dropped"):
        scheduler.step(state, 0.1 * x, 500, x, 0.5)
    with pytest.raises(ValueError, match=r"needs a noise source"):
        jax.jit(lambda eta: scheduler.step(state, 0.1 * x, 500, x, eta).prev_sample)(0.5)
    key = jax.random.key(3)
    noisy = scheduler.step(state, 0.1 * x, 500, x, 0.5, key=key).prev_sample
    expected = ddim_jax.step(state, 0.1 * x, 500, x, eta=0.5, key=key).prev_sample
    np.testing.assert_array_equal(noisy, expected)  # a thin layer: the functional API's result
    no_noise = ddim_jax.step(state, 0.1 * x, 500, x, eta=0.5, variance_noise=jnp.zeros_like(x))
    assert float(jnp.abs(noisy - no_noise.prev_sample).max()) > 1e-2  # the noise is there


def test_layer_is_thin_over_the_functional_api():
    scheduler = FlaxDDIMScheduler(**BASE, thresholding=True, timestep_spacing="trailing")
    state = scheduler.set_timesteps(scheduler.create_state(), 10)
    assert scheduler.ddim_config == state.config
    x, n = sample_random(), jax.random.normal(jax.random.key(2), (4, 3, 8, 8))
    t = jnp.array([999, 99, 499, 0])
    np.testing.assert_array_equal(scheduler.add_noise(state, x, n, t), ddim_jax.add_noise(state, x, n, t))
    np.testing.assert_array_equal(
        scheduler.get_velocity(state, x, n, t), ddim_jax.get_velocity(state, x, n, t)
    )
    np.testing.assert_array_equal(
        scheduler.step(state, n, t, x).prev_sample, ddim_jax.step(state, n, t, x).prev_sample
    )
    assert scheduler.scale_model_input(state, x, t[0]) is x
    assert len(scheduler) == 1000


def test_options_the_old_class_lacked_and_maxdiffusion_spelling():
    scheduler = FlaxDDIMScheduler(rescale_zero_terminal_snr=True, timestep_spacing="trailing")
    assert scheduler.config.rescale_betas_zero_snr and "rescale_zero_terminal_snr" not in scheduler.config
    assert float(scheduler.create_state().alphas_cumprod[-1]) == 0.0
    from_dict = FlaxDDIMScheduler.from_config({"rescale_zero_terminal_snr": True, "dtype": jnp.float32})
    assert from_dict.config.rescale_betas_zero_snr
    with pytest.raises(
        ValueError, match="rescale_zero_terminal_snr=False contradicts rescale_betas_zero_snr"
    ):
        FlaxDDIMScheduler(rescale_betas_zero_snr=True, rescale_zero_terminal_snr=False)


def test_bf16_sample_keeps_its_dtype_with_float32_math():
    scheduler = FlaxDDIMScheduler(dtype=jnp.bfloat16)
    state = scheduler.set_timesteps(scheduler.create_state(), 10)
    assert state.alphas_cumprod.dtype == jnp.float32
    x = sample_random()
    out = scheduler.step(state, (0.1 * x).astype(jnp.bfloat16), 900, x.astype(jnp.bfloat16)).prev_sample
    ref = ddim_jax.step(state, (0.1 * x).astype(jnp.bfloat16), 900, x.astype(jnp.bfloat16)).prev_sample
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, ref.astype(jnp.bfloat16))


def test_config_files(tmp_path):
    model = tmp_path / "model"
    (model / "scheduler").mkdir(parents=True)
    FlaxDDIMScheduler(steps_offset=1, clip_sample=False).save_pretrained(model / "scheduler")
    data = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert data["_class_name"] == "FlaxDDIMScheduler" and data["steps_offset"] == 1
    for args, kwargs in (
        ((model,), {"subfolder": "scheduler"}),
        ((model,), {}),
        ((model / "scheduler",), {}),
    ):
        scheduler, state = FlaxDDIMScheduler.from_pretrained(*args, **kwargs)
        assert scheduler.config.steps_offset == 1 and isinstance(state, ddim_jax.DDIMState)
    scheduler, _ = FlaxDDIMScheduler.from_pretrained(model, subfolder="scheduler", steps_offset=0)
    assert scheduler.config.steps_offset == 0  # kwargs override the file
    with pytest.warns(UserWarning, match="ignores these scheduler config keys: skip_prk_steps"):
        FlaxDDIMScheduler.from_config({"skip_prk_steps": True})
    with pytest.raises(FileNotFoundError, match="downloads nothing"):
        FlaxDDIMScheduler.from_pretrained("CompVis/stable-diffusion-v1-4", subfolder="scheduler")


def test_bad_arguments():
    with pytest.raises(TypeError, match="dtype must be a float dtype"):
        FlaxDDIMScheduler(dtype=jnp.int32)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        FlaxDDIMScheduler(prediction_type="noise")
    with pytest.raises(TypeError, match="config must be a mapping or a DDIMConfig"):
        FlaxDDIMScheduler.from_config([("beta_end", 0.01)])
    scheduler = FlaxDDIMScheduler()
    with pytest.raises(ValueError, match="common must be None"):
        scheduler.create_state(common=object())
    with pytest.raises(ValueError, match="push_to_hub=True is not supported"):
        scheduler.save_config("unused", push_to_hub=True)
    with pytest.raises(ValueError, match="needs timesteps: call set_timesteps"):
        scheduler.step(scheduler.create_state(), jnp.ones((1, 2)), 10, jnp.ones((1, 2)))


def test_from_a_torch_scheduler_config():
    diffusers = pytest.importorskip("diffusers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", timestep_spacing="trailing")
    scheduler = FlaxDDIMScheduler.from_config(torch_scheduler.config)
    for name, value in scheduler.config.items():
        if name != "prev_timestep_rule":
            assert torch_scheduler.config[name] == value, name


def test_migration_example_loops_agree(capsys):
    path = Path(__file__).resolve().parents[1] / "examples" / "migrate_from_diffusers_flax.py"
    spec = importlib.util.spec_from_file_location("migrate_from_diffusers_flax", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    old, new = example.main(num_steps=3, latent_size=8, channels=(8,), text_shape=(3, 16), repeats=1)
    assert old.shape == new.shape == (1, 4, 8, 8) and np.isfinite(old).all()
    np.testing.assert_allclose(old, new, atol=1e-4)
    out = capsys.readouterr().out
    assert "the two loops agree" in out and out.count("first call") == 2


def test_diffusers_state_output_and_config_shapes_without_diffusers():
    """What diffusers' Flax pipelines and user code read: ``state.common``, ``state.replace``,
    ``out["prev_sample"]`` / ``keys()``, a read-only dict config; the scheduler pickles."""
    import pickle

    scheduler = FlaxDDIMScheduler(timestep_spacing="trailing", prev_timestep_rule="schedule")
    state = scheduler.set_timesteps(scheduler.create_state(), 4)
    common = state.common
    np.testing.assert_array_equal(common.alphas_cumprod, state.alphas_cumprod)
    np.testing.assert_allclose(np.cumprod(common.alphas.astype(np.float64)), state.alphas_cumprod, rtol=1e-5)
    custom = state.replace(timesteps=[999, 500, 200, 20])
    assert type(custom) is type(state) and custom.prev_timesteps.tolist() == [500, 200, 20, -1]
    with pytest.raises(ValueError, match="timesteps must be in descending order"):
        state.replace(timesteps=[20, 500])
    x = jnp.ones((1, 3))
    out = scheduler.step(state, 0.1 * x, 999, x)
    assert out["prev_sample"] is out.prev_sample is out[0] and out.keys() == ("prev_sample", "state")
    assert dict(out.items())["state"] is state and len(out.values()) == 2
    config = scheduler.config
    assert isinstance(config, dict) and config.timestep_spacing == "trailing"
    with pytest.raises(TypeError, match="SchedulerConfig is read-only"):
        config["steps_offset"] = 1
    again = pickle.loads(pickle.dumps(FlaxDDIMScheduler(steps_offset=1, dtype=jnp.bfloat16)))
    assert again.config.steps_offset == 1 and jnp.dtype(again.dtype) == jnp.bfloat16
    assert pickle.loads(pickle.dumps(config)) == config


def test_the_compat_layer_does_not_import_diffusers():
    """A plain class, no diffusers import (the diffusers subclass appears only once diffusers is
    imported: tests/test_flax_reference_live.py)."""
    import subprocess
    import sys

    code = (
        "import sys; from ddim_jax.compat import FlaxDDIMScheduler; s, _ = FlaxDDIMScheduler.from_pretrained("
        f"{str(CONFIG_FILE)!r}); assert type(s) is FlaxDDIMScheduler; assert 'diffusers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
