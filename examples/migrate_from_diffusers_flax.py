"""Migrating a diffusers Flax pipeline loop to ddim_jax: the old loop with an import change,
then the same loop rewritten as one `ddim_jax.sample` call.

The old loop is the one of diffusers' ``FlaxStableDiffusionPipeline`` (v0.35): a
``jax.lax.fori_loop`` over ``scheduler.step(state, ...)`` with classifier-free guidance on the
doubled batch, the scheduler state in the loop carry, and a UNet that returns an output object
with ``.sample``. Only its import changes, to ``ddim_jax.compat.FlaxDDIMScheduler``.
The rewrite hands ddim_jax the model function and the guidance scale; its loop is a
``lax.scan`` whose step scalars are computed before the loop.

The UNet is the demo's small Flax UNet with random weights (nothing is downloaded), on
Stable-Diffusion-shaped latents (4 channels, NCHW) with random stand-ins for the text
embeddings. The script checks that both loops give the same latents and prints both timings.

Run: ``python examples/migrate_from_diffusers_flax.py [--steps 25] [--latent-size 32]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import ddim_jax
from ddim_jax.compat import FlaxDDIMScheduler  # was: from diffusers import FlaxDDIMScheduler
from ddim_jax.demo.unet import UNet

CONFIG_PATH = Path(__file__).with_name("scheduler_config.json")  # a Stable Diffusion v1 scheduler


class UNetOutput(NamedTuple):
    """Like diffusers' ``FlaxUNet2DConditionOutput``: the prediction is ``.sample``."""

    sample: jax.Array


def make_unet(channels: tuple[int, ...]):
    """A random Flax UNet called as diffusers' Flax UNet was:
    ``unet_apply(params, latents, timesteps, encoder_hidden_states=...).sample``."""
    unet = UNet(channels=channels, in_channels=4, out_channels=4, zero_init=False)

    def unet_apply(params, latents, timesteps, encoder_hidden_states):
        x = jnp.transpose(latents, (0, 2, 3, 1))  # NCHW -> the demo UNet's NHWC
        out = unet.apply(params, x, timesteps, encoder_hidden_states)
        return UNetOutput(jnp.transpose(out, (0, 3, 1, 2)))

    return unet, unet_apply


def old_pipeline_loop(scheduler: FlaxDDIMScheduler, unet_apply, num_inference_steps: int):
    """diffusers' FlaxStableDiffusionPipeline ``_generate`` loop, as it was written."""

    def generate(params, latents, context, guidance_scale):
        def loop_body(step, args):
            latents, scheduler_state = args
            latents_input = jnp.concatenate([latents] * 2)  # [uncond, cond]
            t = jnp.array(scheduler_state.timesteps, dtype=jnp.int32)[step]
            timestep = jnp.broadcast_to(t, latents_input.shape[0])
            latents_input = scheduler.scale_model_input(scheduler_state, latents_input, t)
            noise_pred = unet_apply(
                params["unet"], latents_input, timestep, encoder_hidden_states=context
            ).sample
            noise_pred_uncond, noise_prediction_text = jnp.split(noise_pred, 2, axis=0)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_prediction_text - noise_pred_uncond)
            latents, scheduler_state = scheduler.step(scheduler_state, noise_pred, t, latents).to_tuple()
            return latents, scheduler_state

        scheduler_state = scheduler.set_timesteps(
            params["scheduler"], num_inference_steps=num_inference_steps, shape=latents.shape
        )
        latents = latents * params["scheduler"].init_noise_sigma
        latents, _ = jax.lax.fori_loop(0, num_inference_steps, loop_body, (latents, scheduler_state))
        return latents

    return jax.jit(generate)


def rewritten_loop(config: ddim_jax.DDIMConfig, unet_apply, num_inference_steps: int):
    """The same generation on ddim_jax's API: one `sample` call, guidance included."""
    state = ddim_jax.set_timesteps(ddim_jax.create_state(config), num_inference_steps)

    def model_fn(latents, t, unet_params, context):  # returns the array, not the output object
        return unet_apply(unet_params, latents, t, encoder_hidden_states=context).sample

    def generate(params, latents, context, guidance_scale):
        return ddim_jax.sample(
            model_fn, state, latents, model_args=(params["unet"], context), guidance_scale=guidance_scale
        )

    return jax.jit(generate)


def timed(fn, *args, repeats: int) -> tuple[jax.Array, float, float]:
    """Output, first-call seconds (compile + run) and the median of ``repeats`` later calls."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return out, first, float(np.median(times))


def main(
    *,
    num_steps: int = 25,
    batch: int = 1,
    latent_size: int = 32,
    channels: tuple[int, ...] = (32, 64),
    text_shape: tuple[int, int] = (77, 64),
    guidance_scale: float = 7.5,
    repeats: int = 3,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Runs both loops on the same inputs; returns ``(old_latents, new_latents)`` as numpy."""
    scheduler, scheduler_state = FlaxDDIMScheduler.from_pretrained(CONFIG_PATH)
    unet, unet_apply = make_unet(channels)
    k_init, k_latents, k_neg, k_pos = jax.random.split(jax.random.key(seed), 4)
    unet_params = jax.jit(unet.init)(
        k_init, jnp.zeros((1, latent_size, latent_size, 4)), jnp.int32(0), jnp.zeros((1, *text_shape))
    )
    params = {"unet": unet_params, "scheduler": scheduler_state}
    negative = jax.random.normal(k_neg, (batch, *text_shape))  # stand-ins for CLIP embeddings
    positive = jax.random.normal(k_pos, (batch, *text_shape))
    context = jnp.concatenate([negative, positive])
    latents = jax.random.normal(k_latents, (batch, 4, latent_size, latent_size))

    old = old_pipeline_loop(scheduler, unet_apply, num_steps)
    new = rewritten_loop(scheduler.ddim_config, unet_apply, num_steps)
    args = (params, latents, context, guidance_scale)
    old_out, old_first, old_time = timed(old, *args, repeats=repeats)
    new_out, new_first, new_time = timed(new, *args, repeats=repeats)

    scale = float(jnp.abs(old_out).max())
    diff = float(jnp.abs(old_out - new_out).max())
    print(
        f"latents {latents.shape}, {num_steps} steps, guidance_scale={guidance_scale:g}, {jax.devices()[0]}"
    )
    for name, first, later in (
        ("old loop (fori_loop over FlaxDDIMScheduler.step)", old_first, old_time),
        ("rewritten on ddim_jax.sample (lax.scan)", new_first, new_time),
    ):
        print(f"{name:<50}: first call {first:.2f} s (compile + run), then {later:.3f} s per call")
    print(f"largest difference: {diff:.2e} (largest |latent| {scale:.2f})")
    if not diff <= 1e-4 * max(scale, 1.0):
        raise SystemExit(f"the two loops disagree: largest difference {diff:.2e}")
    print("the two loops agree")
    return np.asarray(old_out), np.asarray(new_out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    main(
        num_steps=a.steps,
        batch=a.batch,
        latent_size=a.latent_size,
        guidance_scale=a.guidance_scale,
        repeats=a.repeats,
    )
