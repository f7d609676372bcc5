"""A tiny Flax Stable Diffusion folder, built locally (nothing is downloaded), for the tests that
run diffusers 0.35's own Flax pipelines: diffusers' tiny test UNet and VAE (the configs of
``examples/stable_diffusion.py``), a 2-layer ``FlaxCLIPTextModel`` and a ``CLIPTokenizer`` whose
vocab/merges files are written here, saved with ``FlaxStableDiffusionPipeline.save_pretrained``.

Needs diffusers 0.35.x with transformers < 5 (Flax CLIP); callers skip without them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SD15_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# the seed document's scheduler: a v-prediction model on a zero-terminal-SNR trailing schedule
SEED_SCHEDULER = dict(
    SD15_BETAS,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    rescale_betas_zero_snr=True,
)
PROMPT_LENGTH = 16  # tokenizer.model_max_length: short, so the text encoder is cheap
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def load_sd_example():
    """``examples/stable_diffusion.py`` as a module (its tiny configs and fast random init)."""
    spec = importlib.util.spec_from_file_location(
        "stable_diffusion", ROOT / "examples" / "stable_diffusion.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """A CLIP BPE vocabulary of single letters (with and without ``</w>``) and a few merges."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS)]
    merges = ["r e", "e d</w>", "f o", "x</w>", "fo x</w>", "a n"]
    tokens += [m.replace(" ", "") for m in merges]
    vocab, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab, merges_file


def tiny_text_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,  # the tiny UNet's cross_attention_dim
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=PROMPT_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def build_tiny_pipeline(folder: Path) -> Path:
    """Saves a tiny ``FlaxStableDiffusionPipeline`` (diffusers' Flax DDIM scheduler at SD-1.5's
    settings, no safety checker) to ``folder`` and returns it."""
    from diffusers import (
        FlaxAutoencoderKL,
        FlaxDDIMScheduler,
        FlaxStableDiffusionPipeline,
        FlaxUNet2DConditionModel,
    )
    from transformers import CLIPTokenizer, FlaxCLIPTextModel

    sd = load_sd_example()
    vocab, merges = write_tokenizer_files(folder / "_tokenizer_files")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=PROMPT_LENGTH)
    text_encoder = FlaxCLIPTextModel(tiny_text_config(len(tokenizer)), seed=0)
    unet = FlaxUNet2DConditionModel(**sd.TINY_UNET)
    vae = FlaxAutoencoderKL(**sd.TINY_VAE)
    scheduler = FlaxDDIMScheduler(**SD15_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = FlaxStableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
    )
    params = {
        "unet": sd.random_params(unet, 0),
        "vae": sd.random_params(vae, 1),
        "text_encoder": text_encoder.params,
        "scheduler": scheduler.create_state(),
    }
    pipe.save_pretrained(folder, params=params)
    return folder


def build_tiny_torch_pipeline(folder: Path):
    """The same tiny parts in torch (random weights): diffusers' ``StableDiffusionPipeline``
    with the seed document's swap, ``DDIMScheduler.from_config(pipe.scheduler.config,
    rescale_betas_zero_snr=True, timestep_spacing="trailing")`` on a v-prediction config,
    saved to ``folder`` (PyTorch weights); returns the pipeline."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    sd = load_sd_example()
    torch.manual_seed(0)
    vocab, merges = write_tokenizer_files(folder / "_tokenizer_files")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=PROMPT_LENGTH)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**sd.TINY_VAE),
        text_encoder=CLIPTextModel(tiny_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**sd.TINY_UNET),
        scheduler=DDIMScheduler(**SD15_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                prediction_type="v_prediction"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )
    pipe.save_pretrained(folder)
    return pipe


def context_for(pipe, params, prompt_ids: np.ndarray) -> np.ndarray:
    """``concat([negative, prompt])`` embeddings as the Flax pipeline makes them (empty negative)."""
    uncond = pipe.tokenizer([""] * prompt_ids.shape[0], padding="max_length", max_length=prompt_ids.shape[-1])
    embed = pipe.text_encoder
    negative = embed(np.asarray(uncond.input_ids), params=params["text_encoder"])[0]
    positive = embed(prompt_ids, params=params["text_encoder"])[0]
    return np.concatenate([np.asarray(negative), np.asarray(positive)])
