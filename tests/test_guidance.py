"""Classifier-free guidance and guidance rescale: formulas, diffusers parity, the batched loop form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddim_jax import (
    DDIMConfig,
    classifier_free_guidance,
    create_state,
    rescale_noise_cfg,
    sample,
    set_timesteps,
)

SHAPE = (3, 4, 5, 5)


def pair(seed=0, shape=SHAPE):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, shape), 0.5 * jax.random.normal(k2, shape) + 0.2


def diffusers_rescale_noise_cfg():
    """diffusers' ``rescale_noise_cfg``: the Stable Diffusion pipeline's, or its copy in ``guiders``
    (the pipeline module needs ``transformers``, which the reference extra does not install)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    try:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as fn
    except ImportError:
        from diffusers.guiders.guider_utils import rescale_noise_cfg as fn
    return fn


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("shape", [(3, 4, 5, 5), (2, 16), (2, 3, 2, 4, 4)])
def test_rescale_noise_cfg_matches_diffusers(phi, shape):
    import torch

    diffusers_rescale = diffusers_rescale_noise_cfg()
    uncond, cond = pair(1, shape)
    cfg = uncond + 6.0 * (cond - uncond)
    ref = diffusers_rescale(torch.from_numpy(np.array(cfg)), torch.from_numpy(np.array(cond)), phi)
    ours = rescale_noise_cfg(cfg, cond, phi)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-6)
    # And through classifier_free_guidance, with the scale applied there.
    np.testing.assert_allclose(
        classifier_free_guidance(uncond, cond, 6.0, phi), ref.numpy(), rtol=1e-5, atol=1e-5
    )


def test_rescale_one_matches_conditional_std_per_example():
    uncond, cond = pair(2)
    out = classifier_free_guidance(uncond, cond, 9.0, 1.0)
    axes = (1, 2, 3)
    np.testing.assert_allclose(jnp.std(out, axis=axes), jnp.std(cond, axis=axes), rtol=1e-5)


def test_classifier_free_guidance_formula():
    uncond, cond = pair(3)
    np.testing.assert_allclose(
        classifier_free_guidance(uncond, cond, 7.5), uncond + 7.5 * (cond - uncond), 1e-6
    )
    np.testing.assert_allclose(classifier_free_guidance(uncond, cond, 1.0), cond, atol=1e-6)
    np.testing.assert_allclose(classifier_free_guidance(uncond, cond, 0.0), uncond, atol=1e-6)


def test_guidance_rescale_zero_equals_plain_cfg_also_when_traced():
    uncond, cond = pair(4)
    plain = uncond + 5.0 * (cond - uncond)
    np.testing.assert_array_equal(classifier_free_guidance(uncond, cond, 5.0, 0.0), plain)
    traced = jax.jit(classifier_free_guidance)(uncond, cond, 5.0, 0.0)
    np.testing.assert_allclose(traced, plain, rtol=1e-6, atol=1e-6)


def test_constant_guided_output_with_traced_zero_rescale_is_not_nan():
    zeros = jnp.zeros(SHAPE)
    out = jax.jit(classifier_free_guidance)(zeros, zeros, 7.0, 0.0)
    np.testing.assert_array_equal(out, zeros)
    out = rescale_noise_cfg(jnp.ones(SHAPE), pair(5)[1], 0.5)
    assert np.isfinite(np.asarray(out)).all()


def cond_model(x, t, w, emb):
    """Stand-in conditioned model; ``emb`` has one row per example of the (doubled) batch."""
    return jnp.sin(w * x) + emb[:, :, None, None] * (1 + 1e-3 * t.astype(x.dtype))


def test_batched_guidance_in_sample_equals_two_model_calls(phi=0.6):
    """One call on ``[x, x]`` with ``[uncond, cond]`` conditioning equals two separate calls."""
    state = set_timesteps(create_state(DDIMConfig(clip_sample=False)), 5)
    x = jax.random.normal(jax.random.key(0), SHAPE)
    w, scale = 0.7, 4.0
    uncond_emb = jnp.zeros((3, 4))
    cond_emb = jax.random.normal(jax.random.key(1), (3, 4))

    def two_calls(x, t):
        u = cond_model(x, t, w, uncond_emb)
        c = cond_model(x, t, w, cond_emb)
        return classifier_free_guidance(u, c, scale, phi)

    ref = sample(two_calls, state, x)
    out = sample(
        cond_model,
        state,
        x,
        model_args=(w, jnp.concatenate([uncond_emb, cond_emb])),
        guidance_scale=scale,
        guidance_rescale=phi,
    )
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_conditioning_values_do_not_recompile():
    state = set_timesteps(create_state(DDIMConfig()), 4)
    x = jax.random.normal(jax.random.key(0), SHAPE)
    traces = []

    @jax.jit
    def run(emb, scale, rescale):
        traces.append(1)
        return sample(
            cond_model, state, x, model_args=(0.5, emb), guidance_scale=scale, guidance_rescale=rescale
        )

    outs = [run(jax.random.normal(jax.random.key(i), (6, 4)), 3.0 + i, 0.1 * i) for i in range(3)]
    assert len(traces) == 1 and run._cache_size() == 1
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])


def test_guidance_bad_inputs():
    uncond, cond = pair(6)
    with pytest.raises(ValueError, match="Shape mismatch: cond has shape"):
        classifier_free_guidance(uncond, cond[:1], 2.0)
    with pytest.raises(ValueError, match="Shape mismatch: noise_pred_text has shape"):
        rescale_noise_cfg(uncond, cond[:, :1], 0.5)
