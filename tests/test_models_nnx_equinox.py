"""Sampling with guidance through a Flax NNX module and an Equinox module: parameters travel as
traced arguments, so new values reuse the compiled program and none is baked in as a constant."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddim_jax

DIM, COND, HIDDEN, BATCH = 16, 8, 64, 2
STATE = ddim_jax.set_timesteps(ddim_jax.create_state(ddim_jax.DDIMConfig(steps_offset=1)), 6)
_CONSTANT = re.compile(r"stablehlo\.constant dense<[^>]*> : tensor<((?:\d+x)*)[a-z]\w*>")


def largest_constant(lowered_text: str) -> int:
    """The element count of the largest array constant in a lowered (StableHLO) program."""
    sizes = [math.prod(int(d) for d in dims.split("x") if d) for dims in _CONSTANT.findall(lowered_text)]
    return max(sizes, default=0)


def inputs(seed: int = 0):
    k_x, k_c = jax.random.split(jax.random.key(seed))
    x_T = jax.random.normal(k_x, (BATCH, DIM))
    cond = jax.random.normal(k_c, (BATCH, COND))
    return x_T, jnp.concatenate([jnp.zeros_like(cond), cond])  # [unconditional; conditional]


def time_feature(t, x):
    return jnp.broadcast_to(jnp.asarray(t, x.dtype) / 1000, (*x.shape[:-1], 1))


def test_nnx_module_split_merge_params_traced():
    nnx = pytest.importorskip("flax.nnx")

    class Denoiser(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(DIM + COND + 1, HIDDEN, rngs=rngs)
            self.out = nnx.Linear(HIDDEN, DIM, rngs=rngs)

        def __call__(self, x, t, cond):
            return self.out(nnx.gelu(self.hidden(jnp.concatenate([x, cond, time_feature(t, x)], -1))))

    graphdef, params = nnx.split(Denoiser(nnx.Rngs(0)))
    traces = []

    def model_fn(x, t, params, cond):
        return nnx.merge(graphdef, params)(x, t, cond)

    @jax.jit
    def generate(params, state, x_T, cond, guidance_scale):
        traces.append(1)
        return ddim_jax.sample(
            model_fn,
            state,
            x_T,
            model_args=(params, cond),
            guidance_scale=guidance_scale,
            guidance_rescale=0.5,
        )

    x_T, cond = inputs()
    first = generate(params, STATE, x_T, cond, 3.0)
    _, other = nnx.split(Denoiser(nnx.Rngs(1)))
    second = generate(other, STATE, x_T, cond, 5.0)
    assert len(traces) == 1  # new parameter values and guidance scale: the same program
    assert np.isfinite(first).all() and not np.allclose(first, second)
    # the same merge run eagerly, step by step, gives the same sample
    model = nnx.merge(graphdef, params)
    eager = ddim_jax.sample(
        lambda x, t: model(x, t, cond), STATE, x_T, guidance_scale=3.0, guidance_rescale=0.5
    )
    np.testing.assert_allclose(first, eager, rtol=1e-5, atol=1e-6)

    smallest_param = min(p.size for p in jax.tree.leaves(params))  # the output bias: DIM values
    assert largest_constant(generate.lower(params, STATE, x_T, cond, 3.0).as_text()) < smallest_param
    # the check can fail: closing over the module bakes its parameters in
    closed = jax.jit(
        lambda x_T, cond: ddim_jax.sample(lambda x, t: model(x, t, cond), STATE, x_T, guidance_scale=3.0)
    )
    assert largest_constant(closed.lower(x_T, cond).as_text()) >= HIDDEN * DIM


def test_equinox_module_as_pytree_params_traced():
    eqx = pytest.importorskip("equinox")

    class Denoiser(eqx.Module):
        hidden: eqx.nn.Linear
        out: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.hidden = eqx.nn.Linear(DIM + COND + 1, HIDDEN, key=k1)
            self.out = eqx.nn.Linear(HIDDEN, DIM, key=k2)

        def __call__(self, x, t, cond):  # eqx.nn.Linear maps one vector: vmap over the batch
            h = jnp.concatenate([x, cond, time_feature(t, x)], -1)
            return jax.vmap(lambda v: self.out(jax.nn.gelu(self.hidden(v))))(h)

    traces = []

    def model_fn(x, t, model, cond):
        return model(x, t, cond)

    @eqx.filter_jit  # arrays (the weights, inputs, guidance scale) are traced, the rest static
    def generate(model, state, x_T, cond, guidance_scale):
        traces.append(1)
        return ddim_jax.sample(model_fn, state, x_T, model_args=(model, cond), guidance_scale=guidance_scale)

    x_T, cond = inputs()
    model, other = Denoiser(jax.random.key(0)), Denoiser(jax.random.key(1))
    first = generate(model, STATE, x_T, cond, jnp.float32(3.0))  # a Python float would be static here
    second = generate(other, STATE, x_T, cond, jnp.float32(5.0))
    assert len(traces) == 1
    assert np.isfinite(first).all() and not np.allclose(first, second)
    eager = ddim_jax.sample(lambda x, t: model(x, t, cond), STATE, x_T, guidance_scale=3.0)
    np.testing.assert_allclose(first, eager, rtol=1e-5, atol=1e-6)

    params = eqx.filter(model, eqx.is_array)
    smallest_param = min(p.size for p in jax.tree.leaves(params))
    assert (
        largest_constant(generate.lower(model, STATE, x_T, cond, jnp.float32(3.0)).as_text()) < smallest_param
    )
    closed = jax.jit(
        lambda x_T, cond: ddim_jax.sample(lambda x, t: model(x, t, cond), STATE, x_T, guidance_scale=3.0)
    )
    assert largest_constant(closed.lower(x_T, cond).as_text()) >= HIDDEN * DIM
