"""The runtime-length loop in every loop: `parallel_sample`, EDICT and BDIA with a traced S and
start_step (bitwise against the static programs, one compilation for a stream of requests, the
model calls of a request, NaN for invalid traced values), and the loop's blocks and ``unroll``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddim_jax
from ddim_jax import (
    BDIALatents,
    DDIMConfig,
    bdia_invert,
    bdia_sample,
    create_state,
    edict_invert,
    edict_sample,
    parallel_sample,
    sample,
    set_timesteps,
)

M = 12  # max_steps: S - start_step = 9 or 12 runs a block of 8 steps, then the remainder
SHAPE = (2, 3, 4, 4)
REQUESTS = [(1, 0), (5, 2), (12, 3), (12, 11)]  # (S, start_step): a block and the remainder, one step
BASE = create_state(DDIMConfig(clip_sample=False, timestep_spacing="trailing"))


def model_fn(x, t, w):
    return jnp.tanh(w * x) + 1e-3 * t.astype(x.dtype)


def latents(seed=0):
    return jax.random.normal(jax.random.key(seed), SHAPE)


LOOPS = {  # name -> loop(state, x, start_step)
    "edict_sample": lambda st, x, k: edict_sample(model_fn, st, x, model_args=(0.8,), start_step=k),
    "edict_invert": lambda st, x, k: edict_invert(model_fn, st, x, model_args=(0.8,), start_step=k),
    "bdia_sample": lambda st, x, k: bdia_sample(model_fn, st, x, gamma=0.9, model_args=(0.8,), start_step=k),
    "bdia_sample from latents": lambda st, x, k: bdia_sample(
        model_fn, st, BDIALatents(x, 0.9 * x), gamma=0.9, model_args=(0.8,), start_step=k
    ),
    "bdia_invert": lambda st, x, k: bdia_invert(model_fn, st, x, gamma=0.9, model_args=(0.8,), start_step=k),
    "parallel_sample": lambda st, x, k: parallel_sample(
        model_fn, st, x, window=4, tolerance=0.0, model_args=(0.8,), start_step=k
    ),
    "parallel_sample, eta and a key": lambda st, x, k: parallel_sample(
        model_fn,
        st,
        x,
        window=3,
        tolerance=0.05,
        key=jax.random.key(3),
        eta=0.5,
        model_args=(0.8,),
        start_step=k,
    ),
}


def runners(loop):
    """The static program (state a jit argument, start_step static) and the runtime one, with
    the runtime one's trace count."""
    traces = []

    def runtime(num_steps, start, x):
        traces.append(1)  # runs only when jax traces (compiles)
        return loop(set_timesteps(BASE, num_steps, max_steps=M), x, start)

    return jax.jit(loop, static_argnums=2), jax.jit(runtime), traces


@pytest.mark.parametrize("name", list(LOOPS))
def test_runtime_loop_equals_static_bitwise_in_one_program(name):
    static, runtime, traces = runners(LOOPS[name])
    x = latents(1)
    for num_steps, start in REQUESTS[1:3] if "key" in name else REQUESTS:  # (slow to compile)
        ref = static(set_timesteps(BASE, num_steps), x, start)
        out = runtime(num_steps, start, x)
        if name.startswith("parallel"):
            assert int(out.iterations) == int(ref.iterations) and bool(out.converged)
            rows = num_steps - start
            np.testing.assert_array_equal(out.residuals[:rows], ref.residuals)
            assert out.residuals.shape == (M,) and np.isnan(out.residuals[rows:]).all()
            out, ref = out.sample, ref.sample
        scan_length = num_steps - start - name.endswith("from latents")
        for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
            if scan_length > 1:
                np.testing.assert_array_equal(got, want, err_msg=f"S={num_steps} start={start}")
            else:  # XLA drops a one-step scan and fuses its step with its neighbours: last bits move
                np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * float(np.abs(want).max()))
    assert len(traces) == 1


@pytest.mark.parametrize("name", [name for name in LOOPS if "key" not in name])
def test_invalid_traced_values_give_nan(name):
    _, runtime, _ = runners(LOOPS[name])
    x = latents(2)
    valid = runtime(5, 4, x)
    assert all(
        np.isfinite(v).all() for v in jax.tree.leaves(valid.sample if name.startswith("par") else valid)
    )
    for num_steps, start in [(0, 0), (M + 1, 0), (5, 5), (5, -1)]:
        out = runtime(num_steps, start, x)
        if name.startswith("parallel"):
            assert not bool(out.converged) and int(out.iterations) == 0
            out = out.sample
        assert all(np.isnan(v).all() for v in jax.tree.leaves(out)), (num_steps, start)


def counted(model):
    calls = []

    def counting_model(x, t, w):
        jax.debug.callback(lambda: calls.append(1))
        return model(x, t, w)

    return counting_model, calls


