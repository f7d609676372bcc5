"""Guiders: diffusers parity step by step (live), CFG++ against a float64 reference, the window
against a hand-switched loop, per-example scales in every loop, no recompilation, bad input."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddim_jax as dj

BATCH, S = 3, 8
CONFIG = dj.DDIMConfig(clip_sample=False, prediction_type="v_prediction", timestep_spacing="trailing")
STATE = dj.set_timesteps(dj.create_state(CONFIG), S)
X_T = jax.random.normal(jax.random.key(0), (BATCH, 2, 3, 3))
LABELS = jnp.concatenate([jnp.zeros(BATCH), jnp.arange(1.0, BATCH + 1)])  # [uncond, cond]


def model(x, t, w, labels):
    """A nonlinear stand-in whose conditional and unconditional outputs differ per example."""
    shift = 0.3 * jnp.sin(labels).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.tanh(w * x + shift) + 0.2 * shift * x + 1e-4 * t


ARGS = (0.8, LABELS)


def guided_loop(apply, x, state=STATE, config=CONFIG):
    """A Python loop: the doubled model call, ``apply(i, t, uncond, cond)`` (None: conditional
    half alone), and ddim_jax's `step`."""
    for i, t in enumerate(np.asarray(state.timesteps)):
        out = np.array(model(jnp.concatenate([x, x]), jnp.int32(t), *ARGS))
        uncond, cond = out[:BATCH], out[BATCH:]
        x = dj.step(state, jnp.asarray(apply(i, int(t), uncond, cond)), int(t), x).prev_sample
    return x


# --- live parity with diffusers' guiders -------------------------------------------------------


def diffusers_guiders():
    pytest.importorskip("torch")
    return pytest.importorskip("diffusers.guiders")


def run_diffusers(guider, x, *, momentum=None):
    """Our loop's outputs through a diffusers guider: set_state each step, forward(cond, uncond);
    outside its window only the conditional output is passed (diffusers then runs one batch)."""
    import torch
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

    def apply(i, t, uncond, cond):
        guider.set_state(step=i, num_inference_steps=S, timestep=torch.tensor(t))
        if i == 0 and momentum is not None:  # what APG's prepare_inputs does at step 0
            guider.momentum_buffer = MomentumBuffer(momentum)
        enabled = guider.num_conditions == 2
        pred, _ = guider.forward(torch.from_numpy(cond), torch.from_numpy(uncond) if enabled else None)
        return pred.numpy()

    return guided_loop(apply, x)


PARITY = {
    "cfg": (lambda g: g.ClassifierFreeGuidance(5.0, 0.7), dj.cfg(5.0, 0.7), None),
    "cfg_window": (
        lambda g: g.ClassifierFreeGuidance(5.0, start=0.25, stop=0.75),
        dj.guidance_window(dj.cfg(5.0), 0.25, 0.75, conditional_args=(1,)),
        None,
    ),
    "cfg_zero_star": (
        lambda g: g.ClassifierFreeZeroStarGuidance(5.0, zero_init_steps=2),
        dj.cfg_zero_star(5.0, zero_init_steps=2),
        None,
    ),
    # (diffusers' rescale of a zero-init step's zeros is 0 / 0 = NaN; ddim_jax keeps the zeros)
    "cfg_zero_star_rescale": (
        lambda g: g.ClassifierFreeZeroStarGuidance(5.0, zero_init_steps=0, guidance_rescale=0.5),
        dj.cfg_zero_star(5.0, zero_init_steps=0, guidance_rescale=0.5),
        None,
    ),
    "apg": (
        lambda g: g.AdaptiveProjectedGuidance(5.0, adaptive_projected_guidance_rescale=2.0, eta=0.3),
        dj.apg(5.0, norm_threshold=2.0, eta=0.3),
        None,
    ),
    "apg_momentum": (
        lambda g: g.AdaptiveProjectedGuidance(5.0, -0.5, adaptive_projected_guidance_rescale=2.0, eta=0.0),
        dj.apg(5.0, momentum=-0.5, norm_threshold=2.0, eta=0.0),
        -0.5,
    ),
    "apg_momentum_window": (
        lambda g: g.AdaptiveProjectedGuidance(4.0, 0.5, 0.0, start=0.25, stop=0.75),
        dj.guidance_window(dj.apg(4.0, momentum=0.5, norm_threshold=0.0), 0.25, 0.75),
        0.5,
    ),
    "tangential_cfg": (
        lambda g: g.TangentialClassifierFreeGuidance(5.0, 0.3),
        dj.tangential_cfg(5.0, 0.3),
        None,
    ),
}


