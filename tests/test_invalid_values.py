"""The bad-input rule (docs/exactness.md, "Invalid input: one rule"): a value known in Python that
is invalid raises a ValueError / TypeError naming the parameter and its valid range before any
compute; the same value traced makes the call's floating outputs all NaN (``converged=False``
for `parallel_sample`), never a plausible result. One test per defect of issue 20."""

from __future__ import annotations

import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ddim_jax as dj
from ddim_jax import (
    BDIALatents,
    DDIMConfig,
    EDICTLatents,
    add_noise,
    bdia_invert,
    bdia_sample,
    create_state,
    edict_invert,
    edict_sample,
    get_velocity,
    inverse_step,
    invert,
    parallel_sample,
    sample,
    scale_model_input,
    set_timesteps,
    step,
)
from ddim_jax.compat import FlaxDDIMScheduler

X = jnp.linspace(-1.0, 1.0, 2 * 3 * 4).reshape(2, 3, 4)
KEY = jax.random.key(0)


def model_fn(x, t):
    return jnp.tanh(x) + 1e-3 * t.astype(x.dtype)


def static_state(steps=10, **config):
    return set_timesteps(create_state(DDIMConfig(**config)), steps)


def all_nan(tree) -> bool:
    leaves = [a for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)]
    return bool(leaves) and all(bool(jnp.isnan(a).all()) for a in leaves)


def assert_close(actual, expected):
    """Jitted against eager: equal up to float32 round-off (XLA fuses the jitted arithmetic)."""
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def all_finite(tree) -> bool:
    leaves = [a for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)]
    return all(bool(jnp.isfinite(a).all()) for a in leaves)


# --- timesteps: out of [0, T), or off the schedule where the rule needs it ---

TIMESTEP_CALLS = {
    "step": lambda state, t: step(state, 0.1 * X, t, X),
    "inverse_step": lambda state, t: inverse_step(state, 0.1 * X, t, X),
    "add_noise": lambda state, t: add_noise(state, X, 0.5 * X, t),
    "get_velocity": lambda state, t: get_velocity(state, X, 0.5 * X, t),
    "scale_model_input": lambda state, t: scale_model_input(state, X, t),
}


@pytest.mark.parametrize("fn", sorted(TIMESTEP_CALLS))
def test_traced_timesteps_out_of_range_give_nan(fn):
    """Were clamped or wrapped: add_noise at t = 1000 or -1 gave t = 999's result, step at a
    negative t returned its input."""
    call, state = TIMESTEP_CALLS[fn], static_state()
    traced = jax.jit(call)
    assert all_finite(traced(state, jnp.int32(900)))
    assert_close(jax.tree.leaves(traced(state, jnp.int32(900))), jax.tree.leaves(call(state, 900)))
    for t in (-1, 1000, 5000, [0, 1000]):
        with pytest.raises(ValueError, match=r"must be in \[0, num_train_timesteps=1000\), got"):
            call(state, t)
        assert all_nan(traced(state, jnp.asarray(t, jnp.int32))), (fn, t)


def test_schedule_rule_traced_timestep_off_the_schedule_gives_nan():
    """With prev_timestep_rule="schedule" a traced t not in the schedule moved to a wrong level."""
    state = static_state(prev_timestep_rule="schedule")
    on, off = int(state.timesteps[3]), int(state.timesteps[3]) + 1
    for fn in (step, inverse_step):
        traced = jax.jit(lambda t, fn=fn: fn(state, 0.1 * X, t, X))
        assert_close(traced(on).prev_sample, fn(state, 0.1 * X, on, X).prev_sample)
        with pytest.raises(ValueError, match=r"timestep must be one of state.timesteps"):
            fn(state, 0.1 * X, off, X)
        assert all_nan(traced(off))
        assert all_nan(traced(jnp.array([on, off])))  # one example off: the whole call
    # the state traced too (a jit argument), the timestep a Python int: the same rule
    by_state = jax.jit(lambda s: step(s, 0.1 * X, off, X))
    assert all_nan(by_state(state))


