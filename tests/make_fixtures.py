"""Builds the golden parity fixtures from diffusers' ``DDIMScheduler`` (run by hand).

Needs torch and diffusers (``pip install -e ".[test,reference]"``). Inputs come from seeded
numpy RNGs and are stored in the fixture next to diffusers' outputs, so
``tests/test_parity_fixtures.py`` replays them without torch. Usage::

    python tests/make_fixtures.py            # writes tests/fixtures/ddim_parity.npz
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _diffusers_ref as ref  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "ddim_parity.npz")

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
TRAINED = {
    "num_train_timesteps": 100,
    "trained_betas": [round(float(b), 8) for b in np.linspace(0.001, 0.05, 100) ** 1.1 + 1e-4],
}
SCHEDULES = [{"beta_schedule": "linear"}, SD, {"beta_schedule": "squaredcos_cap_v2"}, TRAINED]
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "sample", "v_prediction")


def trajectory_cases() -> list[dict[str, Any]]:
    """Every schedule x spacing x prediction type, the other options varied across the grid,
    then targeted cases (zero SNR, S = 1, S = T, small T, eta = 1 at the last step)."""
    cases = []
    grid = itertools.product(SCHEDULES, SPACINGS, PREDICTIONS)
    for i, (schedule, spacing, prediction) in enumerate(grid):
        config = {
            **schedule,
            "timestep_spacing": spacing,
            "prediction_type": prediction,
            "clip_sample": i % 2 == 0,
            "clip_sample_range": (1.0, 0.5, 2.0)[i % 3],
            "thresholding": i % 3 == 1,
            "dynamic_thresholding_ratio": (0.9, 0.995)[i % 2],
            "sample_max_value": (2.5, 1.5)[i % 2],
            "set_alpha_to_one": i % 4 < 2,
            "steps_offset": 1 if spacing == "leading" and i % 2 else 0,
        }
        cases.append(
            {
                "config": config,
                "steps": (10, 7, 13, 4)[i % 4],
                "eta": (0.0, 0.0, 0.5, 1.0)[i % 4],
                "use_clipped_model_output": i % 5 in (1, 3),
            }
        )
    zsnr = {**SD, "rescale_betas_zero_snr": True, "clip_sample": False, "set_alpha_to_one": False}
    v = {**zsnr, "prediction_type": "v_prediction"}
    targeted = [
        # zero terminal SNR with v-prediction (the combination Lin et al. recommend)
        ({**v, "timestep_spacing": "trailing"}, 10, 0.0, False),
        ({**v, "timestep_spacing": "trailing"}, 7, 1.0, False),
        ({**v, "timestep_spacing": "trailing", "thresholding": True}, 10, 0.0, True),
        ({**v, "timestep_spacing": "linspace", "clip_sample": True}, 9, 0.5, True),
        ({**v, "timestep_spacing": "leading", "steps_offset": 1}, 10, 0.0, False),
        (
            {
                **zsnr,
                "beta_schedule": "squaredcos_cap_v2",
                "prediction_type": "sample",
                "timestep_spacing": "trailing",
            },
            12,
            0.0,
            False,
        ),
        # zero terminal SNR with epsilon: diffusers divides by alphas_cumprod[T-1] == 0 (inf/NaN)
        ({**zsnr, "timestep_spacing": "trailing"}, 10, 0.0, False),
        ({**zsnr, "timestep_spacing": "linspace", "clip_sample": True}, 8, 1.0, True),
        # S = 1, S = T, small T, S not dividing T
        ({"timestep_spacing": "trailing"}, 1, 0.0, False),
        ({"timestep_spacing": "linspace", "clip_sample": False}, 1, 1.0, False),
        ({"timestep_spacing": "leading"}, 1, 0.0, False),
        ({"num_train_timesteps": 20, "timestep_spacing": "leading"}, 20, 0.0, False),
        ({"num_train_timesteps": 20, "timestep_spacing": "trailing", "clip_sample": False}, 20, 1.0, False),
        ({"num_train_timesteps": 20, "timestep_spacing": "linspace"}, 20, 0.0, True),
        ({"num_train_timesteps": 37, "timestep_spacing": "trailing", "beta_end": 0.2}, 5, 0.0, False),
        ({"num_train_timesteps": 37, "timestep_spacing": "leading", "steps_offset": 2}, 5, 0.3, False),
        # eta = 1 with set_alpha_to_one: 1 - a_prev - std^2 is exactly 0 at the last step (#5969)
        ({**SD, "clip_sample": False, "timestep_spacing": "trailing"}, 10, 1.0, False),
        ({**SD, "clip_sample": False, "steps_offset": 1, "set_alpha_to_one": False}, 10, 1.0, True),
    ]
    for config, steps, eta, clipped in targeted:
        cases.append({"config": config, "steps": steps, "eta": eta, "use_clipped_model_output": clipped})
    return cases


def per_example_cases() -> list[dict[str, Any]]:
    return [
        {"config": {}, "steps": 50, "eta": 0.0, "use_clipped_model_output": False},
        {
            "config": {**SD, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                       "timestep_spacing": "trailing", "clip_sample": False},
            "steps": 7, "eta": 1.0, "use_clipped_model_output": False,
        },
        {
            "config": {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample",
                       "timestep_spacing": "linspace", "thresholding": True, "sample_max_value": 2.0},
            "steps": 9, "eta": 0.5, "use_clipped_model_output": True,
        },
        {
            "config": {**TRAINED, "steps_offset": 1, "clip_sample_range": 0.5},
            "steps": 10, "eta": 0.0, "use_clipped_model_output": True,
        },
    ]  # fmt: skip


def forward_cases() -> list[dict[str, Any]]:
    return [{"config": s} for s in SCHEDULES] + [
        {"config": {**SD, "rescale_betas_zero_snr": True}},
        {"config": {"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True}},
    ]


def timestep_cases() -> list[dict[str, Any]]:
    cases = []
    for spacing, n_train, steps, offset in itertools.product(
        SPACINGS, (1000, 999, 100, 37, 2), (1, 2, 3, 7, 10, 50, 1000), (0, 1)
    ):
        if steps > n_train:
            continue
        config = {"num_train_timesteps": n_train, "timestep_spacing": spacing, "steps_offset": offset}
        cases.append({"config": config, "steps": steps})
    return cases


def main() -> None:
    import diffusers
    import torch

    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"diffusers": diffusers.__version__, "torch": torch.__version__, "cases": []}
    errors = []  # (ours vs diffusers, ours vs float64 oracle, diffusers vs oracle)

    def add(kind: str, case: dict[str, Any], data: dict[str, np.ndarray]) -> None:
        idx = len(meta["cases"])
        meta["cases"].append({"kind": kind, **case})
        for name, value in data.items():
            arrays[f"{idx}/{name}"] = value

    for seed, case in enumerate(trajectory_cases()):
        opts = {"eta": case["eta"], "use_clipped_model_output": case["use_clipped_model_output"]}
        data = ref.reference_trajectory(case["config"], case["steps"], seed=seed, **opts)
        add("trajectory", {**case, "seed": seed}, data)
        errors += [row[1:] for row in ref.replay_trajectory(case["config"], data, **opts)]
    for seed, case in enumerate(per_example_cases()):
        opts = {"eta": case["eta"], "use_clipped_model_output": case["use_clipped_model_output"]}
        data = ref.reference_per_example(case["config"], case["steps"], seed=seed, **opts)
        add("per_example", {**case, "seed": seed}, data)
        errors.append(ref.replay_per_example(case["config"], data, case["steps"], **opts))
    for seed, case in enumerate(forward_cases()):
        data = ref.reference_forward(case["config"], seed=seed)
        add("forward", {**case, "seed": seed}, data)
        errors.append(ref.replay_forward(case["config"], data))
    for case in timestep_cases():
        add("timesteps", case, {"timesteps": ref.reference_timesteps(case["config"], case["steps"])})

    arrays["meta"] = np.array(json.dumps(meta))
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    np.savez_compressed(FIXTURE, **arrays)
    print(f"wrote {len(meta['cases'])} cases to {FIXTURE} ({os.path.getsize(FIXTURE) / 1e6:.2f} MB)")
    print(ref.summarize(errors))


if __name__ == "__main__":
    main()
