"""`sample`: parity with a Python loop of `step`, no recompiles, trajectory, callback, dtypes, errors."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddim_jax
from ddim_jax import DDIMConfig, create_state, sample, set_timesteps, step

SHAPE = (2, 3, 4, 4)


def model_fn(x, t, w):
    """A smooth, nonlinear, t-dependent stand-in model with one parameter."""
    return jnp.tanh(w * x) + 1e-3 * t.astype(x.dtype)


def guided_model_fn(x, t, w, emb):
    """Conditioned stand-in: ``emb`` (one value per example of the doubled batch) shifts the output."""
    return jnp.tanh(w * x) * (1 + emb[:, None, None, None]) + 1e-3 * t.astype(x.dtype)


def make_state(steps=10, **config):
    return set_timesteps(create_state(DDIMConfig(**config)), steps)


def latents(seed=0, shape=SHAPE):
    return jax.random.normal(jax.random.key(seed), shape)


def python_loop(state, x, out_fn, *, eta=0.0, key=None):
    """The reference: a Python loop of `step`, step i using ``jax.random.split(key, S)[i]``
    (per example for a batch of keys).

    Each step is one jitted call (compiled once, t traced), to keep the test fast.
    """
    num_steps = state.num_inference_steps
    keys = None
    if key is not None and jnp.ndim(key) == 1:  # one key per example: step i uses split(key[b], S)[i]
        keys = jnp.stack([jax.random.split(k, num_steps) for k in key], axis=1)
    elif key is not None:
        keys = jax.random.split(key, num_steps)

    @jax.jit
    def one_step(x, t, step_key):
        kwargs = {"eta": eta, "key": step_key} if key is not None else {}
        return step(state, out_fn(x, t), t, x, **kwargs).prev_sample

    for i, t in enumerate(np.asarray(state.timesteps).tolist()):
        x = one_step(x, jnp.int32(t), None if keys is None else keys[i])
    return x


CONFIGS = [
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"timestep_spacing": "linspace", "clip_sample": True, "beta_schedule": "scaled_linear"},
    {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    {"timestep_spacing": "trailing", "prev_timestep_rule": "schedule", "clip_sample": False},
]


@pytest.mark.parametrize(
    ("config", "eta"),
    [(CONFIGS[0], 0.0), (CONFIGS[0], 0.7), (CONFIGS[1], 0.0), (CONFIGS[2], 1.0), (CONFIGS[3], 0.4)],
)
def test_sample_equals_python_loop_of_step(config, eta):
    state = make_state(7, **config)
    x, w, key = latents(), 0.8, jax.random.key(3)
    key_or_none = key if eta > 0 else None
    ref = python_loop(state, x, lambda x, t: model_fn(x, t, w), eta=eta, key=key_or_none)
    run = jax.jit(lambda x, w, key, eta: sample(model_fn, state, x, key=key, eta=eta, model_args=(w,)))
    out = run(x, w, key, eta)
    assert out.dtype == jnp.float32 and out.shape == SHAPE
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_sample_with_guidance_equals_python_loop_of_two_calls():
    state = make_state(6, timestep_spacing="trailing", clip_sample=False)
    x, w, scale, phi = latents(), 0.9, 5.0, 0.7
    uncond_emb, cond_emb = jnp.full((2,), -0.3), jnp.array([0.4, 0.8])

    def guided(x, t):
        u = guided_model_fn(x, t, w, uncond_emb)
        c = guided_model_fn(x, t, w, cond_emb)
        cfg = u + scale * (c - u)
        axes = (1, 2, 3)
        rescaled = cfg * jnp.std(c, axis=axes, keepdims=True) / jnp.std(cfg, axis=axes, keepdims=True)
        return phi * rescaled + (1 - phi) * cfg

    ref = python_loop(state, x, guided, eta=0.5, key=jax.random.key(1))
    emb = jnp.concatenate([uncond_emb, cond_emb])
    out = jax.jit(
        lambda x, emb, key, s, r: sample(
            guided_model_fn,
            state,
            x,
            key=key,
            eta=0.5,
            model_args=(w, emb),
            guidance_scale=s,
            guidance_rescale=r,
        )
    )(x, emb, jax.random.key(1), scale, phi)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_interleaved_guidance_layout_equals_concat():
    state = make_state(6, clip_sample=False)
    x, w = latents(), 0.9
    uncond_emb, cond_emb = jnp.full((2,), -0.3), jnp.array([0.4, 0.8])
    calls = []

    def recording_model_fn(x, t, w, emb):
        calls.append(x.shape)
        return guided_model_fn(x, t, w, emb)

    def run(layout, emb):
        return sample(
            recording_model_fn,
            state,
            x,
            key=jax.random.key(1),
            eta=0.5,
            model_args=(w, emb),
            guidance_scale=5.0,
            guidance_rescale=0.7,
            guidance_layout=layout,
        )

    concat = run("concat", jnp.concatenate([uncond_emb, cond_emb]))
    interleaved = run("interleave", jnp.stack([uncond_emb, cond_emb], axis=1).reshape(-1))
    assert calls == [(4, 3, 4, 4), (4, 3, 4, 4)]  # one model call per step (traced once), doubled batch
    np.testing.assert_allclose(interleaved, concat, rtol=1e-6, atol=1e-6)
    # the layouts differ: feeding concat-ordered conditioning to the interleaved layout changes the result
    mixed = run("interleave", jnp.concatenate([uncond_emb, cond_emb]))
    assert not np.allclose(mixed, concat, atol=1e-3)
    with pytest.raises(ValueError, match=r"guidance_layout must be one of \['concat', 'interleave'\]"):
        run("stacked", jnp.concatenate([uncond_emb, cond_emb]))


def test_per_example_keys_equal_python_loop_and_do_not_depend_on_the_batch():
    state = make_state(6, **CONFIGS[0])
    x, w, keys = latents(shape=(4, 3, 4, 4)), 0.8, jax.random.split(jax.random.key(5), 4)
    run = jax.jit(lambda x, keys: sample(model_fn, state, x, key=keys, eta=0.8, model_args=(w,)))
    out = run(x, keys)
    ref = python_loop(state, x, lambda x, t: model_fn(x, t, w), eta=0.8, key=keys)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    # Each example's noise comes from its own key alone: a sub-batch in another order gives the
    # same rows, and legacy uint32 key data gives the same samples as typed keys.
    order = np.array([2, 0])
    np.testing.assert_allclose(run(x[order], keys[order]), out[order], rtol=0, atol=1e-6)
    np.testing.assert_allclose(run(x, jax.random.key_data(keys)), out, rtol=0, atol=1e-6)
    # Distinct keys draw distinct noise: equal latents end as different samples.
    same = run(jnp.broadcast_to(x[:1], x.shape), keys)
    assert float(jnp.min(jnp.max(jnp.abs(same[1:] - same[:1]), axis=(1, 2, 3)))) > 0.1


def test_start_step_runs_the_tail_of_the_schedule():
    """Image-to-image: noise x0 to timesteps[k] with add_noise, then run steps k..S-1 only."""
    state, w, key = make_state(8, **CONFIGS[0]), 0.8, jax.random.key(4)
    x0, noise = latents(1), latents(2)
    k = 3
    x_k = ddim_jax.add_noise(state, x0, noise, state.timesteps[k])
    run = jax.jit(lambda x, key: sample(model_fn, state, x, key=key, eta=0.6, model_args=(w,), start_step=k))
    out = run(x_k, key)
    # The reference: the same steps by hand, step i drawing from split(key, S)[i] as a full run does.
    keys = jax.random.split(key, state.num_inference_steps)
    x = x_k
    for i in range(k, state.num_inference_steps):
        t = int(state.timesteps[i])
        x = step(state, model_fn(x, jnp.int32(t), w), t, x, eta=0.6, key=keys[i]).prev_sample
    np.testing.assert_allclose(out, x, rtol=2e-5, atol=2e-5)
    _, traj = sample(model_fn, state, x_k, model_args=(w,), start_step=k, return_trajectory=True)
    assert traj.prev_sample.shape == (state.num_inference_steps - k, *SHAPE)
    for bad in (-1, 8, 2.0, True):
        with pytest.raises(ValueError, match=r"start_step must be an int in \[0, num_inference_steps=8\)"):
            sample(model_fn, state, x_k, model_args=(w,), start_step=bad)


def primitives(jaxpr) -> set[str]:
    """Names of the primitives in a (closed) jaxpr, nested jaxprs included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    names |= primitives(sub)
    return names


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loop_body_does_no_per_step_scalar_math(prediction_type):
    """The square roots and eta's std for every step are computed before the scan: each step
    runs the model, draws its noise and applies one elementwise update."""
    state = make_state(5, prediction_type=prediction_type, clip_sample=False)
    run = lambda x, key, eta: sample(lambda x, t: 0.1 * x, state, x, key=key, eta=eta)  # noqa: E731
    jaxpr = jax.make_jaxpr(run)(latents(), jax.random.key(0), 0.5)
    (scan,) = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan"]
    body = primitives(scan.params["jaxpr"])
    assert "random_bits" in body or "threefry2x32" in body  # the noise is drawn per step
    assert not body & {"sqrt", "rsqrt", "pow", "integer_pow"}, body
    assert "sqrt" in primitives(jaxpr)  # ... before the loop


