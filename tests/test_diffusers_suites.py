"""diffusers' own DDIM scheduler tests, as a spec for the functional API.

The checks of diffusers' ``tests/schedulers/test_scheduler_ddim.py``,
``test_scheduler_ddim_inverse.py``, ``test_scheduler_ddim_parallel.py`` and their
``SchedulerCommonTest`` base, with their configurations, inputs and expected values
(golden sums and means of the full loops, variances), written anew for ddim_jax. The
deliberate refusals (inputs diffusers accepts and later fails on) are tested as refusals.
No torch needed; the last test also compares the full loops elementwise with diffusers
when it is installed (run with ``-s`` to see the largest difference).
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddim_jax
from ddim_jax import DDIMConfig

# diffusers' get_scheduler_config() for the DDIM, DDIMInverse and DDIMParallel tests.
BASE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": True,
}
NUM_ELEMS = 4 * 3 * 8 * 8


def sample_deter() -> jax.Array:
    """diffusers' ``dummy_sample_deter``: arange, laid out (C, H, W, B), moved batch first."""
    x = np.arange(NUM_ELEMS).reshape(3, 8, 8, 4) / NUM_ELEMS
    return jnp.asarray(x.transpose(3, 0, 1, 2), jnp.float32)


def noise_deter() -> jax.Array:
    """diffusers' ``dummy_noise_deter``: the same with the arange reversed."""
    x = np.arange(NUM_ELEMS)[::-1].reshape(3, 8, 8, 4) / NUM_ELEMS
    return jnp.asarray(x.transpose(3, 0, 1, 2), jnp.float32)


def sample_random() -> jax.Array:
    """diffusers' ``dummy_sample``: uniform in [0, 1), (4, 3, 8, 8)."""
    return jax.random.uniform(jax.random.key(0), (4, 3, 8, 8))


def dummy_model(x: jax.Array, t) -> jax.Array:
    """diffusers' ``dummy_model``: ``x * t / (t + 1)``, t a scalar or one per example."""
    t = jnp.asarray(t, jnp.float32)
    t = t.reshape((-1,) + (1,) * (x.ndim - 1)) if t.ndim else t
    return x * t / (t + 1)


def make_state(num_inference_steps: int | None = None, **overrides) -> ddim_jax.DDIMState:
    state = ddim_jax.create_state(DDIMConfig(**{**BASE, **overrides}))
    return state if num_inference_steps is None else ddim_jax.set_timesteps(state, num_inference_steps)


def reloaded(config: DDIMConfig, tmp_path) -> DDIMConfig:
    """diffusers' save_config / from_pretrained round trip."""
    config.to_json(tmp_path / "scheduler_config.json")
    return DDIMConfig.from_pretrained(tmp_path)


def check_round_trip_step(tmp_path, time_step=0, num_inference_steps=50, eta=0.0, **overrides):
    """diffusers' check_over_configs / check_over_forward: a scheduler and its saved-and-reloaded
    copy give the same step (diffusers: sum |difference| < 1e-5); here also finite."""
    config = DDIMConfig(**{**BASE, **overrides})
    new_config = reloaded(config, tmp_path)
    assert new_config == config
    sample = sample_random()
    residual = 0.1 * sample
    key = jax.random.key(0) if eta > 0 else None  # diffusers seeds a generator the same way
    outputs = []
    for c in (config, new_config):
        state = ddim_jax.set_timesteps(ddim_jax.create_state(c), num_inference_steps)
        assert ddim_jax.scale_model_input(state, sample, 0).shape == sample.shape
        outputs.append(ddim_jax.step(state, residual, time_step, sample, eta=eta, key=key).prev_sample)
    assert float(jnp.sum(jnp.abs(outputs[0] - outputs[1]))) < 1e-5
    assert bool(jnp.isfinite(outputs[0]).all())


# --- DDIMSchedulerTest / DDIMParallelSchedulerTest / DDIMInverseSchedulerTest: config sweeps ---