@pytest.mark.parametrize("fn", [step, inverse_step])
def test_step_on_runtime_state_with_invalid_traced_steps_gives_nan(fn):
    """Returned finite values for a traced S outside [1, M]."""
    base = create_state(DDIMConfig())

    def call(s):
        return fn(set_timesteps(base, s, max_steps=20), 0.1 * X, 500, X)

    traced = jax.jit(call)
    assert_close(traced(10).prev_sample, call(10).prev_sample)
    for s in (0, -1, 21):
        with pytest.raises(ValueError, match=r"num_inference_steps must be an int in \[1, max_steps=20\]"):
            call(s)
        assert all_nan(traced(s)), s


def test_x64_int64_values_do_not_wrap():
    """Under jax_enable_x64 a traced int64 S, start_step or timestep of 2**32 or more wrapped
    into range (S = 2**32 + 5 gave S = 5's sample)."""
    base = create_state(DDIMConfig())
    with jax.enable_x64(True):
        x = X.astype(jnp.float32)
        run = jax.jit(
            lambda s, start: sample(model_fn, set_timesteps(base, s, max_steps=20), x, start_step=start)
        )
        assert all_finite(run(jnp.int64(5), jnp.int64(0)))
        assert all_nan(run(jnp.int64(2**32 + 5), jnp.int64(0)))
        assert all_nan(run(jnp.int64(5), jnp.int64(2**32 + 1)))
        assert all_nan(run(jnp.int64(5), jnp.int64(-(2**32) + 1)))
        noised = jax.jit(lambda t: add_noise(base, x, x, t))
        assert all_finite(noised(jnp.int64(999))) and all_nan(noised(jnp.int64(2**32 + 999)))
        stepped = jax.jit(lambda t: step(static_state(), x, t, x))
        assert all_nan(stepped(jnp.int64(2**32 + 900)))
        custom = jax.jit(lambda ts: sample(model_fn, set_timesteps(base, 2, timesteps=ts), x))
        assert all_finite(custom(jnp.array([999, 499, 0], jnp.int64)))  # spaced by T // S = 500
        assert all_nan(custom(jnp.array([2**32 + 999, 499, 0], jnp.int64)))
        with pytest.raises(ValueError, match="num_inference_steps must be an int in"):
            set_timesteps(base, np.int64(2**32 + 5), max_steps=20)
        with pytest.raises(ValueError, match=r"timestep must be in \[0, num_train_timesteps=1000\)"):
            step(static_state(), x, np.int64(2**32 + 900), x)
    assert jnp.ones(1).dtype == jnp.float32  # x64 did not leak out of the test


# --- eta, gamma, mixing, tolerance, max_iterations ---


