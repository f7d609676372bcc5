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

import _tiny_sd  # noqa: E402
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


# ------------------------------------------------ diffusers' own FlaxStableDiffusionPipeline


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Flax SD folder saved by diffusers' pipeline (tests/_tiny_sd.py); needs Flax CLIP."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "FlaxCLIPTextModel"):
        pytest.skip(f"needs transformers' Flax CLIP (transformers < 5), got {transformers.__version__}")
    return _tiny_sd.build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"))


NO_SAFETY = dict(safety_checker=None, feature_extractor=None)  # the tiny folder has none


def canonical_swap(pipeline_class, folder, **scheduler_kwargs):
    """diffusers' documented scheduler swap, with the compat class."""
    scheduler, state = FlaxDDIMScheduler.from_pretrained(folder, subfolder="scheduler", **scheduler_kwargs)
    pipe, params = pipeline_class.from_pretrained(folder, scheduler=scheduler, **NO_SAFETY)
    params["scheduler"] = state
    return pipe, params


def with_scheduler(pipe, params, scheduler):
    """The same components around another scheduler (no reload)."""
    other = type(pipe)(**{**pipe.components, "scheduler": scheduler})
    return other, {**params, "scheduler": scheduler.create_state()}


def generate(pipe, params, prompt_ids, latents, steps, jit):
    """``pipe(...)`` images; with ``jit`` the pipeline's pmap over one CPU device. The guidance
    scale goes in as an array: a Python float breaks the jit-off path for batch > 1 in diffusers
    0.35 (it becomes shape (1, batch) and broadcasts against the latents)."""
    key = jax.random.PRNGKey(0)
    if not jit:
        return pipe(prompt_ids, params, key, steps, guidance_scale=jnp.float32(7.5), latents=latents).images
    one = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], params)  # replicated on 1 device
    guidance = jnp.array([7.5])
    images = pipe(
        prompt_ids[None], one, key[None], steps, guidance_scale=guidance, latents=latents[None], jit=True
    )
    return images.images[0]


@pytest.fixture(scope="module")
def pipeline_run(tiny_folder):
    from diffusers import FlaxStableDiffusionPipeline

    pipe, params = canonical_swap(FlaxStableDiffusionPipeline, tiny_folder)
    prompt_ids = pipe.prepare_inputs(["a red fox", "an ox"])
    latents = jax.random.normal(jax.random.key(3), (2, 4, 16, 16))
    return pipe, params, prompt_ids, latents


def test_canonical_swap_gives_diffusers_images_with_jit_off_and_on(pipeline_run):
    """``FlaxStableDiffusionPipeline.from_pretrained(dir, scheduler=compat)`` as diffusers' docs
    swap schedulers; ``__call__`` with jit off and on (pmap), compat and diffusers' class."""
    from diffusers.schedulers.scheduling_utils_flax import FlaxSchedulerMixin

    pipe, params, prompt_ids, latents = pipeline_run
    assert isinstance(pipe.scheduler, FlaxSchedulerMixin) and isinstance(pipe.scheduler, FlaxDDIMScheduler)
    old_pipe, old_params = with_scheduler(pipe, params, OldFlaxDDIMScheduler(**SD_SCHEDULER))
    steps, images = 4, {}
    for jit in (False, True):
        images["compat", jit] = generate(pipe, params, prompt_ids, latents, steps, jit)
        images["diffusers", jit] = generate(old_pipe, old_params, prompt_ids, latents, steps, jit)
    reference = images["diffusers", False]
    assert reference.shape == (2, 32, 32, 3) and float(np.std(reference)) > 0.05
    errors = {k: rel_err(v, reference) for k, v in images.items()}
    print(f"\nFlaxStableDiffusionPipeline images against diffusers' scheduler, jit off: {errors}")
    assert max(errors.values()) < 1e-5


def test_saved_pipeline_loads_with_both_classes_and_configs_hand_over(pipeline_run, tmp_path):
    import json

    from diffusers import FlaxStableDiffusionPipeline

    pipe, params, _, _ = pipeline_run
    pipe.save_pretrained(tmp_path, params=params)
    index = json.loads((tmp_path / "model_index.json").read_text())
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert (
        index["scheduler"] == ["diffusers", "FlaxDDIMScheduler"]
        and saved["_class_name"] == "FlaxDDIMScheduler"
    )
    plain, plain_params = FlaxStableDiffusionPipeline.from_pretrained(tmp_path, **NO_SAFETY)
    assert type(plain.scheduler) is OldFlaxDDIMScheduler
    again, state = FlaxDDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert again.ddim_config == pipe.scheduler.ddim_config

    # configs hand over both ways, and the tables agree
    old = OldFlaxDDIMScheduler.from_config(pipe.scheduler.config)
    back = FlaxDDIMScheduler.from_config(old.config)
    assert back.ddim_config == pipe.scheduler.ddim_config
    old_state = old.set_timesteps(old.create_state(), 10, SHAPE)
    state = back.set_timesteps(state, 10)
    np.testing.assert_array_equal(np.asarray(state.timesteps), np.asarray(old_state.timesteps))
    np.testing.assert_allclose(state.common.alphas_cumprod, old_state.common.alphas_cumprod, rtol=1e-5)
    np.testing.assert_allclose(state.common.betas, old_state.common.betas, rtol=1e-5)
    assert state.replace(final_alpha_cumprod=jnp.float32(1.0)).final_alpha_cumprod == 1.0
    x = jnp.ones(SHAPE)
    out = back.step(state, 0.1 * x, state.timesteps[0], x)
    ref = old.step(old_state, 0.1 * x, old_state.timesteps[0], x)
    assert list(out.keys()) == list(ref.keys()) == ["prev_sample", "state"]
    assert rel_err(out["prev_sample"], ref["prev_sample"]) < 1e-6
    assert out.to_tuple()[0] is out.prev_sample


