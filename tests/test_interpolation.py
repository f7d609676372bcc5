"""`slerp`: endpoints, norm preservation, batching, the parallel fallback, a numpy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddim_jax import slerp

SHAPE = (2, 4, 8, 8)


def latent_pair(seed=0):
    k0, k1 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k0, SHAPE), jax.random.normal(k1, SHAPE)


def numpy_slerp(x0, x1, alpha):
    """Independent float64 reference (DDIM paper, Sec. 5.3)."""
    x0, x1 = np.asarray(x0, np.float64), np.asarray(x1, np.float64)
    theta = np.arccos(np.sum(x0 * x1) / (np.linalg.norm(x0) * np.linalg.norm(x1)))
    return (np.sin((1 - alpha) * theta) * x0 + np.sin(alpha * theta) * x1) / np.sin(theta)


def test_endpoints():
    x0, x1 = latent_pair()
    np.testing.assert_allclose(slerp(x0, x1, 0.0), x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(slerp(x0, x1, 1.0), x1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.5, 0.9])
def test_matches_numpy_reference(alpha):
    x0, x1 = latent_pair(1)
    np.testing.assert_allclose(slerp(x0, x1, alpha), numpy_slerp(x0, x1, alpha), rtol=1e-5, atol=1e-5)


def test_preserves_norm_for_equal_norm_inputs_and_linear_does_not():
    x0, x1 = latent_pair(2)
    x1 = x1 * (jnp.linalg.norm(x0) / jnp.linalg.norm(x1))
    norm = float(jnp.linalg.norm(x0))
    for alpha in np.linspace(0, 1, 9):
        np.testing.assert_allclose(float(jnp.linalg.norm(slerp(x0, x1, alpha))), norm, rtol=1e-5)
    # Linear interpolation of near-orthogonal latents shrinks the norm by ~1/sqrt(2) at the midpoint.
    assert float(jnp.linalg.norm(0.5 * (x0 + x1))) < 0.8 * norm


def test_batched_alpha():
    x0, x1 = latent_pair(3)
    alphas = jnp.linspace(0.0, 1.0, 5)
    out = slerp(x0, x1, alphas)
    assert out.shape == (5, *SHAPE) and out.dtype == jnp.float32
    for i, a in enumerate(alphas.tolist()):
        np.testing.assert_allclose(out[i], slerp(x0, x1, a), rtol=1e-6, atol=1e-6)
    jitted = jax.jit(slerp)
    np.testing.assert_allclose(jitted(x0, x1, alphas), out, rtol=1e-5, atol=1e-6)
    jitted(x0, x1, alphas + 0.01)
    assert jitted._cache_size() == 1


def test_parallel_inputs_fall_back_to_linear():
    x0 = latent_pair(4)[0]
    for x1 in (x0, 3.0 * x0):
        out = slerp(x0, x1, 0.3)
        assert np.isfinite(np.asarray(out)).all()
        np.testing.assert_allclose(out, 0.7 * x0 + 0.3 * x1, rtol=1e-5, atol=1e-5)


def test_zero_input_is_finite():
    x0 = latent_pair(5)[0]
    out = slerp(jnp.zeros_like(x0), x0, 0.4)
    np.testing.assert_allclose(out, 0.4 * x0, rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    x0, x1 = latent_pair(6)
    with pytest.raises(ValueError, match=r"Shape mismatch: x1 has shape \(2, 4\)"):
        slerp(x0, x1[:, :, 0, 0], 0.5)
    with pytest.raises(ValueError, match=r"alpha must be a scalar or 1-D, got shape \(2, 2\)"):
        slerp(x0, x1, jnp.ones((2, 2)))


def test_gradient_is_finite_for_parallel_and_generic_inputs():
    x0, x1 = latent_pair(7)
    for b in (x1, x0, -x0):
        g = jax.grad(lambda x, b=b: jnp.sum(slerp(x, b, 0.3) ** 2))(x0)
        assert np.isfinite(np.asarray(g)).all()