CONFIG_SWEEP = [
    *({"num_train_timesteps": n} for n in (100, 500, 1000)),  # test_timesteps
    *({"steps_offset": k} for k in (0, 1)),  # test_steps_offset
    *(
        {"beta_start": a, "beta_end": b} for a, b in ((0.0001, 0.002), (0.001, 0.02), (0.01, 0.2))
    ),  # test_betas; (0.1, 2) is refused, below
    *({"beta_schedule": s} for s in ("linear", "squaredcos_cap_v2")),  # test_schedules
    *({"prediction_type": p} for p in ("epsilon", "v_prediction", "sample")),  # test_prediction_type
    *({"clip_sample": c} for c in (True, False)),  # test_clip_sample
    *({"timestep_spacing": s} for s in ("trailing", "leading")),  # test_timestep_spacing
    *({"rescale_betas_zero_snr": r} for r in (True, False)),  # test_rescale_betas_zero_snr
    {"thresholding": False},  # test_thresholding
    *(
        {"thresholding": True, "prediction_type": p, "sample_max_value": m}
        for m in (0.5, 1.0, 2.0)
        for p in ("epsilon", "v_prediction")
    ),
]


@pytest.mark.parametrize("overrides", CONFIG_SWEEP, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_check_over_configs(overrides, tmp_path):
    check_round_trip_step(tmp_path, **overrides)


@pytest.mark.parametrize(
    ("time_step", "num_inference_steps", "eta"),
    [
        *((t, 50, 0.0) for t in (1, 10, 49)),  # test_time_indices
        *zip((1, 10, 50), (10, 50, 500), (0.0,) * 3, strict=True),  # test_inference_steps
        *zip((1, 10, 49), (50,) * 3, (0.0, 0.5, 1.0), strict=True),  # test_eta
    ],
)
def test_check_over_forward(time_step, num_inference_steps, eta, tmp_path):
    check_round_trip_step(tmp_path, time_step, num_inference_steps, eta)


def test_steps_offset_timesteps():
    state = make_state(5, steps_offset=1)
    assert state.timesteps.tolist() == [801, 601, 401, 201, 1]
    # DDIMInverseScheduler's timesteps are the same, ascending: what `invert` walks.
    assert state.timesteps[::-1].tolist() == [1, 201, 401, 601, 801]


def test_variance():
    """diffusers' _get_variance(t, prev_t) values: std^2 at eta = 1, read from a step whose
    x0 and epsilon are 0, so that prev_sample = std * variance_noise exactly."""
    cases = [((0, 1000), 0.0), ((420, 50), 0.14771), ((980, 50), 0.32460)]
    cases += [((487, 1000), 0.00979), ((999, 1000), 0.02)]  # prev_t = t - 1000 // S
    zeros = jnp.zeros((1, 1))
    for (t, steps), expected in cases:
        state = make_state(steps)
        out = ddim_jax.step(state, zeros, t, zeros, eta=1.0, variance_noise=jnp.ones((1, 1)))
        assert abs(float(out.prev_sample[0, 0]) ** 2 - expected) < 1e-5, (t, steps)


# Golden sums / means of |sample| after diffusers' full loops (10 steps, eta = 0).
FULL_LOOPS = [
    ({}, 172.0067, 0.223967, 671.6816, 0.8746),  # test_full_loop_no_noise
    ({"prediction_type": "v_prediction"}, 52.5302, 0.0684, 1394.2185, 1.8154),
    ({"set_alpha_to_one": True, "beta_start": 0.01}, 149.8295, 0.1951, 539.9622, 0.7031),
    ({"set_alpha_to_one": False, "beta_start": 0.01}, 149.0784, 0.1941, 542.6722, 0.7066),
]


def full_loop(inverse: bool, **overrides) -> jax.Array:
    state = make_state(10, **overrides)
    x = sample_deter()
    if inverse:  # DDIMInverseScheduler's loop: ascending timesteps, inverse steps
        for t in state.timesteps[::-1]:
            x = ddim_jax.inverse_step(state, dummy_model(x, t), t, x).prev_sample
    else:
        for t in state.timesteps:
            x = ddim_jax.step(state, dummy_model(x, t), t, x, eta=0.0).prev_sample
    return x


@pytest.mark.parametrize(("overrides", "ref_sum", "ref_mean", "inv_sum", "inv_mean"), FULL_LOOPS)
def test_full_loops(overrides, ref_sum, ref_mean, inv_sum, inv_mean):
    for inverse, golden_sum, golden_mean in ((False, ref_sum, ref_mean), (True, inv_sum, inv_mean)):
        x = jnp.abs(full_loop(inverse, **overrides))
        assert abs(float(x.sum()) - golden_sum) < 1e-2, (inverse, float(x.sum()))
        assert abs(float(x.mean()) - golden_mean) < 1e-3, (inverse, float(x.mean()))


def test_the_loops_equal_sample_and_invert():
    """The same full loops as one `sample` / `invert` call (lax.scan), to float32 rounding."""
    state = make_state(10)
    x = sample_deter()
    np.testing.assert_allclose(ddim_jax.sample(dummy_model, state, x), full_loop(False), atol=1e-5)
    np.testing.assert_allclose(ddim_jax.invert(dummy_model, state, x), full_loop(True), atol=1e-4)


def test_full_loop_with_noise():
    """Image-to-image from step 8: add_noise with ``timesteps[:1]`` (shape (1,)) broadcast over
    the batch of 4, as diffusers does, then the last two steps."""
    state = make_state(10)
    timesteps = state.timesteps[8:]
    x = ddim_jax.add_noise(state, sample_deter(), noise_deter(), timesteps[:1])
    for t in timesteps:
        x = ddim_jax.step(state, dummy_model(x, t), t, x, eta=0.0).prev_sample
    assert abs(float(jnp.abs(x).sum()) - 354.5418) < 1e-2
    assert abs(float(jnp.abs(x).mean()) - 0.4616) < 1e-3
    # ... and the same as sample(start_step=8) from that noised input.
    noised = ddim_jax.add_noise(state, sample_deter(), noise_deter(), timesteps[:1])
    np.testing.assert_allclose(ddim_jax.sample(dummy_model, state, noised, start_step=8), x, atol=1e-5)


def test_batch_step_no_noise():
    """DDIMParallelScheduler.batch_step_no_noise: three samples at timesteps 0, 1, 2, each
    repeated over its batch of 4, in one step with per-example timesteps."""
    state = make_state(10)
    x = sample_deter()
    samples = jnp.concatenate([x, x + 0.1, x - 0.1])
    timesteps = jnp.repeat(jnp.arange(3), 4)
    out = ddim_jax.step(state, dummy_model(samples, timesteps), timesteps, samples, eta=0.0)
    assert abs(float(jnp.abs(out.prev_sample).sum()) - 1147.7904) < 1e-2
    assert abs(float(jnp.abs(out.prev_sample).mean()) - 0.4982) < 1e-3


def test_num_inference_steps_zero_raises():
    with pytest.raises(ValueError, match="num_inference_steps must be an int in"):
        make_state(0)


# --- SchedulerCommonTest ---


def test_step_shape():
    state, sample = make_state(50), sample_random()
    out_0 = ddim_jax.step(state, 0.1 * sample, 0, sample).prev_sample
    out_1 = ddim_jax.step(state, 0.1 * sample, 1, sample).prev_sample
    assert out_0.shape == out_1.shape == sample.shape


def test_scheduler_public_api():
    state, sample = make_state(), sample_random()
    assert state.init_noise_sigma == 1.0
    assert ddim_jax.scale_model_input(state, sample, 0.0).shape == sample.shape


def test_add_noise_one_element_timesteps():
    """test_add_noise_device: ``timesteps[5][None]`` (shape (1,)) broadcasts over the batch;
    so does (1, 1), in every function that takes timesteps."""
    state, sample = make_state(100), sample_random()
    noise = jax.random.normal(jax.random.key(1), sample.shape)
    t = state.timesteps[5]
    expected = ddim_jax.add_noise(state, sample, noise, t)
    for one in (t[None], t.reshape(1, 1), jnp.full((4,), t)):
        np.testing.assert_array_equal(ddim_jax.add_noise(state, sample, noise, one), expected)
        np.testing.assert_array_equal(
            ddim_jax.get_velocity(state, sample, noise, one), ddim_jax.get_velocity(state, sample, noise, t)
        )
        np.testing.assert_array_equal(
            ddim_jax.step(state, noise, one, sample).prev_sample,
            ddim_jax.step(state, noise, t, sample).prev_sample,
        )
        np.testing.assert_array_equal(
            ddim_jax.inverse_step(state, noise, one, sample).prev_sample,
            ddim_jax.inverse_step(state, noise, t, sample).prev_sample,
        )
        assert ddim_jax.scale_model_input(state, sample, one) is sample
    # Traced one-element timesteps too, with one compilation for all values.
    traces = []

    @jax.jit
    def noised(t):
        traces.append(t)
        return ddim_jax.add_noise(state, sample, noise, t)

    np.testing.assert_allclose(noised(t[None]), expected, atol=1e-6)  # jit may fuse differently
    noised(state.timesteps[6][None])
    assert len(traces) == 1


def test_from_pretrained_round_trip(tmp_path):
    """test_from_pretrained / test_save_load_*: a saved config reloads equal; a key the class
    does not take is ignored with a warning that names it; defaults fill missing keys."""
    config = DDIMConfig(**BASE)
    assert reloaded(config, tmp_path) == config
    path = tmp_path / "scheduler_config.json"
    data = json.loads(path.read_text())
    data["unexpected"] = True
    del data["timestep_spacing"]  # test_default_arguments_not_in_config: DDIM's default is leading
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="ignores these scheduler config keys: unexpected"):
        loaded = DDIMConfig.from_pretrained(tmp_path)
    assert loaded == config and loaded.timestep_spacing == "leading"


