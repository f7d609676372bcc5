"""Shared parity machinery: run diffusers' ``DDIMScheduler`` on seeded inputs, replay them in ddim_jax.

torch and diffusers are imported only inside the ``reference_*`` functions, so this module (and
the fixture replay test that uses the ``replay_*`` half) works without them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import ddim_jax

SHAPE = (2, 3, 4, 4)  # batch, channels, height, width (diffusers' thresholding wants >= 2 dims)
# Bound on the normwise relative error against diffusers where diffusers' own float32 round-off
# is small; see `check_errors` for the steps where it is not.
RTOL = 1e-5
# Bound on ddim_jax vs the float64 oracle on every step (measured <= 3.5e-7): float32 round-off.
ORACLE_RTOL = 2e-6


def rel_err(ours: Any, ref: Any) -> float:
    """Normwise relative error ``||ours - ref|| / ||ref||`` (absolute when ``ref`` is zero)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    denom = np.linalg.norm(ref)
    diff = np.linalg.norm(ours - ref)
    return float(diff / denom) if denom > 0 else float(diff)


def diffusers_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """The config without ddim_jax-only keys, ready for ``DDIMScheduler(**kwargs)``."""
    return {k: v for k, v in config.items() if k != "prev_timestep_rule"}


def state_for(config: dict[str, Any], num_inference_steps: int | None = None) -> ddim_jax.DDIMState:
    state = ddim_jax.create_state(ddim_jax.DDIMConfig.from_dict(config))
    return state if num_inference_steps is None else ddim_jax.set_timesteps(state, num_inference_steps)


def _scheduler(config: dict[str, Any]):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**diffusers_kwargs(config))


def _model_output(rng: np.random.Generator, sample: np.ndarray, prediction_type: str) -> np.ndarray:
    """A stand-in model: partly a function of the sample, partly seeded noise."""
    scale = 2.0 if prediction_type == "sample" else 1.0  # x0 beyond [-1, 1] exercises clipping
    return (0.3 * sample + scale * rng.standard_normal(sample.shape)).astype(np.float32)


def reference_trajectory(
    config: dict[str, Any],
    num_inference_steps: int,
    *,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
    seed: int = 0,
    shape: tuple[int, ...] = SHAPE,
) -> dict[str, np.ndarray]:
    """Runs diffusers over a whole trajectory on seeded inputs; returns inputs and outputs per step.

    Step k's input sample is diffusers' output of step k - 1 (a fresh seeded sample where that
    output is not finite, as in zero-SNR + epsilon); replaying these recorded inputs feeds both
    implementations the same input at every step, so errors do not compound.
    """
    import torch

    sched = _scheduler(config)
    sched.set_timesteps(num_inference_steps)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    rec: dict[str, list[np.ndarray]] = {k: [] for k in ("samples", "model_outputs", "noises", "prev", "x0")}
    for t in sched.timesteps.tolist():
        model_output = _model_output(rng, x, config.get("prediction_type", "epsilon"))
        noise = rng.standard_normal(shape).astype(np.float32) if eta > 0 else None
        out = sched.step(
            torch.from_numpy(model_output),
            int(t),
            torch.from_numpy(x),
            eta=eta,
            use_clipped_model_output=use_clipped_model_output,
            variance_noise=None if noise is None else torch.from_numpy(noise),
        )
        rec["samples"].append(x)
        rec["model_outputs"].append(model_output)
        rec["noises"].append(np.zeros(0, np.float32) if noise is None else noise)
        rec["prev"].append(out.prev_sample.numpy())
        rec["x0"].append(out.pred_original_sample.numpy())
        x = out.prev_sample.numpy()
        if not np.isfinite(x).all():
            x = rng.standard_normal(shape).astype(np.float32)
    result = {k: np.stack(v) for k, v in rec.items()}
    result["timesteps"] = sched.timesteps.numpy().astype(np.int64)
    return result


