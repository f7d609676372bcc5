"""Exact inversion (EDICT, BDIA): round trips at float32 round-off against DDIM inversion's drift,
a float64 reference of the papers' equations on diffusers' alphas, reduction to DDIM, guidance,
no recompilation, sharding, bad inputs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _gaussian import MU, SIGMA, exact_encoding, gaussian_model
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddim_jax import (
    BDIALatents,
    DDIMConfig,
    EDICTLatents,
    bdia_invert,
    bdia_sample,
    create_state,
    edict_invert,
    edict_sample,
    invert,
    sample,
    set_timesteps,
)


def make_state(steps, **config):
    return set_timesteps(create_state(DDIMConfig(clip_sample=False, **config)), steps)


def max_rel_err(ours, ref):
    """Largest elementwise error relative to the largest |ref|."""
    return float(jnp.max(jnp.abs(ours - ref)) / jnp.max(jnp.abs(ref)))


@functools.cache
def round_trips(steps, config_items):
    """Max relative round-trip errors (DDIM, EDICT, BDIA) on the Gaussian denoiser, jitted."""
    state = make_state(steps, **dict(config_items))
    model = gaussian_model(state)
    x0 = MU + SIGMA * jax.random.normal(jax.random.key(0), (4, 64))
    ddim = jax.jit(lambda x: sample(model, state, invert(model, state, x)))(x0)
    edict = jax.jit(lambda x: edict_sample(model, state, edict_invert(model, state, x)))(x0)
    bdia = jax.jit(lambda x: bdia_sample(model, state, bdia_invert(model, state, x)))(x0)
    return max_rel_err(ddim, x0), max_rel_err(edict, x0), max_rel_err(bdia, x0)


ZERO_SNR_V = (
    ("prediction_type", "v_prediction"),
    ("rescale_betas_zero_snr", True),
    ("timestep_spacing", "trailing"),
)


# Measured max relative errors (jax 0.10.2 CPU):
#   default config:   DDIM 0.27 / 0.062, EDICT 1.1e-4 / 3.2e-6, BDIA 2.3e-7 / 3.6e-7 at S = 10 / 50;
#   zero-SNR v-pred:  DDIM 0.34 / 0.082, EDICT 4.6e-7 / 2.1e-6, BDIA 3.0e-7 / 5.4e-7.
# EDICT's error is float32 round-off amplified by the coupled map (float64: 2e-13), largest where
# the epsilon model's DDIM factor sqrt(a_prev / a_t) is large (few steps from t near T).
@pytest.mark.parametrize(
    ("steps", "config", "edict_bound"),
    [(10, (), 3e-4), (50, (), 1e-5), (10, ZERO_SNR_V, 1e-5), (50, ZERO_SNR_V, 1e-5)],
)
def test_round_trip_is_exact_where_ddim_inversion_drifts(steps, config, edict_bound):
    ddim, edict, bdia = round_trips(steps, config)
    assert ddim > 0.05, ddim  # DDIM inversion's first-order drift
    assert bdia < 2e-6, bdia
    assert edict < edict_bound, edict


def test_round_trip_with_demo_unet():
    """A denoiser-like nonlinear convolutional model: the Gaussian denoiser plus 0.1 x a random-weight
    digits UNet. (A random UNet alone is no denoiser: DDIM's round trip diverges on it.)"""
    from ddim_jax.demo.unet import UNet

    unet = UNet(channels=(4,), zero_init=False)
    params = unet.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.int32(0))
    x0 = MU + SIGMA * jax.random.normal(jax.random.key(1), (4, 8, 8, 1))

    def round_trips(x, params, state):
        gaussian = gaussian_model(state)
        model = lambda x, t, params: gaussian(x, t) + 0.1 * unet.apply(params, x, t)  # noqa: E731
        kw = {"model_args": (params,)}
        edict = edict_sample(model, state, edict_invert(model, state, x, **kw), **kw)
        return edict, bdia_sample(model, state, bdia_invert(model, state, x, **kw), **kw)

    # Measured: EDICT 1.2e-4 / 5.3e-6, BDIA 3.5e-7 / 4.5e-7 (DDIM inversion 0.32 / 0.075) at S = 10 / 50.
    # Exactness needs full-precision convolutions: the default on a CPU; a GPU's default (TF32)
    # gave EDICT 7.2e-4 at S = 10 on an H200 (docs/inversion.md). Traced inside the context:
    with jax.default_matmul_precision("highest"):
        for steps, edict_bound in ((10, 5e-4), (50, 2e-5)):
            edict, bdia = jax.jit(round_trips)(x0, params, make_state(steps))  # the state traced
            assert max_rel_err(edict, x0) < edict_bound and max_rel_err(bdia, x0) < 5e-6, steps