@pytest.mark.parametrize("name", list(PARITY))
def test_each_guider_matches_diffusers_step_by_step(name):
    guiders = diffusers_guiders()
    make_theirs, ours, momentum = PARITY[name]
    expected = run_diffusers(make_theirs(guiders), X_T, momentum=momentum)
    got = dj.sample(model, STATE, X_T, model_args=ARGS, guider=ours)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
    conditional = dj.sample(model, STATE, X_T, model_args=ARGS, guider=dj.cfg(1.0))
    assert float(jnp.abs(got - conditional).max()) > 1e-2  # guidance did something


# --- the window against a hand-switched loop, and its halved model calls --------------------------


def test_window_equals_a_hand_switched_loop_and_halves_the_calls_outside():
    calls = []

    def counting(x, t, w, labels):
        jax.debug.callback(lambda n: calls.append(int(n)), jnp.int32(x.shape[0]))
        return model(x, t, w, labels)

    first, last = int(0.25 * S), int(0.75 * S)

    def hand(i, t, uncond, cond):
        return uncond + 5.0 * (cond - uncond) if first <= i < last else cond

    guider = dj.guidance_window(dj.cfg(5.0), 0.25, 0.75, conditional_args=(1,))
    got = jax.jit(lambda x: dj.sample(counting, STATE, x, model_args=ARGS, guider=guider))(X_T)
    np.testing.assert_allclose(got, guided_loop(hand, X_T), rtol=1e-5, atol=1e-5)
    assert calls == [BATCH] * first + [2 * BATCH] * (last - first) + [BATCH] * (S - last)


def test_window_under_interleave_layout_and_invert():
    interleaved = jnp.stack([LABELS[:BATCH], LABELS[BATCH:]], 1).reshape(-1)
    guider = dj.guidance_window(dj.cfg(4.0), 0.5, 1.0, conditional_args=(1,))
    concat = dj.sample(model, STATE, X_T, model_args=ARGS, guider=guider)
    inter = dj.sample(
        model, STATE, X_T, model_args=(0.8, interleaved), guider=guider, guidance_layout="interleave"
    )
    np.testing.assert_allclose(concat, inter, rtol=1e-6, atol=1e-6)
    unsaved = dj.guidance_window(dj.cfg(4.0), 0.5, 1.0)  # no conditional_args: doubled calls
    np.testing.assert_allclose(
        dj.sample(model, STATE, X_T, model_args=ARGS, guider=unsaved), concat, atol=1e-6
    )


# --- CFG++ against a float64 reference -------------------------------------------------------------


def reference_cfg_pp(prediction_type, lam, x, inverse):
    """The paper's update in float64 NumPy: x0 from the guided output, epsilon from the
    unconditional one (inversion: the reverse roles), via the prediction type's conversions."""
    state = dj.set_timesteps(
        dj.create_state(dj.DDIMConfig(clip_sample=False, prediction_type=prediction_type)), S
    )
    alphas = np.cumprod(1 - np.asarray(dj.betas_for_config(state.config), np.float64))
    timesteps = np.asarray(state.timesteps)
    step = state.config.num_train_timesteps // S
    x = np.asarray(x, np.float64)

    def convert(m, x, a):
        if prediction_type == "epsilon":
            return (x - np.sqrt(1 - a) * m) / np.sqrt(a), m
        return np.sqrt(a) * x - np.sqrt(1 - a) * m, np.sqrt(a) * m + np.sqrt(1 - a) * x  # v

    for t in timesteps[::-1] if inverse else timesteps:
        other = t - step
        a_other = alphas[other] if other >= 0 else 1.0  # set_alpha_to_one
        a_from, a_to = (a_other, alphas[t]) if inverse else (alphas[t], a_other)
        out = np.asarray(
            model(jnp.asarray(np.concatenate([x, x]), jnp.float32), jnp.int32(t), *ARGS), np.float64
        )
        uncond, cond = out[:BATCH], out[BATCH:]
        guided = uncond + lam * (cond - uncond)
        denoise, renoise = (uncond, guided) if inverse else (guided, uncond)
        x0, _ = convert(denoise, x, a_from)
        _, eps = convert(renoise, x, a_from)
        x = np.sqrt(a_to) * x0 + np.sqrt(1 - a_to) * eps
    return x, state


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("inverse", [False, True])
def test_cfg_pp_matches_a_float64_reference(prediction_type, inverse):
    expected, state = reference_cfg_pp(prediction_type, 0.6, X_T, inverse)
    loop = dj.invert if inverse else dj.sample
    got = loop(model, state, X_T, model_args=ARGS, guider=dj.cfg_pp(0.6))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_cfg_pp_at_lambda_zero_is_the_unconditional_model_and_bdia_inverts_it_exactly():
    uncond = dj.sample(
        model, STATE, X_T, model_args=ARGS, guider=dj.Guider(lambda x: (), lambda s, u, c, i: (u, s))
    )
    np.testing.assert_allclose(
        dj.sample(model, STATE, X_T, model_args=ARGS, guider=dj.cfg_pp(0.0)), uncond, atol=1e-6
    )
    latents = dj.bdia_invert(model, STATE, X_T, model_args=ARGS, guider=dj.cfg_pp(0.6))
    back = dj.bdia_sample(model, STATE, latents, model_args=ARGS, guider=dj.cfg_pp(0.6))
    np.testing.assert_allclose(back, X_T, atol=1e-5)