def reference_per_example(
    config: dict[str, Any],
    num_inference_steps: int,
    *,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
    seed: int = 0,
    batch: int = 4,
) -> dict[str, np.ndarray]:
    """One step with a different timestep per example; diffusers is called once per example."""
    import torch

    sched = _scheduler(config)
    sched.set_timesteps(num_inference_steps)
    rng = np.random.default_rng(seed)
    shape = (batch,) + SHAPE[1:]
    timesteps = rng.choice(sched.timesteps.numpy(), size=batch).astype(np.int64)
    sample = rng.standard_normal(shape).astype(np.float32)
    model_output = _model_output(rng, sample, config.get("prediction_type", "epsilon"))
    noise = rng.standard_normal(shape).astype(np.float32)
    prev, x0 = [], []
    for i in range(batch):
        out = sched.step(
            torch.from_numpy(model_output[i : i + 1]),
            int(timesteps[i]),
            torch.from_numpy(sample[i : i + 1]),
            eta=eta,
            use_clipped_model_output=use_clipped_model_output,
            variance_noise=torch.from_numpy(noise[i : i + 1]) if eta > 0 else None,
        )
        prev.append(out.prev_sample.numpy())
        x0.append(out.pred_original_sample.numpy())
    return {
        "timesteps": timesteps,
        "samples": sample,
        "model_outputs": model_output,
        "noises": noise,
        "prev": np.concatenate(prev),
        "x0": np.concatenate(x0),
    }


def reference_forward(config: dict[str, Any], *, seed: int = 0, batch: int = 5) -> dict[str, np.ndarray]:
    """diffusers' ``add_noise`` and ``get_velocity`` with per-example timesteps (incl. 0 and T - 1)."""
    import torch

    sched = _scheduler(config)
    rng = np.random.default_rng(seed)
    n_train = sched.config.num_train_timesteps
    timesteps = np.concatenate([[0, n_train - 1], rng.integers(0, n_train, batch - 2)]).astype(np.int64)
    shape = (batch,) + SHAPE[1:]
    x0 = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    tt = torch.from_numpy(timesteps)
    return {
        "timesteps": timesteps,
        "x0": x0,
        "noise": noise,
        "noisy": sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy(),
        "velocity": sched.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy(),
    }


def reference_timesteps(config: dict[str, Any], num_inference_steps: int) -> np.ndarray:
    sched = _scheduler(config)
    sched.set_timesteps(num_inference_steps)
    return sched.timesteps.numpy().astype(np.int64)


Tables = tuple[np.ndarray, float, np.ndarray, float]