def order(errors, steps):
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])


def test_samplers_solve_the_ode():
    """From the exact x_T all three samplers converge to x0 as S grows (they are ODE solvers, not
    only invertible maps). BDIA beats DDIM at every S; EDICT needs many steps: its second model
    call sees x_inter, already at t_prev, with timestep t, which is far off for large steps."""
    x0 = MU + SIGMA * jax.random.normal(jax.random.key(0), (4, 64))
    rms = lambda a: float(jnp.sqrt(jnp.mean((a - x0) ** 2)))  # noqa: E731
    steps = (10, 40, 160)
    errors = {"ddim": [], "edict": [], "bdia": []}
    for s in steps:
        state = make_state(s, timestep_spacing="trailing", prev_timestep_rule="schedule")
        model, x_T = gaussian_model(state), exact_encoding(state, x0, 0)
        errors["ddim"].append(rms(sample(model, state, x_T)))
        errors["edict"].append(rms(edict_sample(model, state, x_T)))
        errors["bdia"].append(rms(bdia_sample(model, state, x_T)))
    # Measured rms: DDIM 0.117 / 0.033 / 0.0085, BDIA 0.046 / 0.0046 / 0.00077 (float64 alike),
    # EDICT 12.9 / 0.10 / 0.0057 at S = 10 / 40 / 160.
    assert order(errors["ddim"], steps) > 0.8, errors
    assert order(errors["bdia"], steps) > 1.3 and all(np.less(errors["bdia"], errors["ddim"])), errors
    assert errors["edict"][-1] < errors["ddim"][-1] and errors["edict"][1] > 8 * errors["edict"][2], errors