# --- per-example scales (issue 20 item 2) --------------------------------------------------------

W = jnp.array([1.5, 4.0, 7.0])
PHI = jnp.array([0.0, 0.5, 0.9])


def one_example(b):
    return X_T[b : b + 1], (0.8, LABELS[jnp.array([b, BATCH + b])])


def assert_per_example(run):
    """``run(x, args, w, phi)`` with (batch,) scales equals each example run alone with its own."""
    run = jax.jit(run)  # the runs of one example each share a program
    together = run(X_T, ARGS, W, PHI)
    together = together.x if isinstance(together, dj.EDICTLatents) else together
    together = together.x if isinstance(together, dj.BDIALatents) else together
    for b in range(BATCH):
        x, args = one_example(b)
        alone = run(x, args, float(W[b]), float(PHI[b]))
        alone = getattr(alone, "x", alone)
        np.testing.assert_allclose(together[b : b + 1], alone, rtol=2e-5, atol=2e-5)


LOOPS = {
    "sample": lambda x, a, w, p: dj.sample(
        model, STATE, x, model_args=a, guidance_scale=w, guidance_rescale=p
    ),
    "sample_runtime": lambda x, a, w, p: dj.sample(
        model,
        dj.set_timesteps(dj.create_state(CONFIG), S, max_steps=12),
        x,
        model_args=a,
        guidance_scale=w,
        guidance_rescale=p,
    ),
    "invert": lambda x, a, w, p: dj.invert(
        model, STATE, x, model_args=a, guidance_scale=w, guidance_rescale=p
    ),
    "parallel_sample": lambda x, a, w, p: (
        dj.parallel_sample(
            model, STATE, x, model_args=a, guidance_scale=w, guidance_rescale=p, tolerance=0.0, window=4
        ).sample
    ),
    "edict_invert": lambda x, a, w, p: dj.edict_invert(
        model, STATE, x, model_args=a, guidance_scale=w, guidance_rescale=p
    ),
    "bdia_sample": lambda x, a, w, p: dj.bdia_sample(
        model, STATE, x, model_args=a, guidance_scale=w, guidance_rescale=p
    ),
    "apg_guider": lambda x, a, w, p: dj.sample(
        model, STATE, x, model_args=a, guider=dj.apg(w, momentum=-0.5)
    ),
    "cfg_pp_guider": lambda x, a, w, p: dj.invert(model, STATE, x, model_args=a, guider=dj.cfg_pp(w / 8)),
}


@pytest.mark.parametrize("loop", list(LOOPS))
def test_per_example_scales_equal_separate_runs(loop):
    assert_per_example(LOOPS[loop])


def test_per_example_scales_in_the_functions_and_wrong_shapes_name_the_parameter():
    uncond, cond = jax.random.normal(jax.random.key(1), (2, BATCH, 4))
    together = dj.classifier_free_guidance(uncond, cond, W, PHI)
    for b in range(BATCH):
        alone = dj.classifier_free_guidance(uncond[b : b + 1], cond[b : b + 1], float(W[b]), float(PHI[b]))
        np.testing.assert_allclose(together[b : b + 1], alone, rtol=1e-6)
    np.testing.assert_allclose(
        dj.rescale_noise_cfg(cond, uncond, PHI)[1], dj.rescale_noise_cfg(cond, uncond, 0.5)[1]
    )
    with pytest.raises(ValueError, match=r"guidance_scale must be a scalar or hold one value per example"):
        dj.classifier_free_guidance(uncond, cond, jnp.ones(4))
    with pytest.raises(
        ValueError, match=r"guidance_rescale .* shape \(batch,\) = \(3,\), got shape \(3, 1\)"
    ):
        dj.rescale_noise_cfg(cond, uncond, jnp.ones((3, 1)))
    with pytest.raises(ValueError, match="guidance_scale"):
        dj.sample(model, STATE, X_T, model_args=ARGS, guidance_scale=jnp.ones(2))
    with pytest.raises(ValueError, match="guidance_rescale"):
        dj.bdia_sample(model, STATE, X_T, model_args=ARGS, guidance_scale=3.0, guidance_rescale=jnp.ones(5))


