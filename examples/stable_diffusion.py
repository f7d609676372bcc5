"""Text-to-image (and image-to-image) with a Stable-Diffusion-class Flax UNet, sampled by ddim_jax.

The UNet and VAE are diffusers' ``FlaxUNet2DConditionModel`` and ``FlaxAutoencoderKL`` (diffusers
0.35.x, its last release with Flax; ``pip install "diffusers>=0.35,<0.36"``). One jitted program
runs classifier-free guidance with ``guidance_rescale``, a bf16 UNet (float32 scheduler math), a
runtime step count (``set_timesteps(..., max_steps=M)``: any ``--steps`` up to M reuses the
program) and image-to-image ``--strength``; the VAE decodes to a PNG. Nothing is downloaded.

- ``--model-dir DIR``: a local diffusers-format folder (``unet/``, ``vae/``, ``scheduler/``, and
  ``text_encoder/`` + ``tokenizer/`` for prompts). Flax weights
  (``diffusion_flax_model.msgpack``) load as they are; PyTorch weights
  (``diffusion_pytorch_model.safetensors`` / ``.bin``) are converted with diffusers' key renaming
  (what ``from_pt=True`` does, which in diffusers 0.35 reads only ``.bin``; needs torch).
  ``--prompt`` is encoded by transformers' ``FlaxCLIPTextModel`` (transformers < 5; Flax was
  removed in transformers 5) from the folder's ``text_encoder/`` and ``tokenizer/``; or pass
  ``--prompt-embeds`` (an ``.npy`` of shape ``(77, 768)`` for SD-1.5, e.g. saved from torch
  CLIP) and optionally ``--negative-embeds`` (default: zeros). A folder without
  ``scheduler/`` needs ``--sd15-scheduler`` to sample with SD-1.5's schedule.
- Every argument is checked before a model loads (``--steps``/``--max-steps`` against the
  schedule, ``--batch >= 1``, finite guidance values, files that exist); a user error prints
  one line and exits with status 2.
- Without ``--model-dir``: random weights at the SD-1.5 config (860M-parameter UNet) and random
  stand-in embeddings (or ``--prompt-embeds``); the PNG is then noise, the run shows the cost.
- ``--tiny``: a tiny random UNet and VAE, for a CPU smoke run (seconds; tests run it).

Run:
  python examples/stable_diffusion.py --tiny --steps 10 --out sd_tiny.png
  python examples/stable_diffusion.py --model-dir ./stable-diffusion-v1-5 --prompt "a red fox" --steps 50
  python examples/stable_diffusion.py --model-dir DIR --init-image in.png --strength 0.6 --out out.png
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import ddim_jax

# diffusers' SD-1.5 configs (runwayml/stable-diffusion-v1-5's unet/, vae/ and scheduler/ configs).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
# (every one an option of diffusers' old FlaxDDIMScheduler and torch DDIMScheduler too)
SD15_SCHEDULER_KWARGS = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
SD15_SCHEDULER = ddim_jax.DDIMConfig(**SD15_SCHEDULER_KWARGS)
# diffusers' tiny test UNet and VAE (its pipeline tests' configs), one layer per block.
TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    sample_size=32,
)
TEXT_LENGTH = 77


class Models:
    """The UNet and VAE modules with their parameters, and the scheduler config."""

    def __init__(self, unet, unet_params, vae, vae_params, scheduler: ddim_jax.DDIMConfig, text=None):
        self.unet, self.unet_params = unet, unet_params
        self.vae, self.vae_params = vae, vae_params
        self.scheduler = scheduler
        self.text = text  # (tokenizer, FlaxCLIPTextModel) or None

    @property
    def latent_size(self) -> int:
        return self.unet.config.sample_size

    @property
    def embed_dim(self) -> int:
        return self.unet.config.cross_attention_dim


def random_params(module, seed: int = 0) -> dict:
    """Random float32 parameters for a diffusers Flax model, drawn with numpy on the host.

    The shapes come from ``jax.eval_shape(module.init_weights, key)``; kernels are normal with
    variance 1 / fan-in (Flax's LeCun default), biases zero, norm scales one. On a CPU this takes
    seconds where ``module.init_weights`` (which runs the model, eagerly or compiled) takes
    minutes for the tiny test UNet on a loaded machine. They are committed to the default
    device, as ``from_pretrained``'s are, so random and loaded weights of one config run the same
    compiled program (uncommitted arrays would lower without sharding annotations: a new program).
    """
    shapes = jax.eval_shape(module.init_weights, jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1].key)
        if name in ("kernel", "embedding"):
            fan_in = int(np.prod(leaf.shape[:-1])) if name == "kernel" else 1
            values = rng.standard_normal(leaf.shape, np.float32) / np.float32(np.sqrt(fan_in))
        else:
            values = np.full(leaf.shape, 1.0 if name == "scale" else 0.0, np.float32)
        return jnp.asarray(values)

    return jax.device_put(jax.tree_util.tree_map_with_path(draw, shapes), jax.devices()[0])


def random_models(tiny: bool, dtype: Any = jnp.bfloat16, seed: int = 0) -> Models:
    """Random weights at the SD-1.5 config (or the tiny one); parameters float32, compute ``dtype``."""
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

    unet = FlaxUNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET), dtype=dtype)
    vae = FlaxAutoencoderKL(**(TINY_VAE if tiny else SD15_VAE), dtype=dtype)
    return Models(unet, random_params(unet, seed), vae, random_params(vae, seed + 1), SD15_SCHEDULER)


def _pytorch_weights(folder: Path) -> Path | None:
    """The PyTorch weights file of a diffusers model folder that holds no Flax weights, or None."""
    if (folder / "diffusion_flax_model.msgpack").exists() or (folder / "flax_model.msgpack").exists():
        return None
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors"):
        if (folder / name).exists():
            return folder / name
    return None


def _from_pytorch(cls, root: Path, sub: str, dtype: Any):
    """A diffusers Flax model from PyTorch weights (``.safetensors`` or ``.bin``), converted with
    diffusers' own key renaming. diffusers' ``from_pt=True`` reads only ``.bin`` files and
    initialises the model first (minutes on a CPU); here the parameter shapes come from
    ``jax.eval_shape``."""
    from diffusers.models.model_loading_utils import load_state_dict
    from diffusers.models.modeling_flax_pytorch_utils import rename_key, rename_key_and_reshape_tensor
    from flax.traverse_util import flatten_dict, unflatten_dict

    model = cls.from_config(cls.load_config(root, subfolder=sub), dtype=dtype)
    expected = flatten_dict(jax.eval_shape(model.init_weights, jax.random.key(0)))
    params = {}
    for key, tensor in load_state_dict(str(_pytorch_weights(root / sub))).items():
        flax_key, value = rename_key_and_reshape_tensor(
            tuple(rename_key(key).split(".")), tensor.float().numpy(), expected
        )
        if flax_key not in expected or value.shape != expected[flax_key].shape:
            raise ValueError(f"{root / sub}: PyTorch weight {key!r} matches no parameter of {cls.__name__}")
        params[flax_key] = jnp.asarray(value, jnp.float32)
    missing = sorted(".".join(k) for k in expected.keys() - params.keys())
    if missing:
        raise ValueError(f"{root / sub}: no PyTorch weights for {missing[:3]} ({len(missing)} in all)")
    return model, unflatten_dict(params)


class UsageError(ValueError):
    """A user error: `main` prints it on one line and exits with status 2."""


def flax_clip_importable() -> bool:
    """transformers' ``FlaxCLIPTextModel`` is there (transformers < 5; Flax was removed in 5)."""
    try:
        import transformers
    except ImportError:
        return False
    return hasattr(transformers, "FlaxCLIPTextModel")


def check_args(args: argparse.Namespace) -> ddim_jax.DDIMConfig:
    """Every argument checked before a model loads (a `UsageError` names the flag); returns the
    scheduler config: the folder's ``scheduler/``, or SD-1.5's with ``--sd15-scheduler``."""
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    for flag in ("guidance_scale", "guidance_rescale", "strength"):
        if not math.isfinite(getattr(args, flag)):
            raise UsageError(f"--{flag.replace('_', '-')} must be finite, got {getattr(args, flag)}")
    if not 0 < args.strength <= 1:
        raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
    if args.prompt is not None and args.prompt_embeds:
        raise UsageError("pass --prompt or --prompt-embeds, not both")
    if args.negative_embeds and not args.prompt_embeds:
        raise UsageError("--negative-embeds goes with --prompt-embeds")
    for flag in ("prompt_embeds", "negative_embeds", "init_image", "latents"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise UsageError(f"--{flag.replace('_', '-')} {path!r} is not a file")
    config = SD15_SCHEDULER
    if args.model_dir:
        root = Path(args.model_dir)
        if not (root / "unet").is_dir():
            what = "has no unet/ folder (a diffusers-format model)" if root.is_dir() else "is not a folder"
            raise UsageError(f"--model-dir {str(root)!r} {what}")
        if (root / "scheduler").is_dir():
            try:
                config = ddim_jax.DDIMConfig.from_pretrained(root)
            except (ValueError, TypeError, OSError) as err:
                raise UsageError(f"--model-dir {str(root)!r}: scheduler/: {err}") from None
        elif not args.sd15_scheduler:
            raise UsageError(
                f"--model-dir {str(root)!r} has no scheduler/ folder: pass --sd15-scheduler to sample "
                "with Stable Diffusion 1.5's schedule"
            )
        if args.prompt is None and not args.prompt_embeds:
            raise UsageError(
                "pass --prompt (with text_encoder/ and tokenizer/ in the folder) or --prompt-embeds"
            )
        if args.prompt is not None:
            if not ((root / "text_encoder").is_dir() and (root / "tokenizer").is_dir()):
                raise UsageError(
                    f"--prompt needs text_encoder/ and tokenizer/ in --model-dir {str(root)!r}: pass "
                    "--prompt-embeds (an .npy of the prompt's CLIP embeddings) instead"
                )
            if not flax_clip_importable():
                raise UsageError(
                    "--prompt needs transformers' FlaxCLIPTextModel (transformers < 5): install "
                    "'transformers<5' or pass --prompt-embeds"
                )
    elif args.prompt is not None:
        raise UsageError(
            "--prompt needs a text encoder, and random models have none: pass --model-dir or --prompt-embeds"
        )
    try:
        ddim_jax.set_timesteps(ddim_jax.create_state(config), args.steps, max_steps=args.max_steps)
    except ValueError as err:
        raise UsageError(f"--steps {args.steps} / --max-steps {args.max_steps}: {err}") from None
    return config


def load_models(
    model_dir: str | Path, dtype: Any, scheduler: ddim_jax.DDIMConfig, *, text_encoder: bool
) -> Models:
    """A local diffusers-format folder (checked by `check_args`): UNet, VAE and, with
    ``text_encoder``, transformers' Flax CLIP. PyTorch weights are converted (needs torch)."""
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

    root = Path(model_dir)
    loaded = []
    for cls, sub in ((FlaxUNet2DConditionModel, "unet"), (FlaxAutoencoderKL, "vae")):
        if _pytorch_weights(root / sub) is not None:
            loaded.append(_from_pytorch(cls, root, sub, dtype))
        else:
            loaded.append(cls.from_pretrained(root, subfolder=sub, dtype=dtype))
    (unet, unet_params), (vae, vae_params) = loaded
    text = None
    if text_encoder:
        from transformers import CLIPTokenizer, FlaxCLIPTextModel

        tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
        from_pt = _pytorch_weights(root / "text_encoder") is not None
        encoder = FlaxCLIPTextModel.from_pretrained(root, subfolder="text_encoder", from_pt=from_pt)
        text = (tokenizer, encoder)
    return Models(unet, unet_params, vae, vae_params, scheduler, text)


def encode_prompts(models: Models, prompt: str, negative_prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """``(negative, prompt)`` CLIP embeddings, each ``(L, D)`` (``(77, 768)`` for SD-1.5)."""
    tokenizer, encoder = models.text
    ids = tokenizer(
        [negative_prompt, prompt],
        padding="max_length",
        max_length=min(tokenizer.model_max_length, encoder.config.max_position_embeddings),
        truncation=True,
        return_tensors="np",
    ).input_ids
    embeds = np.asarray(encoder(ids)[0], np.float32)
    return embeds[0], embeds[1]


def make_model_fn(unet):
    """``model_fn(x, t, params, context)`` for `ddim_jax.sample`: NCHW latents, t a scalar."""

    def model_fn(x: jax.Array, t: jax.Array, params, context: jax.Array) -> jax.Array:
        t = jnp.broadcast_to(t, x.shape[:1])
        return unet.apply({"params": params}, x, t, encoder_hidden_states=context).sample

    return model_fn


def make_generator(models: Models, max_steps: int, *, image_to_image: bool = False):
    """One jitted program for every step count up to ``max_steps``, strength, guidance scale and
    rescale, parameter values and inputs. Returns ``(generate, traces)``: ``traces`` grows by one
    each time jax traces (compiles) ``generate``.

    ``generate(params, noise, context, num_steps, strength, guidance_scale, guidance_rescale,
    init_latents)``: ``context`` is ``concat([negative, prompt])`` embeddings; with
    ``image_to_image`` the run starts at diffusers' ``start_step = S - int(S * strength)`` from
    ``init_latents`` noised there, else from ``noise`` (strength is then not used).
    """
    model_fn = make_model_fn(models.unet)
    base = ddim_jax.create_state(models.scheduler)
    traces: list[int] = []

    @jax.jit
    def generate(params, noise, context, num_steps, strength, guidance_scale, guidance_rescale, init_latents):
        traces.append(1)  # runs only while jax traces
        state = ddim_jax.set_timesteps(base, num_steps, max_steps=max_steps)
        if image_to_image:
            # diffusers' img2img: int(S * strength) steps run; at least one
            kept = jnp.maximum(jnp.floor(num_steps * strength).astype(jnp.int32), 1)
            start = jnp.minimum(num_steps - kept, num_steps - 1)
            latents = ddim_jax.add_noise(state, init_latents, noise, state.timesteps[start])
        else:
            start, latents = jnp.int32(0), noise
        return ddim_jax.sample(
            model_fn,
            state,
            latents,
            model_args=(params, context),
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            model_dtype=models.unet.dtype,
            start_step=start,
        )

    return generate, traces


def decode(models: Models, latents: jax.Array) -> np.ndarray:
    """VAE decode to uint8 images ``(B, H, W, 3)``."""
    scale = models.vae.config.scaling_factor
    images = models.vae.apply({"params": models.vae_params}, latents / scale, method=models.vae.decode).sample
    images = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return np.asarray(jnp.round(images * 255), np.uint8)


def encode_image(models: Models, path: str | Path, key: jax.Array) -> jax.Array:
    """A PNG/JPEG resized to the VAE's input size, encoded to scaled latents ``(1, 4, h, w)``."""
    from PIL import Image

    size = models.latent_size * 2 ** (len(models.vae.config.block_out_channels) - 1)
    image = np.asarray(Image.open(path).convert("RGB").resize((size, size)), np.float32) / 127.5 - 1
    pixels = jnp.asarray(image.transpose(2, 0, 1)[None])
    dist = models.vae.apply({"params": models.vae_params}, pixels, method=models.vae.encode).latent_dist
    latents = dist.sample(key).astype(jnp.float32).transpose(0, 3, 1, 2)  # the Flax VAE's latents are NHWC
    return latents * models.vae.config.scaling_factor


def load_embeddings(flag: str, path: str, dim: int) -> np.ndarray:
    """An ``(L, dim)`` float32 array from an ``.npy`` file, or a `UsageError`."""
    try:
        values = np.load(path)
    except (OSError, ValueError) as err:
        raise UsageError(f"{flag} {path!r} is not an .npy file ({err})") from None
    if values.ndim != 2 or values.shape[1] != dim or not np.issubdtype(values.dtype, np.floating):
        raise UsageError(
            f"{flag} must hold floats of shape (L, {dim}) for this UNet, got {values.dtype} {values.shape}"
        )
    return values.astype(np.float32)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the example; a user error prints one line and exits with status 2."""
    try:
        return run(argv)
    except UsageError as err:
        print(f"stable_diffusion.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="local diffusers-format model folder (nothing is downloaded)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models: a CPU smoke run")
    parser.add_argument("--prompt", help="the prompt (needs text_encoder/ and tokenizer/ in --model-dir)")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--prompt-embeds", help=".npy prompt embeddings (77, D), instead of a text encoder")
    parser.add_argument("--negative-embeds", help=".npy negative embeddings (77, D); default zeros")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--max-steps", type=int, default=100, help="the compiled program serves steps <= this"
    )
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--guidance-rescale", type=float, default=0.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--latents", help=".npy initial latents (batch, 4, h, w), instead of drawing them")
    parser.add_argument("--init-image", help="image-to-image: the starting image")
    parser.add_argument("--strength", type=float, default=0.8, help="image-to-image strength in (0, 1]")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="UNet/VAE compute"
    )
    parser.add_argument(
        "--sd15-scheduler",
        action="store_true",
        help="a --model-dir without scheduler/: use SD-1.5's schedule",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="stable_diffusion.png")
    args = parser.parse_args(argv)
    scheduler = check_args(args)

    dtype = jnp.dtype(args.dtype)
    t0 = time.perf_counter()
    if args.model_dir:
        models = load_models(args.model_dir, dtype, scheduler, text_encoder=args.prompt is not None)
    else:
        models = random_models(args.tiny, dtype, args.seed)
    source = args.model_dir or ("tiny, random" if args.tiny else "SD-1.5 config, random")
    print(f"models ready in {time.perf_counter() - t0:.1f} s ({source})")

    d = models.embed_dim
    rng = np.random.default_rng(args.seed)
    if args.prompt_embeds:
        positive = load_embeddings("--prompt-embeds", args.prompt_embeds, d)
        negative = (
            load_embeddings("--negative-embeds", args.negative_embeds, d)
            if args.negative_embeds
            else np.zeros_like(positive)
        )
        if negative.shape != positive.shape:
            raise UsageError(
                f"--negative-embeds has shape {negative.shape}, --prompt-embeds {positive.shape}"
            )
    elif models.text is not None:
        negative, positive = encode_prompts(models, args.prompt, args.negative_prompt)
    else:  # random models: random stand-ins of CLIP's shape
        negative, positive = (rng.standard_normal((TEXT_LENGTH, d)).astype(np.float32) for _ in range(2))
    b = args.batch
    context = jnp.concatenate(
        [jnp.broadcast_to(negative, (b, *negative.shape)), jnp.broadcast_to(positive, (b, *positive.shape))]
    )

    k_noise, k_image = jax.random.split(jax.random.key(args.seed))
    shape = (b, 4, models.latent_size, models.latent_size)
    if args.latents:
        noise = jnp.asarray(np.load(args.latents), jnp.float32)
        if noise.shape != shape:
            raise UsageError(f"--latents must have shape {shape} (--batch, 4, h, w), got {noise.shape}")
    else:
        noise = jax.random.normal(k_noise, shape)
    image_to_image = args.init_image is not None
    init = (
        jnp.broadcast_to(encode_image(models, args.init_image, k_image), noise.shape)
        if image_to_image
        else noise
    )
    generate, traces = make_generator(models, args.max_steps, image_to_image=image_to_image)
    t0 = time.perf_counter()
    latents = jax.block_until_ready(
        generate(
            models.unet_params,
            noise,
            context,
            jnp.int32(args.steps),
            jnp.float32(args.strength),
            jnp.float32(args.guidance_scale),
            jnp.float32(args.guidance_rescale),
            init,
        )
    )
    seconds = time.perf_counter() - t0
    images = decode(models, latents)
    from ddim_jax.demo.png import write_png

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_png(args.out, np.concatenate(list(images), axis=1))
    print(
        f"{args.steps} steps (compile + run) in {seconds:.1f} s; wrote {args.out} {images.shape[1:3]}; "
        f"traces: {len(traces)}"
    )
    return {"latents": np.asarray(latents), "images": images, "traces": len(traces), "models": models}


if __name__ == "__main__":
    main()
