"""`slerp`: spherical interpolation between two latents (DDIM paper, Sec. 5.3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddim_jax._checks import check_same_shape, compute_dtype

__all__ = ["slerp"]


def slerp(x0: jax.Array, x1: jax.Array, alpha: float | jax.Array) -> jax.Array:
    """Spherical linear interpolation ``sin((1-a) theta)/sin(theta) x0 + sin(a theta)/sin(theta) x1``.

    ``theta = arccos(<x0, x1> / (|x0| |x1|))`` over all elements. Falls back to linear
    interpolation when the latents are (nearly) parallel or anti-parallel, or one is zero.

    Args:
      x0: a latent.
      x1: a latent of ``x0``'s shape.
      alpha: a scalar, or a 1-D array of n weights giving n interpolants.

    Returns:
      An array of ``x0``'s shape, or ``(n, *x0.shape)`` for a 1-D ``alpha``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ddim_jax import slerp
      >>> a, b = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
      >>> [round(v, 4) for v in slerp(a, b, 0.5).tolist()]
      [0.7071, 0.7071]
      >>> slerp(a, b, jnp.linspace(0, 1, 5)).shape
      (5, 2)
    """
    check_same_shape("x1", x1, "x0", x0)
    if jnp.ndim(alpha) > 1:
        raise ValueError(f"alpha must be a scalar or 1-D, got shape {jnp.shape(alpha)}")
    dtype = compute_dtype(x0, x1)
    x0, x1 = jnp.asarray(x0, dtype), jnp.asarray(x1, dtype)
    a = jnp.asarray(alpha, dtype).reshape(jnp.shape(alpha) + (1,) * x0.ndim)
    norms = jnp.linalg.norm(x0) * jnp.linalg.norm(x1)
    cos = jnp.clip(jnp.vdot(x0, x1) / jnp.where(norms > 0, norms, 1.0), -1.0, 1.0)
    # (Nearly) parallel, anti-parallel or zero latents: the angle is undefined or sin(theta) ~ 0.
    # The masked arccos keeps values and gradients finite there.
    parallel = (norms == 0) | (1 - jnp.abs(cos) < 1e-7)
    theta = jnp.arccos(jnp.where(parallel, 0.0, cos))
    sin_theta = jnp.where(parallel, 1.0, jnp.sin(theta))
    w0 = jnp.where(parallel, 1 - a, jnp.sin((1 - a) * theta) / sin_theta)
    w1 = jnp.where(parallel, a, jnp.sin(a * theta) / sin_theta)
    return w0 * x0 + w1 * x1