# --- schedules, no recompilation, bad input ---------------------------------------------------------


def test_scale_schedule_equals_a_loop_with_per_step_scales():
    scales = np.linspace(6.0, 1.0, S)
    got = dj.sample(model, STATE, X_T, model_args=ARGS, guider=dj.cfg(dj.scale_schedule(jnp.asarray(scales))))
    expected = guided_loop(lambda i, t, u, c: u + scales[i] * (c - u), X_T)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="scale_schedule of 5 values; the schedule has S = 8"):
        dj.sample(model, STATE, X_T, model_args=ARGS, guider=dj.cfg(dj.scale_schedule(jnp.ones(5))))


def test_no_recompilation_when_any_numeric_parameter_changes():
    traces = []

    @jax.jit
    def run(p):
        traces.append(1)
        guiders = [
            dj.cfg(p["w"], p["phi"]),
            dj.cfg_zero_star(p["w"], p["zero"], p["phi"]),
            dj.apg(p["w"], momentum=p["m"], norm_threshold=p["r"], eta=p["eta"], guidance_rescale=p["phi"]),
            dj.tangential_cfg(p["w"], p["phi"]),
            dj.guidance_window(dj.cfg_pp(p["lam"]), p["start"], p["stop"], conditional_args=(1,)),
            dj.cfg(dj.scale_schedule(p["schedule"])),
        ]
        return [dj.sample(model, STATE, X_T, model_args=ARGS, guider=g) for g in guiders]

    def params(k):
        return {
            "w": jnp.float32(3 + k),
            "phi": jnp.float32(0.1 * k),
            "zero": jnp.int32(k),
            "m": jnp.float32(-0.5 + 0.1 * k),
            "r": jnp.float32(1 + k),
            "eta": jnp.float32(0.5 * k),
            "lam": jnp.float32(0.2 + 0.1 * k),
            "start": jnp.float32(0.1 * k),
            "stop": jnp.float32(0.9),
            "schedule": jnp.full(S, 2.0 + k),
        }

    first, second = run(params(0)), run(params(1))
    assert len(traces) == 1
    assert all(
        bool(jnp.isfinite(a).all()) and not bool(jnp.allclose(a, b))
        for a, b in zip(first, second, strict=True)
    )


def test_stateful_guiders_need_sample_or_invert():
    stateful = dj.apg(3.0, momentum=-0.5)
    for loop in (dj.parallel_sample, dj.edict_sample, dj.bdia_invert):
        with pytest.raises(ValueError, match=f"{loop.__name__} needs a stateless guider"):
            loop(model, STATE, X_T, model_args=ARGS, guider=stateful)
    with pytest.raises(ValueError, match="edict_sample takes one model output per call"):
        dj.edict_sample(model, STATE, X_T, model_args=ARGS, guider=dj.cfg_pp(0.5))


def test_bad_guider_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="guidance_scale .* or guider, not both"):
        dj.sample(model, STATE, X_T, model_args=ARGS, guidance_scale=3.0, guider=dj.cfg(3.0))
    with pytest.raises(TypeError, match="guider must be a Guider"):
        dj.sample(model, STATE, X_T, model_args=ARGS, guider=lambda u, c: c)
    with pytest.raises(ValueError, match=r"lambda\) must be in \[0, 1\], got 1.5"):
        dj.cfg_pp(1.5)
    with pytest.raises(ValueError, match=r"start must be in \[0, 1\)"):
        dj.guidance_window(dj.cfg(3.0), 1.0)
    with pytest.raises(ValueError, match=r"stop must be in \[start, 1\]"):
        dj.guidance_window(dj.cfg(3.0), 0.5, 0.4)
    with pytest.raises(ValueError, match="conditional_args .* past model_args"):
        dj.sample(
            model, STATE, X_T, model_args=ARGS, guider=dj.guidance_window(dj.cfg(3.0), conditional_args=(2,))
        )
    with pytest.raises(ValueError, match=r"zero_init_steps must be in \[0, inf\)"):
        dj.cfg_zero_star(3.0, -1)
    with pytest.raises(ValueError, match="guidance_scale must be a scalar, one value per example"):
        dj.apg(jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="scale_schedule values must have shape"):
        dj.scale_schedule(3.0)


