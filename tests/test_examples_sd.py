"""examples/stable_diffusion.py at tiny size: text-to-image, a saved model folder loaded back
through ``--model-dir``, image-to-image, and one compiled program for every step count."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "FlaxUNet2DConditionModel"):
    pytest.skip("needs diffusers' Flax classes (diffusers < 0.40)", allow_module_level=True)
pytest.importorskip("PIL")

import _tiny_sd  # noqa: E402

import ddim_jax  # noqa: E402

sd = _tiny_sd.load_sd_example()


def test_tiny_run_then_the_saved_folder_loads_back_and_image_to_image(tmp_path):
    from PIL import Image

    out = tmp_path / "t2i.png"
    first = sd.main(["--tiny", "--steps", "4", "--guidance-rescale", "0.7", "--out", str(out)])
    assert Image.open(out).size == (32, 32) and first["traces"] == 1
    assert np.isfinite(first["latents"]).all() and first["latents"].std() > 0.1

    # save_pretrained into a diffusers-format folder, with the run's stand-in embeddings as files
    models, folder = first["models"], tmp_path / "model"
    models.unet.save_pretrained(folder / "unet", params=models.unet_params)
    models.vae.save_pretrained(folder / "vae", params=models.vae_params)
    ddim_jax.DDIMConfig.to_json(models.scheduler, tmp_path / "scheduler_config.json")
    (folder / "scheduler").mkdir()
    (tmp_path / "scheduler_config.json").rename(folder / "scheduler" / "scheduler_config.json")
    rng = np.random.default_rng(0)  # the example's stand-ins for seed 0: negative, then prompt
    negative, positive = (rng.standard_normal((77, 32)).astype(np.float32) for _ in range(2))
    np.save(tmp_path / "pos.npy", positive)
    np.save(tmp_path / "neg.npy", negative)
    loaded = sd.main(
        ["--model-dir", str(folder), "--prompt-embeds", str(tmp_path / "pos.npy"),
         "--negative-embeds", str(tmp_path / "neg.npy"), "--steps", "4", "--guidance-rescale", "0.7",
         "--out", str(tmp_path / "loaded.png")]
    )  # fmt: skip
    np.testing.assert_array_equal(loaded["latents"], first["latents"])
    np.testing.assert_array_equal(loaded["images"], first["images"])

    i2i = sd.main(
        [
            "--tiny",
            "--init-image",
            str(out),
            "--strength",
            "0.5",
            "--steps",
            "6",
            "--out",
            str(tmp_path / "i2i.png"),
        ]
    )
    assert Image.open(tmp_path / "i2i.png").size == (32, 32)
    assert np.isfinite(i2i["latents"]).all()


def test_one_program_for_every_step_count_matches_the_static_loop():
    models = sd.random_models(tiny=True, dtype=jnp.float32)
    generate, traces = sd.make_generator(models, max_steps=8)
    noise = jax.random.normal(jax.random.key(0), (1, 4, 16, 16))
    context = jax.random.normal(jax.random.key(1), (2, 77, 32))
    args = (jnp.float32(1.0), jnp.float32(5.0), jnp.float32(0.5), noise)
    runtime = {s: generate(models.unet_params, noise, context, jnp.int32(s), *args) for s in (3, 5)}
    assert len(traces) == 1  # step count, guidance and parameters are runtime values

    state = ddim_jax.set_timesteps(ddim_jax.create_state(models.scheduler), 5)
    static = jax.jit(
        lambda params, noise, context, state: ddim_jax.sample(
            sd.make_model_fn(models.unet), state, noise, model_args=(params, context),
            guidance_scale=5.0, guidance_rescale=0.5,
        )
    )(models.unet_params, noise, context, state)  # fmt: skip
    np.testing.assert_allclose(np.asarray(runtime[5]), np.asarray(static), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(runtime[3]), np.asarray(runtime[5]))


def test_a_folder_with_pytorch_weights_loads_with_from_pt(tmp_path):
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(**sd.TINY_UNET).save_pretrained(tmp_path / "unet")
    AutoencoderKL(**sd.TINY_VAE).save_pretrained(tmp_path / "vae")
    assert list((tmp_path / "unet").glob("*.safetensors"))  # PyTorch weights only
    np.save(tmp_path / "pos.npy", np.full((77, 32), 0.1, np.float32))
    out = sd.main(
        ["--model-dir", str(tmp_path), "--sd15-scheduler", "--prompt-embeds", str(tmp_path / "pos.npy"),
         "--steps", "2", "--dtype", "float32", "--out", str(tmp_path / "pt.png")]
    )  # fmt: skip
    assert out["images"].shape == (1, 32, 32, 3) and np.isfinite(out["latents"]).all()
    # the converted UNet computes what the torch one does
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    x, ctx = np.ones((1, 4, 16, 16), np.float32), np.full((1, 77, 32), 0.1, np.float32)
    with torch.no_grad():
        ref = unet(torch.from_numpy(x), 500, encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy()
    models = out["models"]
    ours = sd.make_model_fn(models.unet)(jnp.asarray(x), jnp.int32(500), models.unet_params, jnp.asarray(ctx))
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-3, atol=1e-3)


def _folder(root: Path, *subfolders: str) -> Path:
    """A model folder's layout without weights: the checks run before anything loads."""
    for sub in subfolders:
        (root / sub).mkdir(parents=True)
    if "scheduler" in subfolders:
        ddim_jax.DDIMConfig(**sd.SD15_SCHEDULER_KWARGS).to_json(root / "scheduler" / "scheduler_config.json")
    return root


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("no text encoder", ["--prompt", "a fox"], "--prompt needs text_encoder/ and tokenizer/"),
        ("no scheduler", ["--prompt-embeds", "{pos}"], "has no scheduler/ folder: pass --sd15-scheduler"),
        ("no prompt", [], "pass --prompt (with text_encoder/ and"),
        ("nan guidance", ["--tiny", "--guidance-scale", "nan"], "--guidance-scale must be finite, got nan"),
        ("inf rescale", ["--tiny", "--guidance-rescale", "inf"], "--guidance-rescale must be finite"),
        ("batch 0", ["--tiny", "--batch", "0"], "--batch must be >= 1, got 0"),
        ("steps past T", ["--tiny", "--steps", "100000", "--max-steps", "100000"],
         "--max-steps 100000: max_steps must be an int in [1, num_train_timesteps=1000]"),
        ("steps past max", ["--tiny", "--steps", "5", "--max-steps", "3"], "[1, max_steps=3]"),
        ("missing folder", ["--model-dir", "{missing}"], "is not a folder"),
        ("random models", ["--tiny", "--prompt", "a fox"], "random models have none"),
        ("missing embeds", ["--tiny", "--prompt-embeds", "{missing}"], "--prompt-embeds"),
        ("strength", ["--tiny", "--strength", "0"], "--strength must be in (0, 1], got 0.0"),
    ],
)  # fmt: skip
def test_the_example_refuses_what_it_cannot_do_before_loading_a_model(
    case, args, message, tmp_path, monkeypatch, capsys
):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(sd, "load_models", no_loading)
    monkeypatch.setattr(sd, "random_models", no_loading)
    layout = ("unet", "vae") if case == "no scheduler" else ("unet", "vae", "scheduler")
    folder = _folder(tmp_path / "model", *layout)
    np.save(tmp_path / "pos.npy", np.zeros((77, 32), np.float32))
    fill = {"pos": str(tmp_path / "pos.npy"), "missing": str(tmp_path / "missing")}
    argv = [a.format(**fill) for a in args]
    if "--tiny" not in argv and "--model-dir" not in argv:
        argv = ["--model-dir", str(folder), *argv]
    with pytest.raises(SystemExit) as exit_info:
        sd.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stable_diffusion.py: error: ") and message in err, err


