"""DDIMState / create_state / set_timesteps: pytree structure, tables, purity, prev timesteps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddim_jax import DDIMConfig, DDIMState, betas_for_config, create_state, set_timesteps


def test_state_is_pytree_with_static_config():
    config = DDIMConfig(timestep_spacing="trailing")
    state = create_state(config)
    assert len(jax.tree_util.tree_leaves(state)) == 4  # tables; timesteps not set yet
    state = set_timesteps(state, 10)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    assert len(leaves) == 6 and all(isinstance(x, jax.Array) for x in leaves)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, DDIMState) and rebuilt.config is config
    # the config is part of the structure, not a leaf
    other = set_timesteps(create_state(DDIMConfig(timestep_spacing="linspace")), 10)
    assert jax.tree_util.tree_structure(other) != treedef
    doubled = jax.tree_util.tree_map(lambda x: x * 2, state)
    assert doubled.config is config and doubled.num_inference_steps == 10


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_complement_table_keeps_its_digits(set_alpha_to_one):
    """1 - alphas_cumprod is its own float64-made table: float32 ``1 - a`` loses digits near t = 0."""
    config = DDIMConfig(set_alpha_to_one=set_alpha_to_one)
    state = create_state(config)
    exact = 1 - np.cumprod(1 - betas_for_config(config))
    np.testing.assert_array_equal(state.one_minus_alphas_cumprod, exact.astype(np.float32))
    final_complement = 0.0 if set_alpha_to_one else exact[0]  # final alpha: 1, or alphas_cumprod[0]
    assert float(state.final_one_minus_alpha_cumprod) == np.float32(final_complement)
    subtracted = 1 - np.asarray(state.alphas_cumprod, np.float32)
    assert np.abs(subtracted[0] / exact[0] - 1) > 1e-4  # float32 subtraction: 4 digits left
    assert np.abs(np.asarray(state.one_minus_alphas_cumprod[0]) / exact[0] - 1) < 1e-7


def test_jit_over_state_does_not_retrace_on_new_values():
    traces = []

    @jax.jit
    def first_alpha(state):
        traces.append(1)
        return state.alphas_cumprod[state.timesteps[0]]

    a = set_timesteps(create_state(DDIMConfig()), 10)
    b = set_timesteps(create_state(DDIMConfig()), 10)
    first_alpha(a)
    first_alpha(b)
    first_alpha(jax.tree_util.tree_map(lambda x: x, a))
    assert len(traces) == 1
    first_alpha(set_timesteps(a, 20))  # S is a shape: a new trace is expected
    assert len(traces) == 2


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_tables(schedule, zero_snr):
    config = DDIMConfig(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr, set_alpha_to_one=False)
    state = create_state(config)
    ac = np.asarray(state.alphas_cumprod)
    assert state.alphas_cumprod.dtype == jnp.float32 and ac.shape == (1000,)
    assert np.all(np.diff(ac) < 0) and ac[-1] >= 0 and ac[0] < 1
    np.testing.assert_array_equal(ac, np.cumprod(1 - betas_for_config(config)).astype(np.float32))
    assert float(state.final_alpha_cumprod) == ac[0]
    assert (ac[-1] == 0) == zero_snr  # zero terminal SNR exactly
    assert float(create_state(DDIMConfig()).final_alpha_cumprod) == 1.0


def test_set_timesteps_is_pure():
    state = create_state(DDIMConfig(timestep_spacing="trailing"))
    a = set_timesteps(state, 10)
    b = set_timesteps(state, 7)
    assert state.timesteps is None and state.prev_timesteps is None and state.num_inference_steps is None
    assert a.num_inference_steps == 10 and b.num_inference_steps == 7
    np.testing.assert_array_equal(a.timesteps, set_timesteps(state, 10).timesteps)
    np.testing.assert_array_equal(set_timesteps(b, 10).timesteps, a.timesteps)
    assert a.alphas_cumprod is state.alphas_cumprod  # tables shared, not recomputed
    assert a.timesteps.dtype == jnp.int32 and a.prev_timesteps.dtype == jnp.int32
    assert np.all(np.diff(np.asarray(a.timesteps)) < 0)


@pytest.mark.parametrize(
    ("spacing", "steps", "expected"),
    [
        ("leading", 4, [750, 500, 250, 0]),
        ("trailing", 4, [999, 749, 499, 249]),
        ("linspace", 4, [999, 666, 333, 0]),
        ("trailing", 3, [999, 666, 332]),
        ("linspace", 3, [999, 500, 0]),
    ],
)
def test_timesteps_examples(spacing, steps, expected):
    state = set_timesteps(create_state(DDIMConfig(timestep_spacing=spacing)), steps)
    assert state.timesteps.tolist() == expected


def test_prev_timesteps_for_both_rules():
    # trailing, S = 7 does not divide T = 1000: diffusers' rule t - 142 misses the schedule
    timesteps = [999, 856, 713, 570, 428, 285, 142]
    diffusers = set_timesteps(create_state(DDIMConfig(timestep_spacing="trailing")), 7)
    assert diffusers.timesteps.tolist() == timesteps
    assert diffusers.prev_timesteps.tolist() == [t - 142 for t in timesteps]
    schedule = set_timesteps(
        create_state(DDIMConfig(timestep_spacing="trailing", prev_timestep_rule="schedule")), 7
    )
    assert schedule.prev_timesteps.tolist() == timesteps[1:] + [-1]
    # linspace steps by (T - 1) / (S - 1), so diffusers' rule misses even when S divides T
    lin = set_timesteps(
        create_state(DDIMConfig(timestep_spacing="linspace", prev_timestep_rule="schedule")), 10
    )
    assert lin.timesteps.tolist()[:3] == [999, 888, 777] and lin.prev_timesteps.tolist()[:2] == [888, 777]
    # when S divides T (trailing) or for leading, both rules give the same alphas
    for spacing, steps in [("trailing", 10), ("leading", 7), ("leading", 10)]:
        a, b = (
            set_timesteps(create_state(DDIMConfig(timestep_spacing=spacing, prev_timestep_rule=r)), steps)
            for r in ("diffusers", "schedule")
        )
        assert np.maximum(a.prev_timesteps, -1).tolist() == b.prev_timesteps.tolist()
