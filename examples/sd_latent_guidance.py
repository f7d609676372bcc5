"""A Stable-Diffusion-style latent DDIM loop with classifier-free guidance, in JAX.

What a user with their own Flax UNet does, with the settings of the diffusers DDIMScheduler
page ("Common Diffusion Noise Schedules and Sample Steps are Flawed"): load the model's
``scheduler_config.json``, switch on zero-terminal-SNR betas, trailing timesteps and
v-prediction, and sample with guidance and ``guidance_rescale=0.7``.

The UNet here is randomly initialised (no weights are downloaded), so the output is noise
shaped like SD latents; swap in your own ``model_fn`` and parameters. The VAE decode and the
text encoder are out of scope: the embeddings below are random stand-ins of CLIP's shape.

Run: ``python examples/sd_latent_guidance.py [--steps 50] [--guidance-scale 7.5]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ddim_jax
from ddim_jax.demo.unet import UNet

CONFIG_PATH = Path(__file__).with_name("scheduler_config.json")


def load_scheduler(path: str | Path = CONFIG_PATH) -> ddim_jax.DDIMConfig:
    """The model's scheduler config with the four fixes of Lin et al. (as in the seed document)."""
    config = ddim_jax.DDIMConfig.from_json(path)
    return dataclasses.replace(
        config, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"
    )


def make_model_fn(unet: UNet):
    """Adapts an NHWC Flax UNet to diffusers' NCHW latents: ``model_fn(x, t, params, embeds)``.

    ``ddim_jax.sample`` calls it once per step on the doubled batch ``[x, x]`` when guided;
    ``embeds`` is then ``concat([negative, positive])`` so the outputs come back as
    ``[uncond, cond]``.
    """

    def model_fn(latents: jax.Array, t: jax.Array, params, embeds: jax.Array) -> jax.Array:
        x = jnp.transpose(latents, (0, 2, 3, 1))  # NCHW -> NHWC
        return jnp.transpose(unet.apply(params, x, t, embeds), (0, 3, 1, 2))

    return model_fn


def main(
    *,
    num_steps: int = 50,
    batch: int = 1,
    latent_size: int = 64,
    channels: tuple[int, ...] = (32, 64),
    text_shape: tuple[int, int] = (77, 768),
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.7,
    seed: int = 0,
) -> np.ndarray:
    """Samples ``(batch, 4, latent_size, latent_size)`` latents; returns them as numpy."""
    config = load_scheduler()
    state = ddim_jax.set_timesteps(ddim_jax.create_state(config), num_steps)
    print(
        f"scheduler: {config.beta_schedule}, zero-SNR={config.rescale_betas_zero_snr}, "
        f"{config.timestep_spacing}, {config.prediction_type}; alphas_cumprod[-1] = "
        f"{float(state.alphas_cumprod[-1]):.1e}; first timesteps {state.timesteps[:4].tolist()}"
    )

    unet = UNet(channels=channels, in_channels=4, out_channels=4, num_groups=32, zero_init=False)
    k_init, k_latents, k_neg, k_pos = jax.random.split(jax.random.key(seed), 4)
    nhwc = jnp.zeros((1, latent_size, latent_size, 4))
    params = jax.jit(unet.init)(k_init, nhwc, jnp.int32(0), jnp.zeros((1, *text_shape)))
    negative = jax.random.normal(
        k_neg, (batch, *text_shape)
    )  # stand-ins for CLIP embeddings of "" and the prompt
    positive = jax.random.normal(k_pos, (batch, *text_shape))
    latents = jax.random.normal(k_latents, (batch, 4, latent_size, latent_size))  # init_noise_sigma = 1
    model_fn = make_model_fn(unet)

    traces = []  # one entry per trace (compilation) of generate

    @jax.jit  # params, latents, embeddings and guidance weights are traced: new values do not recompile
    def generate(params, latents, negative, positive, guidance_scale, guidance_rescale):
        traces.append(guidance_scale)  # Python code here runs only when jax traces the function
        return ddim_jax.sample(
            model_fn,
            state,
            latents,
            model_args=(params, jnp.concatenate([negative, positive])),
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
        )

    for scale in (guidance_scale, guidance_scale / 2):
        t0 = time.perf_counter()
        out = jax.block_until_ready(generate(params, latents, negative, positive, scale, guidance_rescale))
        print(
            f"guidance_scale={scale:g}, guidance_rescale={guidance_rescale:g}: {num_steps} steps in "
            f"{time.perf_counter() - t0:.2f} s, latents {out.shape}, std {float(out.std()):.3f}, "
            f"finite {bool(jnp.isfinite(out).all())}"
        )
    print(f"compiled programs: {len(traces)} (the second guidance scale reused the first)")
    return np.asarray(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--guidance-rescale", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    main(
        num_steps=a.steps,
        batch=a.batch,
        guidance_scale=a.guidance_scale,
        guidance_rescale=a.guidance_rescale,
        seed=a.seed,
    )
