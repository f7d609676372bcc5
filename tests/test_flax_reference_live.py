"""Live comparison with diffusers' removed Flax classes (diffusers 0.35.x, its last Flax release).

``ddim_jax.compat.FlaxDDIMScheduler`` against diffusers' own ``FlaxDDIMScheduler``, step by step
over every config the old class supports (eta = 0), and the old ``FlaxStableDiffusionPipeline``
loop (``lax.fori_loop`` over ``scheduler.step``, doubled batch) around a real tiny
``FlaxUNet2DConditionModel``, run with diffusers' scheduler, with the compat class and rewritten on
``ddim_jax.sample``. Skipped unless diffusers 0.35 <= version < 0.40 (Flax was removed in 0.40)
is importable. Run with ``-s`` to see the largest differences.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
_VERSION = tuple(int(p) for p in diffusers.__version__.split(".")[:2])
if not (0, 35) <= _VERSION < (0, 40):
    pytest.skip(
        f"needs diffusers 0.35-0.39 (its Flax classes), got {diffusers.__version__}", allow_module_level=True
    )

from _diffusers_ref import RTOL, check_errors, oracle_step, oracle_tables, rel_err  # noqa: E402
from diffusers import FlaxDDIMScheduler as OldFlaxDDIMScheduler  # noqa: E402
from diffusers import FlaxUNet2DConditionModel  # noqa: E402

import ddim_jax  # noqa: E402
from ddim_jax.compat import FlaxDDIMScheduler  # noqa: E402

SHAPE = (2, 4, 8, 8)
_spec = importlib.util.spec_from_file_location(
    "stable_diffusion", Path(__file__).resolve().parents[1] / "examples" / "stable_diffusion.py"
)
sd = importlib.util.module_from_spec(_spec)  # the example's tiny UNet config and fast random init
_spec.loader.exec_module(sd)
SCHEDULES = [
    {"beta_schedule": "linear"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"trained_betas": tuple(np.linspace(1e-4, 0.03, 1000).tolist())},
]
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
# (set_alpha_to_one, steps_offset, clip_sample, clip_sample_range, num_inference_steps)
VARIANTS = [
    (True, 0, True, 1.0, 10),
    (False, 1, False, 1.0, 7),
    (True, 1, True, 2.5, 1),
    (False, 0, True, 0.5, 25),
]

_largest: dict = {"step": (0.0, ""), "abs": (0.0, ""), "oracle": (0.0, "")}


CASES = list(itertools.product(range(len(SCHEDULES)), PREDICTIONS, VARIANTS))


@pytest.mark.parametrize(("schedule", "prediction_type", "variant"), CASES)
def test_compat_scheduler_matches_diffusers_flax_scheduler_step_by_step(schedule, prediction_type, variant):
    """Both classes get the same x_t and model output at every step; their x_{t-1} agree to
    float32 round-off: ddim_jax within 2e-6 of a float64 oracle, and within 1e-5 of diffusers
    plus diffusers' own distance from the oracle (its tables are float32 cumulative products,
    which a ``"sample"`` step near alpha = 1 amplifies through ``1 / sqrt(1 - alpha)``)."""
    set_alpha_to_one, steps_offset, clip_sample, clip_range, steps = variant
    kwargs = dict(
        SCHEDULES[schedule],
        prediction_type=prediction_type,
        set_alpha_to_one=set_alpha_to_one,
        steps_offset=steps_offset,
        clip_sample=clip_sample,
        clip_sample_range=clip_range,
    )
    old_kwargs = dict(kwargs)
    if "trained_betas" in old_kwargs:
        old_kwargs["trained_betas"] = jnp.asarray(old_kwargs["trained_betas"], jnp.float32)
    old = OldFlaxDDIMScheduler(**old_kwargs)
    new = FlaxDDIMScheduler(**kwargs)
    old_state = old.set_timesteps(old.create_state(), steps, SHAPE)
    new_state = new.set_timesteps(new.create_state(), steps, SHAPE)
    np.testing.assert_array_equal(np.asarray(new_state.timesteps), np.asarray(old_state.timesteps))
    tables = oracle_tables(kwargs)  # float64
    np.testing.assert_allclose(np.asarray(new_state.alphas_cumprod), tables[0], rtol=1e-6)
    # diffusers' float32 cumulative product drifts up to ~1e-5 (squaredcos_cap_v2's small alphas)
    np.testing.assert_allclose(np.asarray(old_state.common.alphas_cumprod), tables[0], rtol=1e-4)
    keys = jax.random.split(jax.random.key(hash((schedule, prediction_type, variant)) % 2**31), 2)
    x = jax.random.normal(keys[0], SHAPE)
    worst = 0.0
    label = f"{kwargs.get('beta_schedule', 'trained')}/{prediction_type}/{variant}"
    for i, t in enumerate(np.asarray(old_state.timesteps).tolist()):
        out = jax.random.normal(jax.random.fold_in(keys[1], i), SHAPE)
        ref, _ = old.step(old_state, out, t, x).to_tuple()
        ours, _ = new.step(new_state, out, t, x).to_tuple()
        assert ours.dtype == ref.dtype == jnp.float32
        orc, _ = oracle_step(
            kwargs, tables, t - 1000 // steps, t, np.asarray(out), np.asarray(x), 0.0, None, False
        )
        e_ref, e_orc, e_dif = rel_err(ours, ref), rel_err(ours, orc), rel_err(ref, orc)
        check_errors(f"step {i} (t={t})", e_ref, e_orc, e_dif)
        worst = max(worst, e_ref)
        for name, value in (("step", e_ref), ("oracle", e_orc), ("abs", float(jnp.abs(ours - ref).max()))):
            _largest[name] = max(_largest[name], (value, f"{label} step {i} t={t}"))
        x = ref
    # add_noise and get_velocity, at every inference timestep at once (one per example).
    ts = np.resize(np.asarray(old_state.timesteps), SHAPE[0])
    noise = jax.random.normal(keys[1], SHAPE)
    for name in ("add_noise", "get_velocity"):
        ref = getattr(old, name)(old_state, x, noise, jnp.asarray(ts))
        ours = getattr(new, name)(new_state, x, noise, jnp.asarray(ts))
        assert rel_err(ours, ref) < RTOL, name
    print(f"\n{label}: largest step difference {worst:.1e}")


def test_largest_step_difference_is_reported():
    """Runs after the grid above (file order): prints the largest differences (``-s``)."""
    if _largest["step"][0] == 0:
        pytest.skip("the grid did not run (run the whole file)")
    print(f"\nover {len(CASES)} configs, largest difference to diffusers' FlaxDDIMScheduler:")
    print(f"  normwise relative {_largest['step'][0]:.2e} ({_largest['step'][1]})")
    print(f"  elementwise absolute {_largest['abs'][0]:.2e} ({_largest['abs'][1]})")
    print(f"  ddim_jax against the float64 oracle: {_largest['oracle'][0]:.2e} ({_largest['oracle'][1]})")
    assert _largest["oracle"][0] <= 2e-6


SD_SCHEDULER = sd.SD15_SCHEDULER_KWARGS  # SD-1.5's scheduler config


def pipeline_loop(scheduler, unet, num_inference_steps: int, guidance_scale: float):
    """The denoising loop of diffusers 0.35's ``FlaxStableDiffusionPipeline._generate``, as written
    there: doubled batch, ``jax.lax.fori_loop`` over ``scheduler.step``, the state in the carry."""

    def generate(params, scheduler_params, latents, context):
        guidance = jnp.array([guidance_scale], dtype=jnp.float32)

        def loop_body(step, args):
            latents, scheduler_state = args
            latents_input = jnp.concatenate([latents] * 2)
            t = jnp.array(scheduler_state.timesteps, dtype=jnp.int32)[step]
            timestep = jnp.broadcast_to(t, latents_input.shape[0])
            latents_input = scheduler.scale_model_input(scheduler_state, latents_input, t)
            noise_pred = unet.apply(
                {"params": params}, latents_input, timestep, encoder_hidden_states=context
            ).sample
            uncond, text = jnp.split(noise_pred, 2, axis=0)
            noise_pred = uncond + guidance * (text - uncond)
            return scheduler.step(scheduler_state, noise_pred, t, latents).to_tuple()

        state = scheduler.set_timesteps(scheduler_params, num_inference_steps, latents.shape)
        latents = latents * scheduler_params.init_noise_sigma
        latents, _ = jax.lax.fori_loop(0, num_inference_steps, loop_body, (latents, state))
        return latents

    return jax.jit(generate)


def test_old_pipeline_loop_compat_scheduler_and_sample_agree_on_a_real_unet():
    """The old pipeline loop with diffusers' FlaxDDIMScheduler, the same loop with the compat
    class, and ``ddim_jax.sample`` with guidance, around diffusers' FlaxUNet2DConditionModel."""
    unet = FlaxUNet2DConditionModel(**sd.TINY_UNET)  # diffusers' tiny test UNet, float32
    params = sd.random_params(unet)
    k_lat, k_ctx = jax.random.split(jax.random.key(1))
    batch, steps, guidance_scale = 2, 8, 7.5
    latents = jax.random.normal(k_lat, (batch, 4, 16, 16))
    context = jax.random.normal(k_ctx, (2 * batch, 7, 32))  # [negative; prompt] embeddings

    old = OldFlaxDDIMScheduler(**SD_SCHEDULER)
    reference = pipeline_loop(old, unet, steps, guidance_scale)(params, old.create_state(), latents, context)
    compat = FlaxDDIMScheduler(**SD_SCHEDULER)
    with_compat = pipeline_loop(compat, unet, steps, guidance_scale)(
        params, compat.create_state(), latents, context
    )

    def model_fn(x, t, params, context):
        t = jnp.broadcast_to(t, x.shape[:1])
        return unet.apply({"params": params}, x, t, encoder_hidden_states=context).sample

    state = ddim_jax.set_timesteps(ddim_jax.create_state(ddim_jax.DDIMConfig(**SD_SCHEDULER)), steps)
    run = jax.jit(
        lambda params, latents, context: ddim_jax.sample(
            model_fn, state, latents, model_args=(params, context), guidance_scale=guidance_scale
        )
    )
    with_sample = run(params, latents, context)

    assert bool(jnp.isfinite(reference).all()) and float(jnp.std(reference)) > 0.1
    e_compat, e_sample = rel_err(with_compat, reference), rel_err(with_sample, reference)
    e_between = rel_err(with_sample, with_compat)
    print(
        f"\ntiny FlaxUNet2DConditionModel, {steps} steps, CFG {guidance_scale}: against diffusers' "
        f"loop, compat {e_compat:.1e}, sample {e_sample:.1e}; sample against compat {e_between:.1e}"
    )
    assert e_compat < 1e-5 and e_sample < 1e-5 and e_between < 1e-5