def test_trained_betas_round_trip(tmp_path):
    config = DDIMConfig(**{**BASE, "num_train_timesteps": 2}, trained_betas=np.array([0.1, 0.3]))
    np.testing.assert_array_equal(
        ddim_jax.betas_for_config(reloaded(config, tmp_path)), ddim_jax.betas_for_config(config)
    )
    np.testing.assert_allclose(ddim_jax.betas_for_config(config), [0.1, 0.3])


# --- Deliberate refusals: inputs diffusers accepts and later fails on ---


def test_refused_beta_end_above_one():
    """test_betas' last pair, beta_end=2: diffusers builds betas above 1 and alphas_cumprod of
    0 (its check steps only at t = 0; with 50 steps, 36 of its steps return NaN)."""
    with pytest.raises(ValueError, match=r"beta_end must be in \(0.0, 1.0\], got 2"):
        DDIMConfig(**{**BASE, "beta_start": 0.1, "beta_end": 2})


def test_refused_trained_betas_of_another_length():
    """test_trained_betas passes 2 betas with num_train_timesteps=1000: diffusers accepts them
    and fails when a timestep >= 2 indexes its tables."""
    with pytest.raises(ValueError, match=r"trained_betas must have num_train_timesteps=1000 entries, got 2"):
        DDIMConfig(**BASE, trained_betas=np.array([0.1, 0.3]))