@pytest.mark.parametrize("config", [{}, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}])
@pytest.mark.parametrize("start_step", [0, 3])
def test_bdia_with_gamma_zero_is_ddim(config, start_step):
    state = make_state(8, **config)
    x = jax.random.normal(jax.random.key(2), (2, 3, 4))
    model = lambda x, t: jnp.tanh(0.7 * x) + 1e-3 * t  # noqa: E731
    ref = sample(model, state, x, start_step=start_step)
    np.testing.assert_allclose(
        bdia_sample(model, state, x, gamma=0.0, start_step=start_step), ref, rtol=1e-6, atol=1e-6
    )
    # BDIA inversion's first step is DDIM inversion's.
    last = state.num_inference_steps - 1
    one = bdia_invert(model, state, x, start_step=last)
    np.testing.assert_allclose(one.x, invert(model, state, x, start_step=last), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(one.x_next, x)


def test_partial_inversion_and_trajectories():
    state, k = make_state(12), 5
    model = gaussian_model(state)
    x0 = MU + SIGMA * jax.random.normal(jax.random.key(3), (2, 16))
    for invert_fn, sample_fn, pair in (
        (edict_invert, edict_sample, EDICTLatents),
        (bdia_invert, bdia_sample, BDIALatents),
    ):
        latents, traj = invert_fn(model, state, x0, start_step=k, return_trajectory=True)
        assert isinstance(latents, pair)
        assert traj.prev_sample.shape == traj.pred_original_sample.shape == (12 - k, *x0.shape)
        out, traj = sample_fn(model, state, latents, start_step=k, return_trajectory=True)
        assert max_rel_err(out, x0) < 1e-5, invert_fn.__name__
        np.testing.assert_array_equal(traj.prev_sample[-1], out)
    # The partial inversion's latent is on the way to the full one's (both from the same x0).
    _, full = edict_invert(model, state, x0, return_trajectory=True)
    np.testing.assert_allclose(
        edict_invert(model, state, x0, start_step=k).x, full.prev_sample[12 - k - 1], rtol=1e-6
    )


# Float64 reference of the papers' update equations, on diffusers' own DDIMScheduler tables.
def diffusers_alphas(steps):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(steps)
    ac = scheduler.alphas_cumprod.double().numpy()
    final = float(scheduler.final_alpha_cumprod)
    alpha = lambda t: ac[t] if t >= 0 else final  # noqa: E731
    return scheduler.timesteps.tolist(), alpha, scheduler.config.num_train_timesteps // steps


def ddim_to(alpha, t, s, x, eps):
    """Deterministic DDIM from x at t to level s with noise prediction eps (DDIM eq. 12, eta = 0)."""
    x0 = (x - np.sqrt(1 - alpha(t)) * eps) / np.sqrt(alpha(t))
    return np.sqrt(alpha(s)) * x0 + np.sqrt(1 - alpha(s)) * eps


def test_edict_and_bdia_match_float64_reference_on_diffusers_alphas():
    pytest.importorskip("diffusers")
    steps, p, gamma = 6, 0.93, 0.8
    timesteps, alpha, ratio = diffusers_alphas(steps)
    eps_model = lambda x, t: np.tanh(0.8 * x) + 1e-3 * t  # noqa: E731
    x_T = np.asarray(jax.random.normal(jax.random.key(4), (2, 8)), np.float64)

    x, y = x_T.copy(), x_T.copy()  # EDICT (Wallace et al. 2022, Sec. 4)
    for t in timesteps:
        x_inter = ddim_to(alpha, t, t - ratio, x, eps_model(y, t))
        y_inter = ddim_to(alpha, t, t - ratio, y, eps_model(x_inter, t))
        x = p * x_inter + (1 - p) * y_inter
        y = p * y_inter + (1 - p) * x
    edict_ref = x

    z_far, z = None, x_T.copy()  # BDIA-DDIM (Zhang et al. 2023), first step DDIM
    for i, t in enumerate(timesteps):
        eps = eps_model(z, t)
        forward = ddim_to(alpha, t, t - ratio, z, eps) - z  # Delta(t_i -> t_{i-1} | z_i)
        if z_far is None:
            z_far, z = z, z + forward
            continue
        backward = ddim_to(alpha, t, timesteps[i - 1], z, eps) - z  # Delta(t_i -> t_{i+1} | z_i)
        z_far, z = z, z_far - (1 - gamma) * (z_far - z) - gamma * backward + forward
    bdia_ref = z

    state = make_state(steps)
    model = lambda x, t: jnp.tanh(0.8 * x) + 1e-3 * t  # noqa: E731
    x_T32 = jnp.asarray(x_T, jnp.float32)
    assert max_rel_err(edict_sample(model, state, x_T32, mixing=p), edict_ref) < 2e-5
    assert max_rel_err(bdia_sample(model, state, x_T32, gamma=gamma), bdia_ref) < 2e-6


def cond_model(x, t, w, emb):
    return jnp.tanh(w * x + 0.3 * emb[:, :, None]) + 1e-3 * t.astype(x.dtype)


def test_guided_round_trip_and_no_recompile():
    state = make_state(10)
    traces = []

    @jax.jit
    def round_trip(x, w, emb, scale, gamma, mixing):
        traces.append(1)
        kw = {"model_args": (w, emb), "guidance_scale": scale}
        z = bdia_sample(
            cond_model, state, bdia_invert(cond_model, state, x, gamma=gamma, **kw), gamma=gamma, **kw
        )
        e = edict_sample(
            cond_model, state, edict_invert(cond_model, state, x, mixing=mixing, **kw), mixing=mixing, **kw
        )
        return z, e

    for i in range(3):
        k1, k2 = jax.random.split(jax.random.key(10 + i))
        x = jax.random.normal(k1, (2, 3, 5))
        emb = jnp.concatenate([jnp.zeros((2, 3)), jax.random.normal(k2, (2, 3))])  # [uncond, cond]
        z, e = round_trip(x, 0.5 + 0.2 * i, emb, 2.0 + i, 1.0 - 0.02 * i, 0.93 - 0.05 * i)
        # Measured: BDIA 1.7e-7 / 2.6e-5 / 3.1e-6, EDICT 1.8e-6 / 2.7e-5 / 8.7e-6 for i = 0 / 1 / 2:
        # guidance makes this stand-in model stiff (slope w * scale up to 3.6 in x), which amplifies
        # round-off (unguided: 1e-7).
        assert max_rel_err(z, x) < 1e-4 and max_rel_err(e, x) < 1e-4, (
            i,
            max_rel_err(z, x),
            max_rel_err(e, x),
        )
    assert len(traces) == 1 and round_trip._cache_size() == 1

    # Guidance reaches the model as in `sample`: BDIA at gamma = 0 is guided DDIM.
    kw = {"model_args": (0.5, emb), "guidance_scale": 3.0}
    np.testing.assert_allclose(
        bdia_sample(cond_model, state, x, gamma=0.0, **kw),
        sample(cond_model, state, x, **kw),
        rtol=1e-6,
        atol=1e-6,
    )


def test_callback_runs_per_step():
    state, calls = make_state(4), []
    cb = lambda i, t, x0: calls.append((int(i), int(t)))  # noqa: E731
    latents = edict_invert(lambda x, t: 0.5 * x, state, jnp.ones((1, 2)), callback=cb)
    bdia_sample(lambda x, t: 0.5 * x, state, latents.x, callback=cb, callback_every=3)
    jax.effects_barrier()
    ascending = np.asarray(state.timesteps)[::-1].tolist()
    expected = [(i, t) for i, t in enumerate(ascending)] + [(0, ascending[-1]), (3, ascending[0])]
    assert sorted(calls) == sorted(expected)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest.py forces 8 CPU)")
