"""Every loop under ``jax_enable_x64`` equals the default mode (issue 29: `parallel_sample` failed
there on every call, its while loop's step counter turning int64). The tables are float32 either
way and float32 latents keep a float32 carry, so the results are bitwise the same."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddim_jax as dj

CONFIG = dj.DDIMConfig(clip_sample=False)
X = jnp.linspace(-1.0, 1.0, 2 * 3).reshape(2, 3)
LABELS = jnp.array([[0.0], [0.0], [1.0], [2.0]])  # the doubled batch's conditioning, [uncond, cond]


def model(x, t, labels):
    return jnp.tanh(0.7 * x + labels) + 1e-4 * t.astype(x.dtype)


def guided(**kwargs):
    return {"model_args": (LABELS,), **kwargs}


LOOPS = {
    "sample": lambda s, x: dj.sample(
        model, s, x, eta=0.5, key=jax.random.key(3), **guided(guidance_scale=3.0)
    ),
    "sample_window": lambda s, x: dj.sample(
        model,
        s,
        x,
        **guided(guider=dj.guidance_window(dj.apg(2.0, momentum=-0.5), 0.25, 0.75, conditional_args=(0,))),
    ),
    "invert": lambda s, x: dj.invert(model, s, x, **guided(guider=dj.cfg_pp(0.5))),
    "parallel_sample": lambda s, x: dj.parallel_sample(
        model, s, x, window=3, tolerance=0.0, eta=0.3, key=jax.random.key(1), **guided(guidance_scale=2.0)
    ),
    "edict_sample": lambda s, x: dj.edict_sample(model, s, x, **guided(guidance_scale=2.0)),
    "edict_invert": lambda s, x: dj.edict_invert(model, s, x, **guided(guidance_scale=2.0)),
    "bdia_sample": lambda s, x: dj.bdia_sample(
        model, s, x, gamma=0.5, **guided(guider=dj.cfg_zero_star(2.0))
    ),
    "bdia_invert": lambda s, x: dj.bdia_invert(model, s, x, gamma=0.5, **guided(guidance_scale=2.0)),
}


def run(name: str, runtime: bool):
    base = dj.create_state(CONFIG)
    state = dj.set_timesteps(base, 4, max_steps=6) if runtime else dj.set_timesteps(base, 4)
    return jax.tree.map(np.asarray, LOOPS[name](state, X))


# The runtime-length loop for one loop of each driver (the scan drivers share `padded_steps`).
CASES = [(name, False) for name in sorted(LOOPS)] + [
    (name, True) for name in ("sample", "parallel_sample", "edict_invert")
]


@pytest.mark.parametrize(
    ("name", "runtime"), CASES, ids=[f"{n}-{'runtime' if r else 'static'}" for n, r in CASES]
)
def test_each_loop_under_x64_equals_the_default_mode(name, runtime):
    expected = run(name, runtime)
    with jax.enable_x64(True):
        got = run(name, runtime)
    assert jnp.ones(1).dtype == jnp.float32  # x64 did not leak out
    assert np.isfinite(jax.tree.leaves(expected)[0]).all()  # the sample (residuals past S are NaN)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert a.dtype == b.dtype, (a.dtype, b.dtype)
        np.testing.assert_array_equal(a, b)