def test_refused_inversion_of_x0_prediction_from_alpha_one():
    """diffusers' DDIMInverseScheduler with prediction_type='sample' and set_alpha_to_one
    returns inf/NaN from its first step; ddim_jax says why, before any compute."""
    state = make_state(10, prediction_type="sample", set_alpha_to_one=True)
    x = sample_deter()
    with pytest.raises(
        ValueError, match=r"invert with prediction_type='sample' needs set_alpha_to_one=False"
    ):
        ddim_jax.invert(dummy_model, state, x)
    with pytest.raises(ValueError, match=r"inverse_step .* needs set_alpha_to_one=False"):
        ddim_jax.inverse_step(state, x, state.timesteps[-1], x)
    ok = ddim_jax.inverse_step(state, x, state.timesteps[-2], x).prev_sample  # later steps are fine
    assert bool(jnp.isfinite(ok).all())
    fine = make_state(10, prediction_type="sample", set_alpha_to_one=False)
    assert bool(jnp.isfinite(ddim_jax.invert(dummy_model, fine, x)).all())


# --- Live: the same full loops against diffusers, elementwise ---


def test_full_loops_match_diffusers_elementwise():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    worst = 0.0
    for overrides, *_ in FULL_LOOPS:
        for inverse in (False, True):
            cls = diffusers.DDIMInverseScheduler if inverse else diffusers.DDIMScheduler
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scheduler = cls(**{**BASE, **overrides})
            scheduler.set_timesteps(10)
            x = torch.from_numpy(np.array(sample_deter()))
            for t in scheduler.timesteps:
                x = scheduler.step(x * t / (t + 1), t, x).prev_sample
            ours = np.asarray(full_loop(inverse, **overrides))
            err = float(np.max(np.abs(ours - x.numpy())))
            worst = max(worst, err)
            assert err < 1e-4, (overrides, inverse, err)
    print(f"\nlargest elementwise difference to diffusers over the full loops: {worst:.2e}")