def test_eta_above_one_is_refused_and_traced_eta_out_of_range_gives_nan():
    """Python eta > 1 silently clamped the direction term to 0; traced eta -1 flipped the noise."""
    state = static_state(4)
    for bad in (1.5, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
            step(state, X, 900, X, eta=bad, key=KEY)
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
            sample(model_fn, state, X, eta=bad, key=KEY)
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
            parallel_sample(model_fn, state, X, eta=bad, key=KEY)
    calls = {
        "step": jax.jit(lambda eta: step(state, 0.1 * X, 900, X, eta=eta, key=KEY)),
        "sample": jax.jit(lambda eta: sample(model_fn, state, X, eta=eta, key=KEY, return_trajectory=True)),
        "parallel_sample": jax.jit(lambda eta: parallel_sample(model_fn, state, X, eta=eta, key=KEY)),
    }
    for name, call in calls.items():
        assert all_finite(call(1.0)), name
        for bad in (1.5, -1.0, jnp.nan):
            out = call(bad)
            assert all_nan(out), (name, bad)
            if name == "parallel_sample":
                assert not bool(out.converged)
    assert_close(calls["sample"](0.5)[0], sample(model_fn, state, X, eta=0.5, key=KEY))


def test_traced_parallel_options_out_of_range_give_nan_and_not_converged():
    """Traced tolerance < 0 or inf and max_iterations < 1 were accepted (tolerance inf reported
    converged with a wrong sample)."""
    state = static_state(4)
    run = jax.jit(lambda tol, it: parallel_sample(model_fn, state, X, tolerance=tol, max_iterations=it))
    good = run(0.1, 10)
    assert all_finite(good) and bool(good.converged)
    for tol, it in ((-0.1, 10), (jnp.inf, 10), (jnp.nan, 10), (0.1, 0), (0.1, -3)):
        out = run(tol, it)
        assert all_nan((out.sample, out.residuals)) and not bool(out.converged), (tol, it)
    with pytest.raises(ValueError, match=r"tolerance must be in \[0, inf\), got inf"):
        parallel_sample(model_fn, state, X, tolerance=float("inf"))
    with pytest.raises(ValueError, match=r"max_iterations must be in \[1, inf\), got 0"):
        parallel_sample(model_fn, state, X, max_iterations=0)


def test_traced_gamma_and_mixing_out_of_range_give_nan():
    state = static_state(4, clip_sample=False)
    loops = {
        "edict_sample": lambda p: edict_sample(model_fn, state, X, mixing=p),
        "edict_invert": lambda p: edict_invert(model_fn, state, X, mixing=p, return_trajectory=True),
        "bdia_sample": lambda p: bdia_sample(model_fn, state, X, gamma=p),
        "bdia_invert": lambda p: bdia_invert(model_fn, state, X, gamma=p, return_trajectory=True),
    }
    for name, loop in loops.items():
        traced = jax.jit(loop)
        assert_close(jax.tree.leaves(traced(0.9)), jax.tree.leaves(loop(0.9)))
        bad_values = (-0.1, 1.5, jnp.nan) + ((0.0,) if name != "bdia_sample" else ())
        for bad in bad_values:
            with pytest.raises(ValueError, match=r"(gamma|mixing) must be in [\[(]0, 1\]"):
                loop(float(bad))
            assert all_nan(traced(bad)), (name, bad)


# --- refusals ---


@pytest.mark.parametrize("invert_fn", [edict_invert, bdia_invert])
def test_exact_inversion_refuses_x0_prediction_from_alpha_one(invert_fn):
    """Returned inf / NaN silently; `invert` refuses exactly this config."""
    state = static_state(clip_sample=False, prediction_type="sample", set_alpha_to_one=True)
    with pytest.raises(ValueError, match=r"with prediction_type='sample' needs set_alpha_to_one=False"):
        invert_fn(model_fn, state, X)
    # the samplers are fine with it (their last step goes to alpha 1, never from it)
    assert all_finite(edict_sample(model_fn, state, X)) and all_finite(bdia_sample(model_fn, state, X))
    ok = static_state(clip_sample=False, prediction_type="sample", set_alpha_to_one=False)
    assert all_finite(invert_fn(model_fn, ok, X))


def test_latent_pairs_are_refused_by_type():
    """BDIALatents to edict_sample (or the reverse), or either pair to sample / invert, ran and
    returned a wrong result or a stacked (2, batch, ...) array."""
    state = static_state(clip_sample=False)
    edict, bdia = EDICTLatents(X, X), BDIALatents(X, X)
    with pytest.raises(TypeError, match=r"latents must be one array or EDICTLatents.*got a BDIALatents"):
        edict_sample(model_fn, state, bdia)
    with pytest.raises(TypeError, match=r"latents must be one array or BDIALatents.*got a EDICTLatents"):
        bdia_sample(model_fn, state, edict)
    for pair in (edict, bdia):
        kind = type(pair).__name__
        for fn in (sample, invert, parallel_sample):
            with pytest.raises(
                TypeError, match=rf"{fn.__name__} takes (latents|x0) as one array, got a {kind}"
            ):
                fn(model_fn, state, pair)
        for fn in (edict_invert, bdia_invert):
            with pytest.raises(TypeError, match=rf"{fn.__name__} takes x0 as one array, got a {kind}"):
                fn(model_fn, state, pair)
    # a plain 2-tuple still means (x, y) / (x, x_next), as before
    assert all_finite(edict_sample(model_fn, state, (X, X)))


def test_python_lists_of_latents_are_refused_clearly():
    """Gave "Cannot determine dtype" from inside JAX."""
    state = static_state()
    for fn in (sample, invert, parallel_sample):
        with pytest.raises(
            TypeError, match=r"takes (latents|x0) as one array .*got a Python list.*jnp.stack"
        ):
            fn(model_fn, state, [X[0], X[1]])


def test_num_train_timesteps_bounded_with_the_memory_it_would_take():
    """DDIMConfig(num_train_timesteps=2**31) was accepted and create_state allocated until the
    kernel killed the process."""
    with pytest.raises(
        ValueError,
        match=r"num_train_timesteps must be an int in \[2, 2\*\*24 = 16777216\], "
        r"got 2147483648: .* at least 96 GiB",
    ):
        DDIMConfig(num_train_timesteps=2**31)
    assert DDIMConfig(num_train_timesteps=2**24).num_train_timesteps == 2**24


def test_beta_end_driving_alphas_cumprod_to_zero_warns():
    """beta_end=1.0 was accepted silently though 58% of alphas_cumprod are then 0."""
    with pytest.warns(
        UserWarning, match=r"beta_end=1.0 drives alphas_cumprod to 0 \(in float32\) at 579 of "
    ):
        create_state(DDIMConfig(beta_end=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_state(DDIMConfig())  # the usual configs: no warning
        create_state(DDIMConfig(rescale_betas_zero_snr=True))  # a zero last entry is zero-SNR's


def test_config_passed_as_state():
    """Gave an AttributeError from inside set_timesteps / add_noise / get_velocity."""
    config = DDIMConfig()
    match = r"state must be a DDIMState, got DDIMConfig: make one with create_state\(config\)"
    with pytest.raises(TypeError, match=match):
        set_timesteps(config, 10)
    for fn in (add_noise, get_velocity):
        with pytest.raises(TypeError, match=match):
            fn(config, X, X, 10)
    with pytest.raises(TypeError, match=match):
        scale_model_input(config, X, 10)
    with pytest.raises(TypeError, match=match):
        step(config, X, 10, X)


def test_timesteps_range_is_accepted():
    """set_timesteps(timesteps=range(...)) gave "Cannot determine dtype"."""
    base = create_state(DDIMConfig())
    state = set_timesteps(base, timesteps=range(900, -1, -100))
    assert state.timesteps.tolist() == list(range(900, -1, -100))
    assert set_timesteps(base, 4, timesteps=range(999, 0, -250)).num_steps == 4
    with pytest.raises(ValueError, match="timesteps must be in descending order"):
        set_timesteps(base, timesteps=range(0, 900, 100))


def test_parallel_sample_refuses_an_empty_batch():
    """Failed deep inside JAX (a max over an empty axis)."""
    with pytest.raises(ValueError, match=r"latents must hold at least one example .*, got shape \(0, 3\)"):
        parallel_sample(model_fn, static_state(), jnp.zeros((0, 3)))


def test_from_pretrained_refuses_a_binary_file(tmp_path):
    """Gave a UnicodeDecodeError."""
    path = tmp_path / "scheduler_config.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    for load in (DDIMConfig.from_pretrained, FlaxDDIMScheduler.from_pretrained):
        with pytest.raises(ValueError, match=r"scheduler_config.json' is not a UTF-8 text file"):
            load(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="must hold a JSON object"):
        FlaxDDIMScheduler.from_pretrained(path)


def test_traced_flags_are_refused():
    """Traced booleans ended in a TracerBoolConversionError from inside JAX."""
    state = static_state(clip_sample=False)
    match = r"{} must be a Python bool, got a traced bool\[\]: it chooses the structure"
    cases = {
        "return_trajectory": lambda f: sample(model_fn, state, X, return_trajectory=f),
        "remat": lambda f: invert(model_fn, state, X, remat=f),
        "use_clipped_model_output": lambda f: step(state, X, 900, X, use_clipped_model_output=f),
    }
    for name, call in cases.items():
        with pytest.raises(TypeError, match=match.format(name)):
            jax.jit(call)(True)
    for loop in (edict_sample, edict_invert, bdia_sample, bdia_invert):
        with pytest.raises(TypeError, match=match.format("return_trajectory")):
            jax.jit(lambda f, loop=loop: loop(model_fn, state, X, return_trajectory=f))(True)
    with pytest.raises(TypeError, match=match.format("use_clipped_model_output")):
        jax.jit(lambda f: parallel_sample(model_fn, state, X, use_clipped_model_output=f))(True)


def test_compat_step_returns_a_float_result_for_an_integer_sample():
    """Truncated its result to the integer sample's dtype."""
    scheduler = FlaxDDIMScheduler()
    state = scheduler.set_timesteps(scheduler.create_state(), 10)
    sample_int = jnp.array([[3, -2, 5]], jnp.int32)
    out = scheduler.step(state, jnp.zeros((1, 3)), 900, sample_int).prev_sample
    assert out.dtype == jnp.float32
    expected = step(state, jnp.zeros((1, 3)), 900, sample_int.astype(jnp.float32)).prev_sample
    np.testing.assert_array_equal(out, expected)
    assert not np.allclose(out, np.round(out))  # not truncated to integers
    bf16 = scheduler.step(state, jnp.zeros((1, 3)), 900, sample_int.astype(jnp.bfloat16)).prev_sample
    assert bf16.dtype == jnp.bfloat16  # a float sample keeps its dtype, as before


# --- issue 29: guiders, windows, x64 (tests/test_x64.py), types, combinations ---

WINDOW_STEPS = jnp.arange(1000, dtype=jnp.int32)


def window_mask(start, stop, num_steps):
    """The steps [0, 1000) that `guidance_window(cfg, start, stop)` guides in a schedule of S steps."""
    info = dj.GuidanceInfo(WINDOW_STEPS, num_steps, WINDOW_STEPS, None, None, "epsilon", False)
    return dj.guidance_window(dj.cfg(2.0), start, stop).active(info)


traced_window_mask = jax.jit(window_mask)
K, S = (a.ravel() for a in np.meshgrid(np.arange(101), np.arange(1, 1001), indexing="ij"))
# The pairs (k, S) where diffusers' float64 int(k / 100 * S) and float32's floor differ (107).
DIFFERING = [
    (int(k), int(s))
    for k, s in zip(K, S, strict=True)
    if int(k / 100 * s) != int(np.floor(np.float32(k / 100) * np.float32(s)))
]


def test_window_steps_are_exact_for_every_percentage_and_step_count():
    """Every start = k / 100 and S <= 1000, traced: step k S // 100 is the first guided one."""

    def first_is_guided(k, start, s):
        guider = dj.guidance_window(dj.cfg(2.0), start, 1.0)
        at = lambda step: guider.active(dj.GuidanceInfo(step, s, step, None, None, "epsilon", False))  # noqa: E731
        first = k * s // 100
        return (at(first) | (first == s)) & ~at(first - 1)

    k, s = K[K < 100], S[K < 100]  # start = 1 is out of range
    ok = jax.jit(jax.vmap(first_is_guided))(k, (k / 100).astype(np.float32), s)  # float32 as traced
    assert len(DIFFERING) == 107 and bool(ok.all()), [
        (k, s) for k, s, o in zip(K, S, ok, strict=True) if not o
    ][:5]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    pair=st.one_of(st.sampled_from(DIFFERING), st.tuples(st.integers(0, 99), st.integers(1, 1000))),
    width=st.integers(0, 100),
    fraction=st.floats(0, 1, exclude_max=True, width=32),
)
def test_window_steps_are_the_same_known_and_traced(pair, width, fraction):
    """A traced start or stop (or S, as a runtime-length state has) picked other steps than the
    same Python values: floor(float32(f) S) against int(f S), e.g. start=0.58, S=50 guided from
    step 29 in one and 28 in the other (107 pairs f = k / 100, S <= 1000 differed). Now one
    formula: the same steps, and exactly [k S // 100, l S // 100) for f = k / 100, l / 100."""
    k, num_steps = pair
    start, stop = k / 100, min(k + width, 100) / 100
    known = np.asarray(window_mask(start, stop, num_steps))
    traced = np.asarray(traced_window_mask(start, stop, jnp.int32(num_steps)))
    steps = np.arange(1000)
    exact = (k * num_steps // 100 <= steps) & (steps < min(k + width, 100) * num_steps // 100)
    live = steps < num_steps
    np.testing.assert_array_equal(known[live], exact[live])
    np.testing.assert_array_equal(traced[live], exact[live])
    # any fraction: known and traced agree (the exact step of a binary fraction is its own)
    known = np.asarray(window_mask(fraction, 1.0, num_steps))
    np.testing.assert_array_equal(known, np.asarray(traced_window_mask(fraction, 1.0, jnp.int32(num_steps))))


def test_window_at_058_of_50_steps_guides_from_step_29_known_traced_and_runtime_length():
    guided = []

    def model(x, t, labels):
        guided.append(x.shape[0])  # the doubled batch inside the window, traced once per branch
        return jnp.tanh(x + labels)

    labels = jnp.array([[0.0], [0.0], [1.0], [1.0]])
    base = create_state(DDIMConfig())
    state = set_timesteps(base, 50)
    run = lambda state, start: sample(  # noqa: E731
        model, state, X[:, :, 0], model_args=(labels,), guider=dj.guidance_window(dj.cfg(3.0), start)
    )
    known = run(state, 0.58)
    traced = jax.jit(run, static_argnums=())(state, 0.58)
    runtime = jax.jit(lambda s, f: run(set_timesteps(base, s, max_steps=60), f))(50, 0.58)
    np.testing.assert_array_equal(known, traced)
    np.testing.assert_allclose(runtime, known, rtol=1e-6, atol=1e-6)
    mask = np.asarray(window_mask(0.58, 1.0, 50))[:50]
    assert mask.argmax() == 29 and mask[29:].all()


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: dj.cfg(NAN), "guidance_scale must be finite, got nan"),
        (lambda: dj.cfg(7.5, NAN), r"guidance_rescale must be in \[0, 1\], got nan"),
        (lambda: dj.cfg(7.5, 1.5), r"guidance_rescale must be in \[0, 1\], got 1.5"),
        (lambda: dj.apg(momentum=NAN), "momentum must be finite, got nan"),
        (lambda: dj.apg(norm_threshold=NAN), "norm_threshold must be finite, got nan"),
        (lambda: dj.apg(eta=INF), "eta must be finite, got inf"),
        (lambda: dj.tangential_cfg(INF), "guidance_scale must be finite, got inf"),
        (lambda: dj.cfg_zero_star(-INF), "guidance_scale must be finite, got -inf"),
        (lambda: dj.cfg_zero_star(2.0, 1, NAN), r"guidance_rescale must be in \[0, 1\]"),
        (lambda: dj.cfg_pp(NAN), r"lambda\) must be in \[0, 1\], got nan"),
        (
            lambda: dj.cfg(dj.scale_schedule([1.0, NAN, 2.0])),
            r"guidance_scale must be finite, got \[1.0, nan, 2.0\]",
        ),
        (lambda: dj.guidance_window(dj.cfg(2.0), NAN), r"start must be in \[0, 1\)"),
        (lambda: dj.guidance_window(dj.cfg(2.0), 0.0, NAN), r"stop must be in \[0, 1\]"),
        (
            lambda: dj.guidance_window(dj.cfg(2.0), 0.9999999999999999),
            r"start must be in \[0, 1\) \(as float32\)",
        ),
    ],
)
def test_non_finite_guider_parameters_raise_naming_them(make, message):
    """cfg(nan), cfg(7.5, nan), apg(momentum=nan), tangential_cfg(inf) and a scale_schedule
    holding NaN gave an all-NaN sample with no error; apg(norm_threshold=nan) turned clipping
    off silently."""
    with pytest.raises(ValueError, match=message):
        make()