def test_img2img_inpaint_and_sdxl_pipelines_take_the_compat_scheduler(tiny_folder, tmp_path):
    from diffusers import (
        FlaxStableDiffusionImg2ImgPipeline,
        FlaxStableDiffusionInpaintPipeline,
        FlaxStableDiffusionXLPipeline,
    )
    from transformers import FlaxCLIPTextModelWithProjection

    for cls in (FlaxStableDiffusionImg2ImgPipeline, FlaxStableDiffusionInpaintPipeline):
        pipe, params = canonical_swap(cls, tiny_folder)
        assert isinstance(pipe.scheduler, FlaxDDIMScheduler) and "scheduler" in params
    # an SDXL-shaped folder from the same parts (a second, projected text encoder)
    encoder_2 = FlaxCLIPTextModelWithProjection(pipe.text_encoder.config, seed=1)
    xl = FlaxStableDiffusionXLPipeline(
        text_encoder=pipe.text_encoder, text_encoder_2=encoder_2, vae=pipe.vae, tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer, unet=pipe.unet, scheduler=pipe.scheduler,
    )  # fmt: skip
    xl.save_pretrained(tmp_path, params={**params, "text_encoder_2": encoder_2.params})
    scheduler, state = FlaxDDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    loaded, _ = FlaxStableDiffusionXLPipeline.from_pretrained(tmp_path, scheduler=scheduler)
    assert loaded.scheduler is scheduler


def torch_loop_images(pipe, params, prompt_ids, latents, steps, scheduler_kwargs):
    """The pipeline's generation with every step taken by diffusers' torch ``DDIMScheduler`` on
    the tiny Flax UNet's guided outputs, then the pipeline's VAE decode."""
    import torch
    from diffusers import DDIMScheduler

    context = jnp.asarray(_tiny_sd.context_for(pipe, params, np.asarray(prompt_ids)))
    unet = jax.jit(
        lambda x, t: (
            pipe.unet.apply(
                {"params": params["unet"]}, x, jnp.broadcast_to(t, x.shape[:1]), encoder_hidden_states=context
            ).sample
        )
    )
    scheduler = DDIMScheduler(**scheduler_kwargs)
    scheduler.set_timesteps(steps)
    x = np.asarray(latents)
    for t in scheduler.timesteps.tolist():
        uncond, text = jnp.split(unet(jnp.concatenate([x, x]), jnp.int32(t)), 2)
        guided = np.asarray(uncond + jnp.float32(7.5) * (text - uncond))
        x = scheduler.step(torch.from_numpy(guided), t, torch.from_numpy(x)).prev_sample.numpy()
    vae = pipe.vae
    image = vae.apply({"params": params["vae"]}, x / vae.config.scaling_factor, method=vae.decode).sample
    return np.asarray((image / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1))


def test_seed_settings_match_torch_ddim_and_the_old_class_does_not(pipeline_run):
    """trailing + zero-SNR + v-prediction (the seed document's scheduler): the compat class in
    diffusers' pipeline equals a loop stepped by diffusers' torch DDIMScheduler; diffusers' old
    Flax class takes ``prediction_type`` but silently keeps leading spacing and the original
    betas, so its images are off. This is the reason to migrate."""

    pipe, params, prompt_ids, latents = pipeline_run
    steps, seed = 4, _tiny_sd.SEED_SCHEDULER
    oracle = torch_loop_images(pipe, params, prompt_ids, latents, steps, seed)
    compat = generate(
        *with_scheduler(pipe, params, FlaxDDIMScheduler.from_config(seed)), prompt_ids, latents, steps, False
    )
    old_scheduler = OldFlaxDDIMScheduler.from_config(seed)
    old = generate(*with_scheduler(pipe, params, old_scheduler), prompt_ids, latents, steps, False)
    e_compat, e_old = rel_err(compat, oracle), rel_err(old, oracle)
    print(
        f"\nseed settings, {steps} steps, against torch DDIMScheduler: compat {e_compat:.1e}, "
        f"old class {e_old:.1e}"
    )
    assert e_compat < 1e-5
    assert e_old > 1e-2
