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


def tiny_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, FlaxCLIPTextModel

    config = CLIPTextConfig(
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
    return FlaxCLIPTextModel(config, seed=0)


def build_tiny_pipeline(folder: Path) -> Path:
    """Saves a tiny ``FlaxStableDiffusionPipeline`` (diffusers' Flax DDIM scheduler at SD-1.5's
    settings, no safety checker) to ``folder`` and returns it."""
    from diffusers import (
        FlaxAutoencoderKL,
        FlaxDDIMScheduler,
        FlaxStableDiffusionPipeline,
        FlaxUNet2DConditionModel,
    )
    from transformers import CLIPTokenizer

    sd = load_sd_example()
    vocab, merges = write_tokenizer_files(folder / "_tokenizer_files")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=PROMPT_LENGTH)
    text_encoder = tiny_text_encoder(len(tokenizer))
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


def context_for(pipe, params, prompt_ids: np.ndarray) -> np.ndarray:
    """``concat([negative, prompt])`` embeddings as the Flax pipeline makes them (empty negative)."""
    uncond = pipe.tokenizer([""] * prompt_ids.shape[0], padding="max_length", max_length=prompt_ids.shape[-1])
    embed = pipe.text_encoder
    negative = embed(np.asarray(uncond.input_ids), params=params["text_encoder"])[0]
    positive = embed(prompt_ids, params=params["text_encoder"])[0]
    return np.concatenate([np.asarray(negative), np.asarray(positive)])