def test_traced_invalid_guider_parameters_give_nan_even_outside_their_window():
    state = static_state(4)
    labels = jnp.zeros((4, 1, 1))
    model = lambda x, t, labels: jnp.tanh(x) + labels  # noqa: E731
    guiders = {
        "cfg": lambda v: dj.cfg(v),
        "rescale": lambda v: dj.cfg(2.0, v),
        "apg_momentum": lambda v: dj.apg(2.0, momentum=v),
        "apg_norm_threshold": lambda v: dj.apg(2.0, norm_threshold=v),
        "tangential_cfg": lambda v: dj.tangential_cfg(v),
        "schedule": lambda v: dj.cfg(dj.scale_schedule(jnp.full(4, 2.0).at[2].set(v))),
        "never_guided": lambda v: dj.guidance_window(dj.cfg(v), 0.0, 0.0),  # a window guiding no step
    }
    for name, make in guiders.items():
        run = jax.jit(lambda v: sample(model, state, X, model_args=(labels,), guider=make(v)))  # noqa: B023
        assert all_finite(run(0.5)), name
        assert all_nan(run(jnp.nan)), name
        if name in ("rescale",):
            assert all_nan(run(1.5)), name
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        sample(model_fn, state, X, guidance_scale=NAN)
    run = jax.jit(lambda w: sample(model, state, X, model_args=(labels,), guidance_scale=w))
    assert all_nan(run(jnp.inf))
    zero_init = jax.jit(
        lambda z: sample(model, state, X, model_args=(labels,), guider=dj.cfg_zero_star(2.0, z))
    )
    assert all_finite(zero_init(1)) and all_nan(zero_init(-1))


