"""Differentiable sampling: `jax.grad` through `sample` against central finite differences (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ddim_jax import DDIMConfig, create_state, invert, sample, set_timesteps

D = 4


def tiny_model(x, t, params):
    """A one-layer model ``tanh(x W + b)``, modulated by t."""
    return jnp.tanh(x @ params["w"] + params["b"]) * (1 + 1e-3 * t.astype(x.dtype))


def init(dtype, seed=0):
    kw, kb, kx = jax.random.split(jax.random.key(seed), 3)
    params = {
        "w": 0.5 * jax.random.normal(kw, (D, D), dtype),
        "b": 0.1 * jax.random.normal(kb, (D,), dtype),
    }
    return params, jax.random.normal(kx, (2, D), dtype)


def make_loss(state, eta=0.0, remat=False):
    key = jax.random.key(7) if eta > 0 else None

    def loss(params, x):
        out = sample(tiny_model, state, x, key=key, eta=eta, model_args=(params,), remat=remat)
        return jnp.sum(jnp.sin(out) * jnp.arange(1, out.size + 1, dtype=out.dtype).reshape(out.shape))

    return loss


def central_differences(f, x, h=1e-6):
    flat, unravel = ravel_pytree(x)
    grad = np.zeros(flat.shape, np.float64)
    for i in range(flat.size):
        e = np.zeros(flat.shape)
        e[i] = h
        grad[i] = (float(f(unravel(flat + e))) - float(f(unravel(flat - e)))) / (2 * h)
    return grad


@pytest.mark.parametrize(
    ("config", "eta"),
    [
        ({"clip_sample": False}, 0.0),
        ({"prediction_type": "v_prediction", "timestep_spacing": "trailing", "clip_sample": False}, 0.0),
        ({"clip_sample": False}, 0.8),
    ],
)
def test_grad_matches_finite_differences_in_float64(config, eta):
    state = set_timesteps(create_state(DDIMConfig(**config)), 5)
    with jax.enable_x64(True):
        params, x = init(jnp.float64)
        loss = jax.jit(make_loss(state, eta))
        assert loss(params, x).dtype == jnp.float64
        g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, x)
        fd_x = central_differences(lambda x: loss(params, x), x)
        fd_params = central_differences(lambda p: loss(p, x), params)
        np.testing.assert_allclose(np.ravel(g_x), fd_x, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(ravel_pytree(g_params)[0], fd_params, rtol=1e-6, atol=1e-8)
    assert jnp.ones(1).dtype == jnp.float32  # x64 did not leak out of the test


def test_remat_gives_the_same_gradient(eta=1.0):
    state = set_timesteps(create_state(DDIMConfig()), 6)
    params, x = init(jnp.float32)
    g = jax.jit(jax.grad(make_loss(state, eta), argnums=(0, 1)))(params, x)
    g_remat = jax.jit(jax.grad(make_loss(state, eta, remat=True), argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_remat_recomputes_the_model_on_the_backward_pass():
    """With remat the backward pass calls the model again; without, it reuses saved activations."""
    state = set_timesteps(create_state(DDIMConfig()), 3)
    params, x = init(jnp.float32)

    def count_tanh(remat):
        jaxpr = jax.make_jaxpr(jax.grad(make_loss(state, remat=remat)))(params, x)
        return str(jaxpr).count("tanh")

    assert count_tanh(True) > count_tanh(False)


def test_grads_finite_with_eta_and_guidance():
    config = DDIMConfig(
        timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"
    )
    state = set_timesteps(create_state(config), 8)
    params, x = init(jnp.float32)

    def guided(x, t, params):
        return jnp.concatenate([0.5 * tiny_model(x[:2], t, params), tiny_model(x[2:], t, params)])

    def loss(params, x, eta, scale, rescale):
        out = sample(
            guided,
            state,
            x,
            key=jax.random.key(0),
            eta=eta,
            model_args=(params,),
            guidance_scale=scale,
            guidance_rescale=rescale,
        )
        return jnp.mean(out**2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(params, x, 1.0, 5.0, 0.7)
    for leaf in jax.tree.leaves(grads):
        assert np.isfinite(np.asarray(leaf)).all()
    assert float(jnp.abs(grads[1]).sum()) > 0


def test_grad_through_invert_is_finite():
    state = set_timesteps(create_state(DDIMConfig(clip_sample=False)), 5)
    params, x = init(jnp.float32)
    g = jax.grad(lambda x: jnp.sum(invert(tiny_model, state, x, model_args=(params,), remat=True) ** 2))(x)
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).sum()) > 0