def test_a_request_costs_its_steps_model_calls():
    """S - start_step steps: EDICT calls the model twice a step, BDIA once (once fewer from
    latents), parallel_sample once a round (batched over the window)."""
    counting_model, calls = counted(model_fn)
    loops = {
        "edict": (
            lambda st, x, k: edict_sample(counting_model, st, x, model_args=(0.8,), start_step=k),
            2,
            0,
        ),
        "bdia": (lambda st, x, k: bdia_invert(counting_model, st, x, model_args=(0.8,), start_step=k), 1, 0),
        "bdia from latents": (
            lambda st, x, k: bdia_sample(
                counting_model, st, BDIALatents(x, x), model_args=(0.8,), start_step=k
            ),
            1,
            -1,
        ),
    }
    x = latents(3)
    for name, (loop, per_step, extra) in loops.items():
        run = jax.jit(lambda s, k, x, loop=loop: loop(set_timesteps(BASE, s, max_steps=M), x, k))
        for num_steps, start in [(12, 1), (4, 0)]:
            calls.clear()
            jax.block_until_ready(run(num_steps, start, x))
            jax.effects_barrier()
            assert len(calls) == per_step * (num_steps - start) + extra, (name, num_steps, start)
    run = jax.jit(
        lambda s, k, x: parallel_sample(
            counting_model, set_timesteps(BASE, s, max_steps=M), x, window=4, model_args=(0.8,), start_step=k
        )
    )
    calls.clear()
    out = jax.block_until_ready(run(10, 2, x))
    jax.effects_barrier()
    assert len(calls) == int(out.iterations) <= 8  # a (batched) call per round, at most S - start


def test_runtime_round_trips_and_partial_inversion():
    """An editing service's two requests in one program each: invert to start_step, sample back."""
    x0 = latents(4)
    for invert_fn, sample_fn, kwargs in [
        (edict_invert, edict_sample, {}),
        (bdia_invert, bdia_sample, {"gamma": 1.0}),
    ]:

        @jax.jit
        def round_trip(num_steps, start, x0, invert_fn=invert_fn, sample_fn=sample_fn, kwargs=kwargs):
            state = set_timesteps(BASE, num_steps, max_steps=M)
            inverted = invert_fn(model_fn, state, x0, model_args=(0.8,), start_step=start, **kwargs)
            return sample_fn(model_fn, state, inverted, model_args=(0.8,), start_step=start, **kwargs)

        for num_steps, start in [(12, 0), (7, 3)]:
            np.testing.assert_allclose(round_trip(num_steps, start, x0), x0, rtol=1e-4, atol=1e-4)
        assert round_trip._cache_size() == 1


@pytest.mark.parametrize("unroll", [1, 3, 8])
def test_runtime_blocks_and_unroll_equal_the_static_loop(unroll):
    """Blocks of 8 (9 at unroll=3) steps then the remainder, for S below, at and above a block,
    and S - start_step calls; the trajectory and callback see every step once, in order."""
    counting_model, calls = counted(model_fn)
    seen = []
    runtime = jax.jit(
        lambda s, k, x: sample(
            counting_model,
            set_timesteps(BASE, s, max_steps=M),
            x,
            model_args=(0.8,),
            start_step=k,
            unroll=unroll,
            return_trajectory=True,
            callback=lambda i, t, x0: seen.append(int(i)),
        )
    )
    static = jax.jit(
        lambda st, x, k: sample(model_fn, st, x, model_args=(0.8,), start_step=k, return_trajectory=True),
        static_argnums=2,
    )
    x = latents(5)
    for num_steps, start in [(3, 0), (8, 0), (12, 1), (12, 0)]:
        calls.clear(), seen.clear()
        out, trajectory = runtime(num_steps, start, x)
        jax.effects_barrier()
        ref, ref_trajectory = static(set_timesteps(BASE, num_steps), x, start)
        np.testing.assert_array_equal(out, ref)
        rows = num_steps - start
        np.testing.assert_array_equal(trajectory.prev_sample[:rows], ref_trajectory.prev_sample)
        assert np.isnan(trajectory.prev_sample[rows:]).all()
        assert len(calls) == rows and sorted(seen) == list(range(rows))  # unrolled: any order
    assert runtime._cache_size() == 1


def test_python_known_errors_of_the_runtime_loops():
    state, x = set_timesteps(BASE, 8, max_steps=M), latents(0)
    for name in ("edict_sample", "bdia_invert", "parallel_sample"):
        loop = getattr(ddim_jax, name)
        with pytest.raises(ValueError, match=r"start_step must be an int in \[0, num_inference_steps=8\)"):
            loop(model_fn, state, x, model_args=(0.8,), start_step=8)
    with pytest.raises(ValueError, match=r"edict_invert\(remat=True\) needs a static schedule"):
        edict_invert(model_fn, state, x, model_args=(0.8,), remat=True)
    with pytest.raises(ValueError, match="unroll must be an int >= 1"):
        bdia_sample(model_fn, state, x, model_args=(0.8,), unroll=0)
    with pytest.raises(ValueError, match="edict_sample needs a config with clip_sample=False"):
        edict_sample(
            model_fn, set_timesteps(create_state(DDIMConfig()), 8, max_steps=M), x, model_args=(0.8,)
        )