def test_compat_aliases_are_parsed_as_strictly_as_the_native_keys():
    """rescale_zero_terminal_snr="false" (and "0") turned zero SNR on: bool("false") is True."""
    for bad in ("false", "0", "true", 0, 1):
        with pytest.raises(TypeError, match="rescale_zero_terminal_snr must be a bool"):
            FlaxDDIMScheduler.from_config({"rescale_zero_terminal_snr": bad})
        with pytest.raises(TypeError, match="rescale_betas_zero_snr must be a bool"):
            FlaxDDIMScheduler.from_config({"rescale_betas_zero_snr": bad})
    assert (
        FlaxDDIMScheduler.from_config({"rescale_zero_terminal_snr": False}).config.rescale_betas_zero_snr
        is False
    )
    assert (
        FlaxDDIMScheduler.from_config({"rescale_zero_terminal_snr": True}).config.rescale_betas_zero_snr
        is True
    )


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: sample(model_fn, static_state(4), X, guidance_scale=".5"), "guidance_scale"),
        (
            lambda: sample(model_fn, static_state(4), X, guidance_scale=7.5, guidance_rescale="0.7"),
            "guidance_rescale",
        ),
        (lambda: sample(model_fn, static_state(4), X, eta=".5", key=KEY), "eta"),
        (lambda: sample(model_fn, static_state(4), X, eta=None), "eta"),
        (lambda: step(static_state(4), X, "900", X), "timestep"),
        (lambda: step(static_state(4), X, 900, X, eta=None), "eta"),
        (lambda: add_noise(static_state(4), X, X, None), "timesteps"),
        (lambda: parallel_sample(model_fn, static_state(4), X, tolerance="0.1"), "tolerance"),
        (lambda: bdia_sample(model_fn, static_state(4, clip_sample=False), X, gamma=None), "gamma"),
        (lambda: edict_sample(model_fn, static_state(4, clip_sample=False), X, mixing="0.93"), "mixing"),
        (lambda: dj.cfg(True), "guidance_scale"),
        (lambda: dj.cfg(1 + 2j), "guidance_scale"),
        (lambda: dj.apg(2.0, momentum="-0.5"), "momentum"),
        (lambda: dj.cfg_zero_star(2.0, "1"), "zero_init_steps"),
        (lambda: dj.guidance_window(dj.cfg(2.0), "0.2"), "start"),
        (lambda: dj.scale_schedule(["1", "2"]), "scale_schedule values"),
        (lambda: sample(model_fn, static_state(4), X, return_trajectory="false"), "return_trajectory"),
        (lambda: sample(model_fn, static_state(4), X, remat=None), "remat"),
        (lambda: step(static_state(4), X, 900, X, use_clipped_model_output="no"), "use_clipped_model_output"),
    ],
)
def test_wrong_types_get_an_error_naming_the_parameter(call, name):
    """A string where a number belongs (from JSON or a form) said "data type '.5' not
    understood"; None failed inside float(); a string flag "false" was truthy."""
    with pytest.raises(TypeError, match=f"^{re.escape(name)} must be"):
        call()