def oracle_tables(config: dict[str, Any]) -> Tables:
    """(alphas_cumprod, final_alpha_cumprod, 1 - alphas_cumprod, 1 - final_alpha_cumprod) by
    diffusers' formulas in float64, written out here independently of ddim_jax."""
    c = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
    c.update(config)
    n = c["num_train_timesteps"]
    if c.get("trained_betas") is not None:
        betas = np.array(c["trained_betas"], np.float64)
    elif c["beta_schedule"] == "linear":
        betas = np.linspace(c["beta_start"], c["beta_end"], n)
    elif c["beta_schedule"] == "scaled_linear":
        betas = np.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, n) ** 2
    else:
        ab = np.cos((np.arange(n + 1) / n + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1 - ab[1:] / ab[:-1], 0.999)
    if c.get("rescale_betas_zero_snr", False):
        s = np.sqrt(np.cumprod(1 - betas))
        s = (s - s[-1]) * s[0] / (s[0] - s[-1])
        betas = 1 - np.concatenate([s[:1] ** 2, s[1:] ** 2 / s[:-1] ** 2])
    alphas_cumprod = np.cumprod(1 - betas)
    final = 1.0 if c.get("set_alpha_to_one", True) else float(alphas_cumprod[0])
    return alphas_cumprod, final, 1 - alphas_cumprod, 1 - final


def oracle_step(
    config: dict[str, Any],
    tables: Tables,
    prev_t: int,
    t: int,
    model_output: np.ndarray,
    sample: np.ndarray,
    eta: float,
    noise: np.ndarray,
    use_clipped_model_output: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' DDIMScheduler.step in float64 numpy, for one scalar timestep ``t``; ``1 - a``
    is read from the complement table (equal to it in float64, and ddim_jax's layout)."""
    with np.errstate(all="ignore"):  # inf / NaN where diffusers' arithmetic gives them
        return _oracle_step(
            config, tables, prev_t, t, model_output, sample, eta, noise, use_clipped_model_output
        )


def oracle_x0_and_eps(
    config: dict[str, Any], a_t: float, om_t: float, model_output: np.ndarray, sample: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' (x0, epsilon) in float64, x0 thresholded or clipped per the config."""
    c = {"prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.0}
    c.update(config)
    mo, x = model_output.astype(np.float64), sample.astype(np.float64)
    if c["prediction_type"] == "epsilon":
        x0, eps = (x - np.sqrt(om_t) * mo) / np.sqrt(a_t), mo
    elif c["prediction_type"] == "sample":
        x0, eps = mo, (x - np.sqrt(a_t) * mo) / np.sqrt(om_t)
    else:
        x0, eps = np.sqrt(a_t) * x - np.sqrt(om_t) * mo, np.sqrt(a_t) * mo + np.sqrt(om_t) * x
    if c.get("thresholding", False):
        flat = x0.reshape(x0.shape[0], -1)
        q = np.quantile(np.abs(flat), c.get("dynamic_thresholding_ratio", 0.995), axis=1)
        q = np.clip(q, 1.0, c.get("sample_max_value", 1.0))[:, None]
        x0 = (np.clip(flat, -q, q) / q).reshape(x0.shape)
    elif c["clip_sample"]:
        x0 = np.clip(x0, -c["clip_sample_range"], c["clip_sample_range"])
    return x0, eps


def _oracle_step(config, tables, prev_t, t, model_output, sample, eta, noise, use_clipped_model_output):
    ac, final, om, final_om = tables  # om: one minus alphas_cumprod
    a_t, om_t = ac[t], om[t]
    a_prev, om_prev = (ac[prev_t], om[prev_t]) if prev_t >= 0 else (final, final_om)
    x0, eps = oracle_x0_and_eps(config, a_t, om_t, model_output, sample)
    if use_clipped_model_output:
        eps = (sample.astype(np.float64) - np.sqrt(a_t) * x0) / np.sqrt(om_t)
    std = eta * np.sqrt(om_prev / om_t * ((om_t - om_prev) / a_prev))  # 1 - a_t / a_prev, exactly
    prev = np.sqrt(a_prev) * x0 + np.sqrt(max(om_prev - std**2, 0.0)) * eps
    if eta > 0:
        prev = prev + std * noise
    return prev, x0


def _noise_args(eta: float, noise: np.ndarray) -> dict[str, Any]:
    return {"eta": eta, "variance_noise": noise} if eta > 0 else {}


def max_rel_err(ours: tuple, refs: tuple) -> float:
    """The largest `rel_err` over matching pairs of outputs."""
    return max(rel_err(o, r) for o, r in zip(ours, refs, strict=True))


Errors = tuple[float, float, float]


def _errors(ours: tuple, ref: tuple, orc: tuple) -> Errors:
    """Worst normwise relative errors over the outputs: (ours vs diffusers, ours vs float64
    oracle, diffusers vs oracle); NaN where an operand is not finite (diffusers and the oracle
    at zero-SNR + epsilon, t = T - 1)."""
    nan = float("nan")
    ref_ok = all(np.isfinite(r).all() for r in ref)
    orc_ok = all(np.isfinite(w).all() for w in orc)
    e_ref = max_rel_err(ours, ref) if ref_ok else nan
    e_orc = max_rel_err(ours, orc) if orc_ok else nan
    e_dif = max_rel_err(ref, orc) if ref_ok and orc_ok else nan
    return e_ref, e_orc, e_dif


def check_errors(label: str, e_ref: float, e_orc: float, e_dif: float) -> None:
    """Asserts ddim_jax is within float32 round-off of exact (float64) arithmetic on every step,
    and agrees with diffusers itself up to diffusers' own round-off.

    Where a step is ill-conditioned in float32 (``1 - a`` for ``a`` near 1, diffusers' float32
    zero-SNR rescale), diffusers' distance from the float64 oracle (``e_dif``) is large, and the
    two implementations may differ by that much; ddim_jax's tables keep those digits.
    """
    if not np.isnan(e_orc):
        assert e_orc <= ORACLE_RTOL, f"{label}: ddim_jax vs float64 oracle {e_orc:.2e} > {ORACLE_RTOL:.0e}"
    if not np.isnan(e_ref):
        bound = RTOL + (0.0 if np.isnan(e_dif) else e_dif)
        assert e_ref <= bound, f"{label}: ddim_jax vs diffusers {e_ref:.2e} > {bound:.2e}"


def replay_trajectory(
    config: dict[str, Any],
    ref: dict[str, np.ndarray],
    *,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
) -> list[tuple[int, float, float, float, float]]:
    """Feeds ddim_jax the recorded inputs step by step.

    Returns ``(t, *errors)`` per step (see `_errors`). ddim_jax's outputs must be finite
    float32 at every step, even where diffusers' are not (zero-SNR + epsilon at t = T - 1;
    eta = 1 round-off, diffusers #5969).
    """
    state = state_for(config, len(ref["timesteps"]))
    np.testing.assert_array_equal(np.asarray(state.timesteps), ref["timesteps"])
    tables = oracle_tables(config)
    ratio = state.config.num_train_timesteps // len(ref["timesteps"])
    rows = []
    for k, t in enumerate(ref["timesteps"].tolist()):
        inputs = (ref["model_outputs"][k], ref["samples"][k])
        noise = ref["noises"][k]
        out = ddim_jax.step(
            state, inputs[0], t, inputs[1], use_clipped_model_output=use_clipped_model_output,
            **_noise_args(eta, noise),
        )  # fmt: skip
        assert out.prev_sample.dtype == np.float32 and out.pred_original_sample.dtype == np.float32
        ours = (np.asarray(out.prev_sample), np.asarray(out.pred_original_sample))
        assert all(np.isfinite(o).all() for o in ours), f"non-finite ddim_jax output at t={t}"
        args = (t - ratio, t, *inputs, eta, noise, use_clipped_model_output)
        orc = oracle_step(config, tables, *args)
        rows.append((t, *_errors(ours, (ref["prev"][k], ref["x0"][k]), orc)))
    return rows


def replay_per_example(
    config: dict[str, Any],
    ref: dict[str, np.ndarray],
    num_inference_steps: int,
    *,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
) -> Errors:
    """One batched ddim_jax step with per-example timesteps; errors as in `_errors`."""
    state = state_for(config, num_inference_steps)
    out = ddim_jax.step(
        state,
        ref["model_outputs"],
        np.asarray(ref["timesteps"], np.int32),
        ref["samples"],
        use_clipped_model_output=use_clipped_model_output,
        **_noise_args(eta, ref["noises"]),
    )
    ratio = state.config.num_train_timesteps // num_inference_steps
    tables = oracle_tables(config)
    per = [
        oracle_step(
            config,
            tables,
            t - ratio,
            t,
            ref["model_outputs"][i : i + 1],
            ref["samples"][i : i + 1],
            eta,
            ref["noises"][i : i + 1],
            use_clipped_model_output,
        )
        for i, t in enumerate(ref["timesteps"].tolist())
    ]
    oracle = (np.concatenate([o[0] for o in per]), np.concatenate([o[1] for o in per]))
    return _errors((out.prev_sample, out.pred_original_sample), (ref["prev"], ref["x0"]), oracle)


def replay_forward(config: dict[str, Any], ref: dict[str, np.ndarray]) -> Errors:
    """ddim_jax's add_noise and get_velocity on the recorded inputs; errors as in `_errors`."""
    state = state_for(config)
    t = np.asarray(ref["timesteps"], np.int32)
    ours = (
        ddim_jax.add_noise(state, ref["x0"], ref["noise"], t),
        ddim_jax.get_velocity(state, ref["x0"], ref["noise"], t),
    )
    x0, noise = ref["x0"].astype(np.float64), ref["noise"].astype(np.float64)
    ac, _, om, _ = oracle_tables(config)
    shape = (-1, *([1] * (x0.ndim - 1)))
    a, s = np.sqrt(ac[ref["timesteps"]]).reshape(shape), np.sqrt(om[ref["timesteps"]]).reshape(shape)
    oracle = (a * x0 + s * noise, a * noise - s * x0)
    return _errors(ours, (ref["noisy"], ref["velocity"]), oracle)


def summarize(errors: list[Errors]) -> str:
    """One line: the largest errors over all compared steps (NaN-aware)."""
    e = np.array(errors, np.float64).reshape(-1, 3)
    well = e[:, 2] < RTOL  # steps where diffusers itself is within float32 round-off of float64
    return (
        f"{len(e)} steps: max ddim_jax vs diffusers {np.nanmax(e[:, 0]):.2e} "
        f"(well-conditioned steps {np.nanmax(np.where(well, e[:, 0], np.nan)):.2e}); "
        f"max ddim_jax vs float64 oracle {np.nanmax(e[:, 1]):.2e}; "
        f"max diffusers vs float64 oracle {np.nanmax(e[:, 2]):.2e}; "
        f"diffusers non-finite steps {int(np.isnan(e[:, 0]).sum())}"
    )