def test_invalid_traced_values_give_nan():
    run = jax.jit(
        lambda lam, start: dj.sample(
            model, STATE, X_T, model_args=ARGS, guider=dj.guidance_window(dj.cfg_pp(lam), start, 1.0)
        )
    )
    assert bool(jnp.isfinite(run(0.5, 0.0)).all())
    assert bool(jnp.isnan(run(1.5, 0.0)).all())
    assert bool(jnp.isnan(run(0.5, 1.5)).all())
    runtime = dj.set_timesteps(dj.create_state(CONFIG), S, max_steps=12)
    short = dj.cfg(dj.scale_schedule(jnp.full(S - 2, 3.0)))  # fewer values than the runtime S
    assert bool(jnp.isnan(dj.sample(model, runtime, X_T, model_args=ARGS, guider=short)).all())


def test_guidance_page_python_blocks_run_in_order():
    page = Path(__file__).resolve().parents[1] / "docs" / "guidance.md"
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)
    assert blocks
    namespace: dict = {"__name__": "guidance_page"}
    for number, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"{page}: python block {number}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"docs/guidance.md python block {number} failed:\n{block}") from err


def test_a_stateful_guider_in_the_runtime_length_loop_equals_the_static_loop():
    guider = dj.guidance_window(dj.apg(4.0, momentum=-0.5, norm_threshold=1.0), 0.0, 0.75)
    runtime = dj.set_timesteps(dj.create_state(CONFIG), S, max_steps=12)
    static_x, static_traj = dj.sample(
        model, STATE, X_T, model_args=ARGS, guider=guider, return_trajectory=True
    )
    x, traj = dj.sample(model, runtime, X_T, model_args=ARGS, guider=guider, return_trajectory=True)
    np.testing.assert_allclose(x, static_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(traj.prev_sample[:S], static_traj.prev_sample, rtol=1e-5, atol=1e-6)
    assert traj.prev_sample.shape == (12, *X_T.shape) and bool(jnp.isnan(traj.prev_sample[S:]).all())
    grad = jax.grad(
        lambda w: dj.sample(model, STATE, X_T, model_args=(w, LABELS), guider=guider, remat=True).sum()
    )
    assert bool(jnp.isfinite(grad(0.8)))


def test_rescaled_wraps_any_guider_as_the_guiders_own_rescale_does():
    """rescaled(g, phi) is the guiders' guidance_rescale=phi (bitwise), works around a guider of
    one's own, keeps a window, and refuses a split output and a phi out of range."""
    uncond, cond = jax.random.normal(jax.random.key(3), (2, 2, 3, 4))
    info = dj.GuidanceInfo(jnp.int32(0), 4, jnp.int32(999), jnp.float32(0.5), cond, "epsilon", False)
    for own, bare in [
        (dj.cfg_zero_star(5.0, 0, 0.7), dj.cfg_zero_star(5.0, 0)),
        (dj.tangential_cfg(5.0, 0.7), dj.tangential_cfg(5.0)),
        (dj.apg(5.0, guidance_rescale=0.7), dj.apg(5.0)),
    ]:
        expected = own.apply((), uncond, cond, info)[0]
        np.testing.assert_array_equal(dj.rescaled(bare, 0.7).apply((), uncond, cond, info)[0], expected)
    cfg_out = dj.cfg(5.0, 0.7).apply((), uncond, cond, info)[0]
    np.testing.assert_allclose(
        dj.rescaled(dj.cfg(5.0), 0.7).apply((), uncond, cond, info)[0], cfg_out, rtol=1e-6
    )
    mine = dj.Guider(lambda latents: (), lambda state, u, c, info: (3 * c - 2 * u, state))
    out = dj.rescaled(mine, 1.0).apply((), uncond, cond, info)[0]
    np.testing.assert_allclose(jnp.std(out, axis=(1, 2)), jnp.std(cond, axis=(1, 2)), rtol=1e-5)
    window = dj.guidance_window(dj.cfg(5.0), 0.0, 0.5, conditional_args=(0,))
    assert dj.rescaled(window, 0.5).active is window.active
    with pytest.raises(ValueError, match="GuidedOutput"):
        dj.rescaled(dj.cfg_pp(0.5), 0.5).apply((), uncond, cond, info)
    with pytest.raises(ValueError, match="guidance_rescale"):
        dj.rescaled(mine, 1.5)
    with pytest.raises(TypeError, match="guider must be a Guider"):
        dj.rescaled(dj.cfg, 0.5)
