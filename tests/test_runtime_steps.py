"""Runtime-length schedules: padded tables against the static schedule for every S, custom
timesteps, `sample`/`invert` with a traced S and start_step (bitwise against the static loop,
one compilation for a stream of requests), out-of-range values, gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddim_jax import DDIMConfig, create_state, invert, sample, set_timesteps, step

SHAPE = (2, 3, 4, 4)


def model_fn(x, t, w):
    return jnp.tanh(w * x) + 1e-3 * t.astype(x.dtype)


def guided_model_fn(x, t, w, emb):
    return jnp.tanh(w * x) * (1 + emb[:, None, None, None]) + 1e-3 * t.astype(x.dtype)


def latents(seed=0, shape=SHAPE):
    return jax.random.normal(jax.random.key(seed), shape)


# --------------------------------------------------------------------------- the padded schedule

SCHEDULES = [  # (T, M, config): every spacing and rule; T = 999 and M < T too
    (1000, 1000, {"timestep_spacing": "linspace"}),
    (1000, 1000, {"timestep_spacing": "trailing"}),
    (1000, 1000, {"timestep_spacing": "trailing", "prev_timestep_rule": "schedule"}),
    (1000, 1000, {"timestep_spacing": "leading", "steps_offset": 1}),
    (999, 500, {"timestep_spacing": "linspace", "prev_timestep_rule": "schedule"}),
    (999, 500, {"timestep_spacing": "trailing"}),
    (999, 500, {"timestep_spacing": "leading", "prev_timestep_rule": "schedule"}),
    (50, 50, {"timestep_spacing": "leading", "steps_offset": 1, "prev_timestep_rule": "schedule"}),
    (50, 50, {"timestep_spacing": "trailing", "prev_timestep_rule": "schedule"}),
]


@pytest.mark.parametrize("n_train, max_steps, config", SCHEDULES)
def test_padded_schedule_equals_the_static_one_for_every_s(n_train, max_steps, config):
    """All S in [1, M] at once (vmap over a traced S): entries [0, S) equal the static
    schedule's, [S, M) are -1. Covers linspace's rounding and S that do not divide T."""
    state = create_state(DDIMConfig(num_train_timesteps=n_train, **config))
    counts = np.arange(1, max_steps + 1, dtype=np.int32)
    padded = jax.jit(jax.vmap(lambda s: set_timesteps(state, s, max_steps=max_steps)))(counts)
    timesteps, prev = np.asarray(padded.timesteps), np.asarray(padded.prev_timesteps)
    checked = 0
    for s in counts.tolist():
        row, prev_row = timesteps[s - 1], prev[s - 1]
        try:
            static = set_timesteps(state, s)
        except ValueError:  # steps_offset pushes past T - 1: the runtime loops flag it
            assert row[:s].max() >= n_train
            continue
        np.testing.assert_array_equal(row[:s], np.asarray(static.timesteps), err_msg=f"S={s}")
        np.testing.assert_array_equal(prev_row[:s], np.asarray(static.prev_timesteps), err_msg=f"S={s}")
        assert (row[s:] == -1).all() and (prev_row[s:] == -1).all()
        checked += 1
    assert checked >= max_steps - 10
    np.testing.assert_array_equal(np.asarray(padded.num_steps), counts)


def test_padded_state_layout_and_python_known_errors():
    state = create_state(DDIMConfig(timestep_spacing="trailing"))
    padded = set_timesteps(state, 3, max_steps=5)
    assert padded.timesteps.tolist() == [999, 666, 332, -1, -1]
    assert padded.prev_timesteps.tolist() == [666, 333, -1, -1, -1]
    assert padded.has_runtime_length and padded.max_steps == 5 and int(padded.num_inference_steps) == 3
    assert not set_timesteps(padded, 3).has_runtime_length  # the static form resets it
    for bad in (0, 6, -1, 2.5, True, "3", np.float32(3), jnp.zeros(2, jnp.int32)):
        with pytest.raises(ValueError, match=r"num_inference_steps must be an int in \[1, max_steps=5\]"):
            set_timesteps(state, bad, max_steps=5)
    for bad in (0, 1001, 3.0, True):
        with pytest.raises(ValueError, match=r"max_steps must be an int in \[1, num_train_timesteps=1000\]"):
            set_timesteps(state, 3, max_steps=bad)
    with pytest.raises(ValueError, match="num_inference_steps is required with max_steps"):
        set_timesteps(state, max_steps=5)
    offset = create_state(DDIMConfig(num_train_timesteps=10, steps_offset=1))
    with pytest.raises(ValueError, match="steps_offset=1 pushes timestep 10 past"):
        set_timesteps(offset, 10, max_steps=10)


# --------------------------------------------------------------------------- custom timesteps


def test_custom_timesteps_static_and_padded():
    config = DDIMConfig(prev_timestep_rule="schedule")
    state = create_state(config)
    ays = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]  # Align Your Steps (SD 1.5), 10 steps
    static = set_timesteps(state, timesteps=ays)
    assert static.timesteps.tolist() == ays and not static.has_runtime_length
    assert static.prev_timesteps.tolist() == ays[1:] + [-1]
    padded = set_timesteps(state, 6, timesteps=ays)
    assert padded.timesteps.tolist() == ays[:6] + [-1] * 4
    assert padded.prev_timesteps.tolist() == ays[1:6] + [-1] * 5
    traced = jax.jit(lambda ts, s: set_timesteps(state, s, timesteps=ts))(jnp.array(ays), 6)
    np.testing.assert_array_equal(traced.timesteps, padded.timesteps)
    np.testing.assert_array_equal(traced.prev_timesteps, padded.prev_timesteps)


def test_custom_grid_never_steps_off_the_grid_silently():
    """Under the default diffusers rule a step moves to ``t - T // S``: on the Align Your Steps grid
    that is 999 -> 899 while the next model call is at 850, a plausible wrong sample. A known grid
    off the rule raises; a traced one gives NaN; a grid spaced by T // S runs as diffusers does."""
    base = create_state(DDIMConfig())
    ays = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
    match = r"step 0 would move from 999 to 899, not to the next entry 850.*prev_timestep_rule='schedule'"
    with pytest.raises(ValueError, match=match):
        set_timesteps(base, timesteps=ays)
    with pytest.raises(ValueError, match=r"not spaced by num_train_timesteps // S = 166"):
        set_timesteps(base, 6, timesteps=ays)  # the first 6 entries of the padded table count
    even = set_timesteps(base, timesteps=range(900, -1, -100))  # spaced by T // S = 100
    assert even.prev_timesteps.tolist() == list(range(800, -101, -100))
    assert set_timesteps(base, 4, timesteps=[999, 749, 499, 249, 100]).num_steps == 4

    x = jnp.ones((1, 3))
    run = jax.jit(lambda ts, s: sample(lambda x, t: 0.1 * x, set_timesteps(base, s, timesteps=ts), x))
    assert np.isnan(np.asarray(run(jnp.array(ays), 10))).all()
    assert np.isnan(np.asarray(run(jnp.array(ays), 6))).all()
    on_grid = run(jnp.array([999, 749, 499, 249, 100]), 4)
    static = sample(
        lambda x, t: 0.1 * x, set_timesteps(create_state(DDIMConfig(timestep_spacing="trailing")), 4), x
    )
    np.testing.assert_allclose(np.asarray(on_grid), np.asarray(static), rtol=1e-6)
    # the schedule rule takes the uneven grid: each step to the next entry
    scheduled = set_timesteps(create_state(DDIMConfig(prev_timestep_rule="schedule")), timesteps=ays)
    assert scheduled.prev_timesteps.tolist() == ays[1:] + [-1]


