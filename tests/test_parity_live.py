"""Live differential test against diffusers' DDIMScheduler over seeded random configs.

Skipped when diffusers (and torch) are not importable; CI installs both. Each config runs a
full trajectory, both implementations getting the same inputs at every step, plus one step
with per-example timesteps and add_noise / get_velocity. Run with ``-s`` to see the largest errors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from _diffusers_ref import (  # noqa: E402
    check_errors,
    reference_forward,
    reference_per_example,
    reference_timesteps,
    reference_trajectory,
    replay_forward,
    replay_per_example,
    replay_trajectory,
    state_for,
    summarize,
)

import ddim_jax  # noqa: E402

NUM_CONFIGS = 30


def random_case(seed: int) -> dict[str, Any]:
    """A random diffusers config (every option drawn), S, eta and use_clipped_model_output."""
    rng = np.random.default_rng(1000 + seed)
    n_train = int(rng.choice([1000, 1000, 500, 137]))
    config: dict[str, Any] = {"num_train_timesteps": n_train}
    schedule = str(rng.choice(["linear", "scaled_linear", "squaredcos_cap_v2", "trained"]))
    if schedule == "trained":
        config["trained_betas"] = np.sort(rng.uniform(1e-4, 0.05, n_train)).tolist()
    else:
        config["beta_schedule"] = schedule
        config["beta_start"] = float(rng.uniform(1e-4, 1e-3))
        config["beta_end"] = float(rng.uniform(0.01, 0.03))
    steps = int(rng.integers(1, 21))
    spacing = str(rng.choice(["leading", "trailing", "linspace"]))
    offset = int(rng.integers(0, 2))
    if spacing == "leading" and offset >= n_train // steps:
        offset = 0
    config.update(
        timestep_spacing=spacing,
        steps_offset=offset,
        prediction_type=str(rng.choice(["epsilon", "sample", "v_prediction"])),
        clip_sample=bool(rng.random() < 0.5),
        clip_sample_range=float(rng.uniform(0.5, 3.0)),
        thresholding=bool(rng.random() < 0.3),
        dynamic_thresholding_ratio=float(rng.uniform(0.8, 1.0)),
        sample_max_value=float(rng.uniform(1.0, 3.0)),
        set_alpha_to_one=bool(rng.random() < 0.5),
        rescale_betas_zero_snr=bool(rng.random() < 0.3),
    )
    return {
        "config": config,
        "steps": steps,
        "eta": float(rng.choice([0.0, 0.0, 0.3, 1.0])),
        "use_clipped_model_output": bool(rng.random() < 0.3),
        "seed": seed,
    }


CASES = [random_case(seed) for seed in range(NUM_CONFIGS)]
ERRORS: list[tuple] = []


@pytest.mark.parametrize("case", CASES, ids=[f"config{c['seed']}" for c in CASES])
def test_random_config_matches_diffusers(case):
    config, steps, seed = case["config"], case["steps"], case["seed"]
    opts = {"eta": case["eta"], "use_clipped_model_output": case["use_clipped_model_output"]}
    label = f"config{seed} {case}"

    rows = replay_trajectory(config, reference_trajectory(config, steps, seed=seed, **opts), **opts)
    for t, *errors in rows:
        check_errors(f"{label} t={t}", *errors)
        ERRORS.append(tuple(errors))
    assert len(rows) == steps

    ref = reference_per_example(config, steps, seed=seed, **opts)
    errors = replay_per_example(config, ref, steps, **opts)
    check_errors(f"{label} per-example", *errors)
    ERRORS.append(errors)

    errors = replay_forward(config, reference_forward(config, seed=seed))
    check_errors(f"{label} forward", *errors)
    ERRORS.append(errors)

    # timesteps for more S, exactly
    state = state_for(config)
    for s in np.random.default_rng(seed).integers(1, state.config.num_train_timesteps + 1, 5).tolist():
        expected = reference_timesteps(config, s)
        if len(expected) == s + 1:  # diffusers' trailing S + 1 entries ending at -1: ddim_jax keeps S
            assert state.config.timestep_spacing == "trailing" and expected[-1] == -1, (s, expected)
            expected = expected[:s]
        if expected.max() >= state.config.num_train_timesteps:
            with pytest.raises(ValueError, match="steps_offset"):
                ddim_jax.set_timesteps(state, s)
        else:
            np.testing.assert_array_equal(np.asarray(ddim_jax.set_timesteps(state, s).timesteps), expected)


def test_report_largest_errors(capsys):
    if len(ERRORS) < NUM_CONFIGS:  # run alone (-k): nothing collected
        pytest.skip("run with the whole module to see the summary")
    with capsys.disabled():
        print(f"\nlive parity ({NUM_CONFIGS} random configs): {summarize(ERRORS)}")


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_timesteps_match_diffusers_for_every_s(spacing):
    """All S in [1, T] at T = 1000: diffusers' timesteps, except that where numpy's arange gives
    trailing spacing S + 1 entries (S = 61, 103, ...: a last timestep of -1, which diffusers keeps
    and then calls the model at), ddim_jax has the first S."""
    from diffusers import DDIMScheduler

    reference = DDIMScheduler(timestep_spacing=spacing, steps_offset=0)
    state = ddim_jax.create_state(ddim_jax.DDIMConfig(timestep_spacing=spacing))
    extra = []
    for s in range(1, 1001):
        reference.set_timesteps(s)
        expected = reference.timesteps.numpy()
        if len(expected) == s + 1:
            assert spacing == "trailing" and expected[-1] == -1, s
            extra.append(s)
            expected = expected[:s]
        ours = ddim_jax.set_timesteps(state, s).timesteps
        np.testing.assert_array_equal(np.asarray(ours), expected, err_msg=f"S={s}")
    assert len(extra) == (62 if spacing == "trailing" else 0)