def test_no_recompile_across_params_latents_key_eta_guidance():
    state = make_state(5)
    traces = []

    def f(w, x, key, eta, scale, rescale):
        traces.append(1)
        return sample(
            lambda x, t, w: model_fn(x, t, w[0]),
            state,
            x,
            key=key,
            eta=eta,
            model_args=(w,),
            guidance_scale=scale,
            guidance_rescale=rescale,
        )

    jitted = jax.jit(f)
    outs = []
    for i in range(4):
        args = (jnp.array([0.5 + 0.1 * i]), latents(i), jax.random.key(i), 0.25 * i, 1.0 + i, 0.2 * i)
        outs.append(np.asarray(jitted(*args)))
    assert len(traces) == 1
    assert jitted._cache_size() == 1
    assert all(not np.allclose(outs[0], o) for o in outs[1:])
    # The same arguments (the same key) give the same sample; only the key changed gives another.
    args = (jnp.array([0.6]), latents(1), jax.random.key(1), 0.25, 2.0, 0.2)
    np.testing.assert_array_equal(jitted(*args), outs[1])
    assert not np.allclose(jitted(*args[:2], jax.random.key(9), *args[3:]), outs[1])


def _lowered_text(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


def test_params_are_traced_arguments_not_constants():
    """The documented pattern (params as jit arguments) compiles no copy of the weights."""
    state = make_state(3)
    weights = jax.random.normal(jax.random.key(0), (48, 48))
    x = jax.random.normal(jax.random.key(1), (2, 48))

    def dense(x, t, weights):
        return jnp.tanh(x @ weights)

    weight_constant = re.compile(r"constant dense<.*> : tensor<48x48xf32>")
    as_argument = _lowered_text(lambda weights, x: sample(dense, state, x, model_args=(weights,)), weights, x)
    assert not weight_constant.search(as_argument)
    baked = _lowered_text(lambda x: sample(dense, state, x, model_args=(weights,)), x)
    assert weight_constant.search(baked)  # the anti-pattern, so this check can tell them apart

    jitted = jax.jit(lambda weights, x: sample(dense, state, x, model_args=(weights,)))
    a, b = jitted(weights, x), jitted(2 * weights, x)
    assert jitted._cache_size() == 1 and not np.allclose(a, b)


def test_state_can_be_a_jit_argument():
    state = make_state(5)
    jitted = jax.jit(lambda state, x: sample(lambda x, t: 0.1 * x, state, x))
    np.testing.assert_allclose(jitted(state, latents()), sample(lambda x, t: 0.1 * x, state, latents()), 1e-6)


def test_trajectory_shapes_and_last_entry():
    state, x = make_state(6), latents()
    out, traj = sample(model_fn, state, x, model_args=(0.5,), return_trajectory=True)
    assert isinstance(traj, ddim_jax.Trajectory)
    assert traj.prev_sample.shape == (6, *SHAPE) and traj.pred_original_sample.shape == (6, *SHAPE)
    assert traj.prev_sample.dtype == jnp.float32
    np.testing.assert_array_equal(traj.prev_sample[-1], out)
    # Without the trajectory XLA fuses the step differently: equal up to float32 rounding.
    np.testing.assert_allclose(out, sample(model_fn, state, x, model_args=(0.5,)), rtol=1e-6, atol=1e-6)
    # Entry i is step i's output, so step i + 1 starts from it.
    t1 = int(state.timesteps[1])
    ref = step(state, model_fn(traj.prev_sample[0], jnp.int32(t1), 0.5), t1, traj.prev_sample[0])
    np.testing.assert_allclose(traj.prev_sample[1], ref.prev_sample, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(traj.pred_original_sample[1], ref.pred_original_sample, rtol=1e-5, atol=1e-6)


def _temp_bytes(num_steps, return_trajectory, shape=(4, 4, 32, 32)):
    state = make_state(num_steps)
    x = jnp.zeros(shape)

    def f(x, key, eta):
        return sample(
            model_fn, state, x, key=key, eta=eta, model_args=(0.5,), return_trajectory=return_trajectory
        )

    compiled = jax.jit(f).lower(x, jax.random.key(0), 0.5).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("memory_analysis unavailable on this backend")
    return analysis.temp_size_in_bytes + analysis.output_size_in_bytes


def test_memory_does_not_grow_with_steps_without_trajectory():
    latent_bytes = 4 * 4 * 32 * 32 * 4
    small, large = _temp_bytes(10, False), _temp_bytes(200, False)
    # Only O(S) scalars (timesteps, alphas, keys) may grow, far below one latent.
    assert large - small < latent_bytes // 4, (small, large)
    small_traj, large_traj = _temp_bytes(10, True), _temp_bytes(200, True)
    assert large_traj - small_traj >= 2 * 190 * latent_bytes, (small_traj, large_traj)


def test_callback_every_k_steps_and_last_step():
    state, x = make_state(8), latents()
    calls = []

    def callback(i, t, x0):
        calls.append((int(i), int(t), np.asarray(x0)))

    run = jax.jit(
        lambda x: sample(
            model_fn,
            state,
            x,
            model_args=(0.5,),
            return_trajectory=True,
            callback=callback,
            callback_every=3,
        )
    )
    _, traj = jax.block_until_ready(run(x))
    jax.effects_barrier()
    calls.sort(key=lambda c: c[0])  # jax.debug.callback is unordered
    assert [c[0] for c in calls] == [0, 3, 6, 7]
    assert [c[1] for c in calls] == [int(state.timesteps[i]) for i in (0, 3, 6, 7)]
    for i, _, x0 in calls:
        np.testing.assert_array_equal(x0, traj.pred_original_sample[i])


def test_no_callback_no_host_call_in_program():
    state, x = make_state(4), latents()
    plain = _lowered_text(lambda x: sample(model_fn, state, x, model_args=(0.5,)), x)
    with_cb = _lowered_text(lambda x: sample(model_fn, state, x, model_args=(0.5,), callback=print), x)
    assert "callback" not in plain.lower()
    assert "callback" in with_cb.lower()


@pytest.mark.parametrize("model_dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_model_sees_its_dtype_carry_stays_float32(model_dtype):
    state, x = make_state(5), latents()
    seen = []

    def low_model(x, t, w):
        seen.append(x.dtype)
        return jnp.tanh(w.astype(x.dtype) * x)

    w = jnp.asarray(0.5, model_dtype)
    out, traj = jax.jit(
        lambda x, w: sample(
            low_model, state, x, model_args=(w,), model_dtype=model_dtype, return_trajectory=True
        )
    )(x, w)
    assert set(seen) == {jnp.dtype(model_dtype)}
    assert out.dtype == jnp.float32 and traj.prev_sample.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    ref = sample(lambda x, t: jnp.tanh(0.5 * x), state, x)
    np.testing.assert_allclose(out, ref, atol=0.05)  # close to float32, not equal

    # A model that returns its own dtype without model_dtype: output cast back to float32.
    seen.clear()
    out = sample(lambda x, t: low_model(x, t, w).astype(model_dtype), state, x)
    assert seen == [jnp.dtype(jnp.float32)] and out.dtype == jnp.float32
    # Low-precision latents still get a float32 carry and output.
    assert sample(lambda x, t: 0.1 * x, state, x.astype(model_dtype)).dtype == jnp.float32


def test_bad_inputs():
    state, x = make_state(4), latents()
    ok = lambda x, t: 0.1 * x  # noqa: E731
    with pytest.raises(ValueError, match=r"model_fn output has shape \(2, 3\)"):
        sample(lambda x, t: jnp.zeros((2, 3)), state, x)
    with pytest.raises(ValueError, match=r"doubled batch \[uncond, cond\] of shape \(4, 3, 4, 4\)"):
        sample(lambda x, t: jnp.zeros(SHAPE), state, x, guidance_scale=2.0)
    with pytest.raises(ValueError, match="callback_every must be an int >= 1, got 0"):
        sample(ok, state, x, callback=print, callback_every=0)
    with pytest.raises(ValueError, match="callback_every"):
        sample(ok, state, x, callback_every=1.5)
    with pytest.raises(TypeError, match="model_args must be a tuple, got list"):
        sample(ok, state, x, model_args=[1.0])
    with pytest.raises(TypeError, match="callback must be callable"):
        sample(ok, state, x, callback=3)
    with pytest.raises(ValueError, match=r"eta=0.5 > 0 needs a noise source: pass key"):
        sample(ok, state, x, eta=0.5)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        sample(ok, state, x, eta=-1.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="eta is traced.*pass key"):
        jax.jit(lambda eta: sample(ok, state, x, eta=eta))(0.5)
    with pytest.raises(ValueError, match="eta must be a scalar"):
        sample(ok, state, x, eta=jnp.ones(2), key=jax.random.key(0))
    with pytest.raises(TypeError, match="latents must be a float array"):
        sample(ok, state, jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="latents must have a leading batch axis"):
        sample(ok, state, jnp.float32(1.0))
    with pytest.raises(TypeError, match="model_dtype must be a float dtype"):
        sample(ok, state, x, model_dtype=jnp.int8)
    with pytest.raises(ValueError, match="call set_timesteps"):
        sample(ok, create_state(DDIMConfig()), x)
    with pytest.raises(TypeError, match="state must be a DDIMState"):
        sample(ok, DDIMConfig(), x)
    with pytest.raises(TypeError, match="key must be a jax.random key"):
        sample(ok, state, x, eta=0.5, key=0)
    with pytest.raises(ValueError, match=f"key holds {x.shape[0] + 1} keys: one key per example needs batch"):
        sample(ok, state, x, eta=0.5, key=jax.random.split(jax.random.key(0), x.shape[0] + 1))