@pytest.mark.parametrize("method", ["edict", "bdia"])
def test_batch_sharded_is_collective_free_and_exact(method):
    """jit over a batch sharded on 8 devices: no collectives in either loop, same numbers as 1 device."""
    state = make_state(4)
    invert_fn, sample_fn = {"edict": (edict_invert, edict_sample), "bdia": (bdia_invert, bdia_sample)}[method]

    @jax.jit
    def f(x, w, emb):
        emb2 = jnp.stack([jnp.zeros_like(emb), emb], axis=1).reshape(2 * emb.shape[0], -1)
        kw = {"model_args": (w, emb2), "guidance_scale": 2.0, "guidance_layout": "interleave"}
        latents = invert_fn(cond_model, state, x, **kw)
        return latents, sample_fn(cond_model, state, latents, **kw)

    k1, k2 = jax.random.split(jax.random.key(5))
    x, emb, w = jax.random.normal(k1, (16, 4, 6)), jax.random.normal(k2, (16, 4)), jnp.float32(0.7)
    ref = f(x, w, emb)
    mesh = jax.make_mesh((8,), ("data",))
    batch, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    args = jax.device_put((x, w, emb), (batch, rep, batch))
    compiled = f.lower(*args).compile()
    text = compiled.as_text()
    assert not any(c in text for c in ("all-reduce", "all-gather", "collective-permute", "all-to-all")), (
        method
    )
    out = compiled(*args)
    assert out[1].sharding.is_equivalent_to(args[0].sharding, 3)
    # Not bitwise: XLA compiles the per-device shapes differently, and EDICT amplifies that
    # round-off (measured max relative difference: EDICT 2.8e-6, BDIA 0).
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        assert max_rel_err(a, b) < 1e-5, method


def test_bad_inputs():
    state = make_state(4)
    x = jnp.ones((2, 3))
    model = lambda x, t: x  # noqa: E731
    clipped = set_timesteps(create_state(DDIMConfig(clip_sample=True)), 4)
    with pytest.raises(
        ValueError, match="edict_invert needs a config with clip_sample=False and thresholding=False"
    ):
        edict_invert(model, clipped, x)
    thresholded = set_timesteps(create_state(DDIMConfig(clip_sample=False, thresholding=True)), 4)
    with pytest.raises(ValueError, match="bdia_sample needs a config with clip_sample=False"):
        bdia_sample(model, thresholded, x)
    with pytest.raises(ValueError, match=r"gamma must be in \(0, 1\], got 0.0"):
        bdia_invert(model, state, x, gamma=0.0)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\], got 1.5"):
        bdia_sample(model, state, x, gamma=1.5)
    with pytest.raises(ValueError, match=r"mixing must be in \(0, 1\], got 0.0"):
        edict_sample(model, state, x, mixing=0.0)
    with pytest.raises(ValueError, match=r"mixing must be a scalar, got shape \(2,\)"):
        edict_invert(model, state, x, mixing=jnp.ones(2))
    with pytest.raises(
        ValueError, match=r"Shape mismatch: latents.y has shape \(2, 4\), expected latents.x's \(2, 3\)"
    ):
        edict_sample(model, state, EDICTLatents(x, jnp.ones((2, 4))))
    with pytest.raises(
        ValueError, match=r"latents must be one array or a pair \('x', 'x_next'\), got a sequence of 3"
    ):
        bdia_sample(model, state, (x, x, x))
    with pytest.raises(ValueError, match="bdia_invert needs timesteps"):
        bdia_invert(model, create_state(DDIMConfig(clip_sample=False)), x)
    with pytest.raises(ValueError, match=r"start_step must be an int in \[0, num_inference_steps=4\)"):
        edict_sample(model, state, x, start_step=4)
    with pytest.raises(TypeError, match="latents must be a float array"):
        bdia_sample(model, state, jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"model_fn output has shape \(3,\)"):
        edict_invert(lambda x, t: jnp.zeros(3), state, x)


@pytest.mark.parametrize("parts", ["inversion", "ddim,inversion"])
def test_demo_inversion_part_rejects_clip_sample(parts, capsys, monkeypatch):
    """``ddim-jax demo --parts inversion`` refuses --clip-sample before training anything."""
    pytest.importorskip("flax")
    from ddim_jax.demo import cli

    def fail(*args, **kwargs):
        raise AssertionError("trained before refusing --clip-sample")

    monkeypatch.setattr("ddim_jax.demo.train.load_or_train", fail)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--parts", parts, "--clip-sample", "--no-cache", "--quiet"])
    assert exit_info.value.code == 2
    assert "--clip-sample cannot be used with --parts inversion" in capsys.readouterr().err