@pytest.mark.parametrize(
    "timesteps, match",
    [
        ([10, 20, 5], "timesteps must be in descending order"),
        ([30, 20, 20, 5], "timesteps must not repeat a value"),
        ([1000, 20], r"timesteps must be in \[0, num_train_timesteps=1000\)"),
        ([20, -1], r"timesteps must be in \[0, num_train_timesteps=1000\)"),
        ([], "timesteps must be a non-empty 1-D array"),
        ([[20, 10]], "timesteps must be a non-empty 1-D array"),
    ],
)
def test_bad_custom_timesteps(timesteps, match):
    with pytest.raises(ValueError, match=match):
        set_timesteps(create_state(DDIMConfig()), timesteps=timesteps)


def test_bad_custom_timesteps_types_and_counts():
    state = create_state(DDIMConfig())
    with pytest.raises(TypeError, match="timesteps must hold integers, got dtype float"):
        set_timesteps(state, timesteps=np.array([20.0, 10.0]))
    with pytest.raises(ValueError, match=r"max_steps=3 must equal len\(timesteps\) = 2"):
        set_timesteps(state, 2, timesteps=[20, 10], max_steps=3)
    with pytest.raises(ValueError, match=r"num_inference_steps must be an int in \[1, max_steps=2\]"):
        set_timesteps(state, 3, timesteps=[20, 10])
    with pytest.raises(ValueError, match="timesteps must be in descending order"):  # the first S count
        set_timesteps(state, 2, timesteps=[20, 30, 0])
    assert set_timesteps(state, 1, timesteps=[20, 30, 0]).timesteps.tolist() == [20, -1, -1]