def test_a_prompt_runs_through_the_folders_flax_clip_text_encoder(tmp_path):
    """The tiny Flax pipeline folder (tests/_tiny_sd.py) through ``--model-dir --prompt``: the
    example's embeddings are the text encoder's, as diffusers' Flax pipeline computes them."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "FlaxCLIPTextModel"):
        pytest.skip("needs transformers' Flax CLIP (transformers < 5)")
    from diffusers import FlaxStableDiffusionPipeline

    folder = _tiny_sd.build_tiny_pipeline(tmp_path / "model")
    out = sd.main(
        ["--model-dir", str(folder), "--prompt", "a red fox", "--steps", "3", "--dtype", "float32",
         "--out", str(tmp_path / "fox.png")]
    )  # fmt: skip
    assert out["images"].shape == (1, 32, 32, 3) and np.isfinite(out["latents"]).all()
    negative, positive = sd.encode_prompts(out["models"], "a red fox", "")
    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, feature_extractor=None
    )
    expected = _tiny_sd.context_for(pipe, params, pipe.prepare_inputs(["a red fox"]))
    np.testing.assert_allclose(np.stack([negative, positive]), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(negative, positive)


def test_the_seed_example_in_torch_and_in_this_example_agree(tmp_path):
    """The seed document's snippet (trailing + zero-SNR DDIM swapped in by ``from_config``,
    ``guidance_rescale=0.7``) run by diffusers' torch ``StableDiffusionPipeline`` and by this
    example on the same tiny random weights (the example converts the saved PyTorch folder) and
    the same initial latents: the final latents agree to float32 differences between the two
    frameworks' kernels. Measured: 5.7e-5 normwise relative; one call of the converted UNet is
    3.1e-5 from torch's on its own (CLIP 2.4e-7), so 1e-4 allows about three UNet calls' worth
    of that, while a wrong schedule (the old Flax class here) is 9e-2 off."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "FlaxCLIPTextModel"):
        pytest.skip("needs transformers' Flax CLIP (transformers < 5)")
    pipe = _tiny_sd.build_tiny_torch_pipeline(tmp_path / "model")
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    prompt, steps = "a red fox", 4
    with torch.no_grad():
        expected = pipe(
            prompt, num_inference_steps=steps, guidance_scale=7.5, guidance_rescale=0.7,
            latents=torch.from_numpy(latents), output_type="latent",
        ).images.numpy()  # fmt: skip
    out = sd.main(
        ["--model-dir", str(tmp_path / "model"), "--prompt", prompt, "--steps", str(steps),
         "--guidance-rescale", "0.7", "--dtype", "float32", "--latents", str(tmp_path / "latents.npy"),
         "--out", str(tmp_path / "fox.png")]
    )  # fmt: skip
    config = out["models"].scheduler
    assert (config.timestep_spacing, config.rescale_betas_zero_snr, config.prediction_type) == (
        "trailing", True, "v_prediction",
    )  # fmt: skip
    error = float(np.linalg.norm(out["latents"] - expected) / np.linalg.norm(expected))
    print(f"\nseed example, {steps} steps: torch pipeline vs examples/stable_diffusion.py {error:.1e}")
    assert error < 1e-4