def test_unambiguous_forms_are_accepted():
    state = static_state(4)
    labels = jnp.zeros((4, 1, 1))
    model = lambda x, t, labels: jnp.tanh(x) + labels  # noqa: E731
    listed = sample(model, state, X, model_args=(labels,), guidance_scale=[2.0, 3.0])  # one per example
    arrayed = sample(model, state, X, model_args=(labels,), guidance_scale=jnp.array([2.0, 3.0]))
    np.testing.assert_array_equal(listed, arrayed)
    assert all_finite(sample(model, state, X, model_args=(labels,), guidance_scale=np.float64(2.0)))
    assert all_finite(sample(model, state, X, model_args=(labels,), guidance_scale=3))  # an int
    scheduled = sample(model, state, X, model_args=(labels,), guidance_scale=dj.scale_schedule([2.0] * 4))
    np.testing.assert_allclose(scheduled, sample(model, state, X, model_args=(labels,), guidance_scale=2.0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guidance_rescale": 0.5}, "guidance_rescale=0.5 is used only with guidance_scale"),
        ({"guider": "cfg", "guidance_rescale": 0.5}, "pass the guider's own guidance_rescale"),
        ({"guidance_layout": "interleave"}, "guidance_layout='interleave' .* needs guidance"),
        ({"callback_every": 2}, "callback_every=2 needs a callback"),
        ({"guider": "conditional_args"}, r"conditional_args \(0,\) are used only by a guider with active"),
    ],
)
def test_arguments_that_would_be_silently_ignored_are_refused(kwargs, message):
    kwargs = dict(kwargs)
    if kwargs.get("guider") == "cfg":
        kwargs["guider"] = dj.cfg(2.0)
    elif kwargs.get("guider") == "conditional_args":
        kwargs["guider"] = dj.Guider(lambda latents: (), lambda s, u, c, i: (c, s), conditional_args=(0,))
    loops = (
        (sample, invert, edict_sample) if "callback_every" in kwargs else (sample, invert, parallel_sample)
    )
    for loop in loops:
        with pytest.raises(ValueError, match=message):
            loop(model_fn, static_state(4, clip_sample=False), X, model_args=(jnp.zeros((4, 1)),), **kwargs)


@pytest.mark.parametrize(
    "loop", [sample, invert, parallel_sample, edict_sample, edict_invert, bdia_sample, bdia_invert]
)
def test_every_loop_refuses_an_empty_batch(loop):
    with pytest.raises(ValueError, match=r"latents must hold at least one example .*got shape \(0, 3\)"):
        loop(model_fn, static_state(4, clip_sample=False), jnp.zeros((0, 3)))


def test_a_start_step_invalid_for_every_runtime_step_count_raises():
    """A Python start_step >= M with a runtime-length state (S traced) gave NaN at run time;
    it is out of range for every S in [1, M]."""
    base = create_state(DDIMConfig())
    run = jax.jit(
        lambda s, start: sample(model_fn, set_timesteps(base, s, max_steps=6), X, start_step=start),
        static_argnums=1,
    )
    assert all_finite(run(4, 3))
    for start in (6, 7, -1):
        with pytest.raises(
            ValueError, match=r"start_step must be an int in \[0, num_inference_steps=S <= max_steps=6\)"
        ):
            run(4, start)