def test_sample_on_a_custom_schedule_is_a_loop_of_step():
    """A DDIM-paper quadratic schedule, stepping to the next entry (prev_timestep_rule="schedule")."""
    state = create_state(DDIMConfig(prev_timestep_rule="schedule", clip_sample=False))
    quadratic = [int(0.999 * i * i) for i in range(31, 0, -3)]
    custom = set_timesteps(state, timesteps=quadratic)
    x = latents(0)
    out = sample(model_fn, custom, x, model_args=(0.8,))
    ref = x
    for t in quadratic:
        ref = step(custom, model_fn(ref, jnp.int32(t), 0.8), t, ref).prev_sample
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    padded = jax.jit(
        lambda s, x: sample(model_fn, set_timesteps(state, s, timesteps=quadratic), x, model_args=(0.8,))
    )
    static = jax.jit(lambda custom, x: sample(model_fn, custom, x, model_args=(0.8,)))
    # the same arithmetic; XLA may fuse a while loop and a scan differently (last bit)
    np.testing.assert_allclose(padded(len(quadratic), x), static(custom, x), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- sample and invert

LOOP_CONFIGS = [
    {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False},
    {"timestep_spacing": "trailing", "prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
    {"timestep_spacing": "linspace", "prev_timestep_rule": "schedule", "thresholding": True},
]
M = 40


def static_runner(guided=False):
    """The static loop with the state as a jit argument (no constant folding of its tables)."""

    def run(state, x, key, eta, w, start):
        if guided:
            emb = jnp.array([0.0, 0.0, 0.3, -0.2])
            return sample(
                guided_model_fn,
                state,
                x,
                key=key,
                eta=eta,
                model_args=(w, emb),
                guidance_scale=3.0,
                start_step=start,
            )
        return sample(model_fn, state, x, key=key, eta=eta, model_args=(w,), start_step=start)

    return jax.jit(run, static_argnums=5)


@pytest.mark.parametrize("config", LOOP_CONFIGS[1:])
def test_runtime_sample_equals_static_bitwise_with_one_compilation(config):
    base = create_state(DDIMConfig(**config))
    traces = []

    @jax.jit
    def runtime(num_steps, start, x, key, eta, w):
        traces.append(1)
        state = set_timesteps(base, num_steps, max_steps=M)
        return sample(model_fn, state, x, key=key, eta=eta, model_args=(w,), start_step=start)

    static = static_runner()
    x = latents(1)
    for num_steps, start, eta in [(1, 0, 0.0), (7, 3, 0.6), (40, 39, 1.0)]:
        key = jax.random.key(num_steps)
        ref = static(set_timesteps(base, num_steps), x, key, eta, 0.8, start)
        out = runtime(num_steps, start, x, key, eta, 0.8)
        np.testing.assert_array_equal(out, ref, err_msg=f"S={num_steps} start={start}")
    assert len(traces) == 1 and runtime._cache_size() == 1


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_runtime_sample_guidance_per_example_keys(impl):
    base = create_state(DDIMConfig(timestep_spacing="trailing"))
    x, keys = latents(2), jax.random.split(jax.random.key(5, impl=impl), SHAPE[0])
    emb = jnp.array([0.0, 0.0, 0.3, -0.2])
    runtime = jax.jit(
        lambda s, start, x, keys: sample(
            guided_model_fn,
            set_timesteps(base, s, max_steps=M),
            x,
            key=keys,
            eta=0.7,
            model_args=(0.8, emb),
            guidance_scale=3.0,
            start_step=start,
        )
    )
    static = static_runner(guided=True)
    ref = static(set_timesteps(base, 12), x, keys, 0.7, 0.8, 2)
    np.testing.assert_array_equal(runtime(12, 2, x, keys), ref)
    assert np.isfinite(runtime(30, 0, x, keys)).all() and runtime._cache_size() == 1


def test_traced_start_step_on_a_static_state():
    state = set_timesteps(create_state(DDIMConfig()), 12)
    x, key = latents(3), jax.random.key(0)
    run = jax.jit(
        lambda st, x, start: sample(model_fn, st, x, key=key, eta=0.5, model_args=(0.8,), start_step=start)
    )
    np.testing.assert_array_equal(run(state, x, 5), static_runner()(state, x, key, 0.5, 0.8, 5))
    assert np.isfinite(run(state, x, 0)).all() and np.isfinite(run(state, x, 11)).all()
    assert run._cache_size() == 1


@pytest.mark.parametrize("config", LOOP_CONFIGS[:2])
def test_runtime_invert_equals_static_bitwise(config):
    base = create_state(DDIMConfig(**config))
    x0 = latents(4)

    def run(state, x, start, trajectory):
        return invert(model_fn, state, x, model_args=(0.8,), start_step=start, return_trajectory=trajectory)

    runtime = jax.jit(
        lambda s, start, x, tr: run(set_timesteps(base, s, max_steps=M), x, start, tr), static_argnums=3
    )
    static = jax.jit(run, static_argnums=(2, 3))
    for num_steps, start in [(10, 0), (25, 7)]:
        state = set_timesteps(base, num_steps)
        _, ref_trajectory = static(state, x0, start, True)
        _, trajectory = runtime(num_steps, start, x0, True)
        rows = num_steps - start
        np.testing.assert_array_equal(trajectory.prev_sample[:rows], ref_trajectory.prev_sample)
        np.testing.assert_array_equal(
            trajectory.pred_original_sample[:rows], ref_trajectory.pred_original_sample
        )
        # Without the trajectory XLA fuses the two loops differently: the last bit may move.
        np.testing.assert_allclose(
            runtime(num_steps, start, x0, False), static(state, x0, start, False), rtol=1e-6, atol=1e-6
        )
    assert runtime._cache_size() == 2  # one program per return_trajectory, none per S or start


def test_a_request_costs_s_minus_start_model_calls():
    calls = []

    def counting_model(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return 0.1 * x

    base = create_state(DDIMConfig())
    run = jax.jit(
        lambda s, start, x: sample(
            counting_model, set_timesteps(base, s, max_steps=1000), x, start_step=start
        )
    )
    for num_steps, start in [(5, 0), (20, 15)]:
        calls.clear()
        jax.block_until_ready(run(num_steps, start, latents(0)))
        jax.effects_barrier()
        assert len(calls) == num_steps - start


def test_runtime_trajectory_and_callback():
    base = create_state(DDIMConfig())
    state, x = set_timesteps(base, 9), latents(5)
    _, ref = sample(model_fn, state, x, model_args=(0.8,), start_step=2, return_trajectory=True)
    seen = []
    run = jax.jit(
        lambda s, start: sample(
            model_fn,
            set_timesteps(base, s, max_steps=M),
            x,
            model_args=(0.8,),
            start_step=start,
            return_trajectory=True,
            callback=lambda i, t, x0: seen.append((int(i), int(t))),
            callback_every=3,
        )
    )
    out, trajectory = run(9, 2)
    jax.effects_barrier()
    assert trajectory.prev_sample.shape == (M, *SHAPE)
    np.testing.assert_allclose(trajectory.prev_sample[:7], ref.prev_sample, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        trajectory.pred_original_sample[:7], ref.pred_original_sample, rtol=1e-6, atol=1e-6
    )
    assert np.isnan(trajectory.prev_sample[7:]).all() and np.isnan(trajectory.pred_original_sample[7:]).all()
    np.testing.assert_array_equal(out, trajectory.prev_sample[6])
    timesteps = np.asarray(state.timesteps).tolist()
    assert seen == [(0, timesteps[2]), (3, timesteps[5]), (6, timesteps[8])]


# --------------------------------------------------------------------------- out of range


def test_out_of_range_runtime_values_give_nan():
    base = create_state(DDIMConfig(steps_offset=1))
    x = latents(6)
    run = jax.jit(
        lambda s, start: sample(
            model_fn, set_timesteps(base, s, max_steps=M), x, model_args=(0.8,), start_step=start
        )
    )
    assert np.isfinite(run(10, 9)).all()
    for num_steps, start in [(0, 0), (M + 1, 0), (-3, 0), (10, 10), (10, -1)]:
        assert np.isnan(run(num_steps, start)).all(), (num_steps, start)
    inv = jax.jit(
        lambda s, start: invert(
            model_fn, set_timesteps(base, s, max_steps=M), x, model_args=(0.8,), start_step=start
        )
    )
    assert np.isnan(inv(0, 0)).all() and np.isnan(inv(10, 12)).all() and np.isfinite(inv(10, 3)).all()
    # leading + steps_offset=1 with S = 1000 pushes a timestep to 1000: static raises, traced gives NaN
    run_big = jax.jit(
        lambda s: sample(model_fn, set_timesteps(base, s, max_steps=1000), x, model_args=(0.8,))
    )
    assert np.isnan(run_big(1000)).all() and np.isfinite(run_big(999)).all()
    # a traced custom schedule that is not descending, or out of range, in its first S entries
    custom = jax.jit(
        lambda ts, s: sample(model_fn, set_timesteps(base, s, timesteps=ts), x, model_args=(0.8,))
    )
    assert np.isfinite(custom(jnp.array([999, 666, 333, 700]), 3)).all()  # entry 3 is padding
    # (spaced by T // S, as the default prev_timestep_rule needs, except the first two)
    for ts in ([900, 500, 700, 100], [900, 500, 500, 100], [1000, 750, 500, 250], [745, 495, 245, -5]):
        assert np.isnan(custom(jnp.array(ts), 4)).all(), ts
    _, trajectory = jax.jit(
        lambda s: sample(
            model_fn, set_timesteps(base, s, max_steps=M), x, model_args=(0.8,), return_trajectory=True
        )
    )(0)
    assert np.isnan(trajectory.prev_sample).all()


def test_python_known_start_step_raises_on_a_runtime_state():
    state, x = set_timesteps(create_state(DDIMConfig()), 8, max_steps=M), latents(0)
    for bad in (-1, 8, 2.0, True, jnp.array([1, 2])):
        with pytest.raises(ValueError, match=r"start_step must be an int in \[0, num_inference_steps=8\)"):
            sample(model_fn, state, x, model_args=(0.8,), start_step=bad)
    with pytest.raises(ValueError, match=r"start_step must be an int in \[0, num_inference_steps=8\)"):
        invert(model_fn, state, x, model_args=(0.8,), start_step=jnp.int32(9))


# --------------------------------------------------------------------------- gradients


def test_gradients_through_the_runtime_loop():
    """Forward mode works and equals the static loop's; reverse mode raises JAX's while-loop
    error; remat=True raises ours, pointing at the static schedule."""
    base = create_state(DDIMConfig(clip_sample=False))
    x = latents(7)

    def loss(w, state):
        return jnp.sum(sample(model_fn, state, x, model_args=(w,), start_step=2) ** 2)

    static_state, runtime_state = set_timesteps(base, 12), set_timesteps(base, 12, max_steps=M)
    tangent_static = jax.jvp(lambda w: loss(w, static_state), (0.8,), (1.0,))[1]
    tangent_runtime = jax.jvp(lambda w: loss(w, runtime_state), (0.8,), (1.0,))[1]
    np.testing.assert_allclose(tangent_runtime, tangent_static, rtol=1e-5)
    np.testing.assert_allclose(jax.grad(loss)(0.8, static_state), tangent_static, rtol=1e-4)
    # Outside jit S and start_step are concrete: fori_loop is then a scan and reverse mode works.
    np.testing.assert_allclose(jax.grad(loss)(0.8, runtime_state), tangent_static, rtol=1e-4)
    traced = jax.jit(jax.grad(lambda w, s: loss(w, set_timesteps(base, s, max_steps=M))))
    with pytest.raises(ValueError, match="Reverse-mode differentiation does not work for lax.while_loop"):
        traced(0.8, 12)
    with pytest.raises(ValueError, match=r"sample\(remat=True\) needs a static schedule"):
        sample(model_fn, runtime_state, x, model_args=(0.8,), remat=True)
    with pytest.raises(ValueError, match=r"invert\(remat=True\) needs a Python int start_step"):
        jax.jit(lambda s: invert(model_fn, static_state, x, model_args=(0.8,), start_step=s, remat=True))(1)


def test_step_works_on_a_runtime_state():
    base = create_state(DDIMConfig(timestep_spacing="trailing"))
    static, runtime = set_timesteps(base, 7), set_timesteps(base, 7, max_steps=M)
    x = latents(8)
    for t in np.asarray(static.timesteps).tolist():
        np.testing.assert_array_equal(
            step(runtime, 0.1 * x, t, x, eta=0.5, key=jax.random.key(t)).prev_sample,
            step(static, 0.1 * x, t, x, eta=0.5, key=jax.random.key(t)).prev_sample,
        )


def test_runtime_key_needs_partitionable_threefry():
    state, x = set_timesteps(create_state(DDIMConfig()), 5, max_steps=M), latents(0)
    previous = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", False)
    try:
        with pytest.raises(ValueError, match="needs jax.config.jax_threefry_partitionable = True"):
            sample(model_fn, state, x, model_args=(0.8,), key=jax.random.key(0), eta=0.5)
    finally:
        jax.config.update("jax_threefry_partitionable", previous)
    keys = jax.random.split(jax.random.key(0, impl="unsafe_rbg"), SHAPE[0])
    with pytest.raises(ValueError, match="cannot take one unsafe_rbg key per example"):
        sample(model_fn, state, x, model_args=(0.8,), key=keys, eta=0.5)
    one = sample(model_fn, state, x, model_args=(0.8,), key=jax.random.key(0, impl="unsafe_rbg"), eta=0.5)
    assert np.isfinite(one).all()


def test_unroll_on_both_loops():
    state, x = set_timesteps(create_state(DDIMConfig()), 10), latents(9)
    for fn in (sample, invert):
        np.testing.assert_allclose(
            fn(model_fn, state, x, model_args=(0.8,), unroll=4),
            fn(model_fn, state, x, model_args=(0.8,)),
            rtol=1e-6,
            atol=1e-6,
        )
        for bad in (0, -1, 2.5, True, None):
            with pytest.raises(ValueError, match="unroll must be an int >= 1"):
                fn(model_fn, state, x, model_args=(0.8,), unroll=bad)
    runtime = set_timesteps(create_state(DDIMConfig()), 10, max_steps=M)  # the runtime loop takes it too
    np.testing.assert_array_equal(
        sample(model_fn, runtime, x, model_args=(0.8,), unroll=4),
        sample(model_fn, runtime, x, model_args=(0.8,)),
    )


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_step_keys_of_m_start_with_those_of_s(impl):
    """The runtime loop's step i uses split(key, M)[i]: equal to the static loop's split(key, S)[i]
    for every key implementation (with jax's default partitionable threefry)."""
    from ddim_jax._noise import step_keys

    keys = [jax.random.key(3, impl=impl)]
    if impl != "unsafe_rbg":  # split under vmap: not a prefix for unsafe_rbg, which sample refuses
        keys.append(jax.random.split(jax.random.key(4, impl=impl), 3))
    for key in keys:
        long = jax.random.key_data(step_keys(key, 1000))
        for s in (1, 7, 50, 999):
            np.testing.assert_array_equal(long[:s], jax.random.key_data(step_keys(key, s)))
