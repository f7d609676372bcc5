"""Fixed-point inversion against DDIM inversion, EDICT and BDIA on the demo's trained digits UNet.

Each method inverts held-out digits under their own label and its sampler brings them back
(`fixed_point_invert`'s sampler is plain `sample`); the round trip's error is the MSE on
[0, 1] pixels (as the demo's Table 2) and the largest |error| over max |x0|. Without guidance
(w = 1: the conditional model) and with classifier-free guidance (w = 3: each model call on
the doubled batch, counted once). Fixed point: K in {1, 2, 3, 5, 10}, one compiled program per
(S, w) for every K (``iterations`` traced). An ablation runs the literal ReNoise update (the
model's epsilon held fixed in each iteration, instead of its velocity). Times: one inversion
of the batch at the largest S without guidance, process CPU time, median of 3.

Usage: ``python benchmarks/fixed_point_inversion.py [--digits N] [--steps 10 20 50] [--write]``
(``--write`` records the tables in benchmarks/RESULTS.md under this device's
``fixed_point_inversion`` section and draws docs/fixed_point_inversion.png).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import _bench as B
import jax
import jax.numpy as jnp
import numpy as np

import ddim_jax
import ddim_jax._fixed_point as fixed_point_module
from ddim_jax.demo.data import load_digits_split, to_unit_range
from ddim_jax.demo.experiments import trained_sampler
from ddim_jax.demo.train import NULL_LABEL, denoiser_fn

ITERATIONS = (1, 2, 3, 5, 10)
GUIDANCE = (1.0, 3.0)
LOOPS = {  # method -> (invert, sample, inversion model calls per step)
    "ddim": (ddim_jax.invert, ddim_jax.sample, 1),
    "edict": (ddim_jax.edict_invert, ddim_jax.edict_sample, 2),
    "bdia": (ddim_jax.bdia_invert, ddim_jax.bdia_sample, 1),
}
SAMPLING_CALLS = {"ddim": 1, "edict": 2, "bdia": 1, "fixed point": 1}
HERE = os.path.dirname(os.path.abspath(__file__))


def epsilon_held_slope(config, coef):
    """The ablation: d(sampler step)/d(sample) with epsilon held fixed, sqrt(a_prev / a_t)
    (each iteration then is ``inverse_step(z_t, eps(z_next))``, ReNoise's update)."""
    return coef.sqrt_alpha_prev * coef.inv_sqrt_alpha


def loop_args(params, labels, w):
    if w == 1.0:
        return {"model_args": (params, labels)}
    both = jnp.concatenate([jnp.full_like(labels, NULL_LABEL), labels])  # [uncond, cond]
    return {"model_args": (params, both), "guidance_scale": w}


def metrics(recon, x0):
    err = float(np.mean((to_unit_range(np.asarray(recon)) - to_unit_range(x0)) ** 2))
    return {"mse": err, "max_rel_err": float(np.max(np.abs(np.asarray(recon) - x0)) / np.max(np.abs(x0)))}


def seconds(fn, *args):
    """Process CPU seconds of one call (median of 3, compiled already): steadier than wall time
    on a shared CPU."""
    times = []
    for _ in range(3):
        start = time.process_time()
        jax.block_until_ready(fn(*args))
        times.append(time.process_time() - start)
    return statistics.median(times)


def cell_rows(model_fn, params, state, w, x0, labels, ablation, timed):
    """Every method's round trip at one (S, w)."""
    args = lambda p, y: loop_args(p, y, w)  # noqa: E731
    rows = []
    for name, (invert_fn, sample_fn, calls) in LOOPS.items():
        inv = jax.jit(lambda p, x, y, f=invert_fn: f(model_fn, state, x, **args(p, y)))
        back = jax.jit(lambda p, z, y, f=sample_fn: f(model_fn, state, z, **args(p, y)))
        row = metrics(back(params, inv(params, x0, labels), labels), x0)
        rows.append({"method": name, "K": None, "calls": calls, **row})
        rows[-1]["invert_seconds"] = seconds(inv, params, x0, labels) if timed else None
    back = jax.jit(lambda p, z, y: ddim_jax.sample(model_fn, state, z, **args(p, y)))
    variants = {"fixed point": None}
    if ablation:
        variants["fixed point, epsilon held (ablation)"] = epsilon_held_slope
    for name, slope in variants.items():
        original = fixed_point_module.sampler_slope
        fixed_point_module.sampler_slope = slope or original  # read when the program is traced
        try:
            inv = jax.jit(
                lambda p, x, y, k: ddim_jax.fixed_point_invert(model_fn, state, x, iterations=k, **args(p, y))
            )
            for k in ITERATIONS:
                row = metrics(back(params, inv(params, x0, labels, k), labels), x0)
                rows.append({"method": name, "K": k, "calls": 1 + k, **row})
                rows[-1]["invert_seconds"] = seconds(inv, params, x0, labels, k) if timed else None
        finally:
            fixed_point_module.sampler_slope = original
    return rows


def run(num_digits, steps):
    sampler = trained_sampler(progress=False)
    model_fn, params, config = denoiser_fn(sampler.model), sampler.params, sampler.config
    digits = load_digits_split()
    x0 = jnp.asarray(digits.x_test[:num_digits], jnp.float32)
    labels = jnp.asarray(digits.y_test[:num_digits], jnp.int32)
    rows = []
    for s in steps:
        state = ddim_jax.set_timesteps(ddim_jax.create_state(config), s)
        for w in GUIDANCE:
            ablation = w == 1.0 and s != max(steps)
            timed = w == 1.0 and s == max(steps)
            for row in cell_rows(model_fn, params, state, w, x0, labels, ablation, timed):
                rows.append({"S": s, "w": w, **row})
            print(f"S={s} w={w:g} done", flush=True)
    return {"num_digits": num_digits, "steps": list(steps), "config": config.to_dict(), "rows": rows}


def markdown(results):
    rows = results["rows"]
    lines = [
        f"### Round trip on the demo's digits UNet ({results['num_digits']} held-out digits)",
        "",
        B.env_markdown(),
        "",
        "MSE on [0, 1] pixels / largest |error| over max |x0|, per S; calls: model calls per step of the "
        "inversion (then 1 a step to sample back; EDICT 2; with guidance each call is on the doubled batch); "
        f"CPU time: one inversion of the batch (S = {max(results['steps'])}, w = 1), process CPU seconds "
        "relative to DDIM inversion's, measured side by side.",
        "",
    ]
    for w in GUIDANCE:
        header = ["method", "K", "calls / step"] + [f"S = {s}" for s in results["steps"]]
        header += [f"CPU time (S = {max(results['steps'])})"] if w == 1.0 else []
        body = []
        names = []
        for r in rows:
            key = (r["method"], r["K"])
            if r["w"] == w and key not in names:
                names.append(key)
        for method, k in names:
            cells = {r["S"]: r for r in rows if r["w"] == w and (r["method"], r["K"]) == (method, k)}
            ref = next(
                r for r in rows if r["w"] == w and r["method"] == "ddim" and r["S"] == max(results["steps"])
            )
            last = cells.get(max(results["steps"]))
            timed = last and last["invert_seconds"] is not None
            time_cell = f"{last['invert_seconds'] / ref['invert_seconds']:.1f}x" if timed else "-"
            body.append(
                [method, "-" if k is None else k, next(iter(cells.values()))["calls"]]
                + [
                    f"{cells[s]['mse']:.1e} / {cells[s]['max_rel_err']:.1e}" if s in cells else "-"
                    for s in results["steps"]
                ]
                + ([time_cell] if w == 1.0 else [])
            )
        lines += [f"**w = {w:g}**" + (" (no guidance)" if w == 1.0 else " (classifier-free guidance)"), ""]
        lines += [B.table(header, body), ""]
    ddim_seconds = next(
        r for r in rows if r["method"] == "ddim" and r["w"] == 1.0 and r["S"] == max(results["steps"])
    )
    s_max = max(results["steps"])
    lines.append(f"DDIM inversion's CPU time at S = {s_max}, w = 1: {ddim_seconds['invert_seconds']:.3f} s.")
    return "\n".join(lines) + "\n"


def figure(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, steps = results["rows"], results["steps"]
    fig, axes = plt.subplots(
        len(GUIDANCE), len(steps), figsize=(4.2 * len(steps), 3.6 * len(GUIDANCE)), sharey=True, squeeze=False
    )
    styles = {"ddim": ("C3", "--"), "edict": ("C2", ":"), "bdia": ("C4", "-.")}
    for i, w in enumerate(GUIDANCE):
        for j, s in enumerate(steps):
            ax = axes[i][j]
            for name in ("fixed point", "fixed point, epsilon held (ablation)"):
                pts = [
                    (r["K"], r["mse"]) for r in rows if r["method"] == name and r["S"] == s and r["w"] == w
                ]
                if pts:
                    ks, mse = zip(*pts, strict=True)
                    style = (
                        {"color": "C0", "marker": "o"}
                        if name == "fixed point"
                        else {"color": "C1", "marker": "x", "linestyle": "--"}
                    )
                    ax.plot(ks, mse, label=f"{name}: K + 1 calls/step", **style)
            for name, (color, line) in styles.items():
                r = next(r for r in rows if r["method"] == name and r["S"] == s and r["w"] == w)
                ax.axhline(
                    r["mse"],
                    color=color,
                    linestyle=line,
                    label=f"{name} ({r['calls']} call{'s' if r['calls'] > 1 else ''}/step)",
                )
            ax.set_yscale("log")
            ax.set_xticks(ITERATIONS)
            ax.set_title(f"S = {s}, w = {w:g}" + (" (no guidance)" if w == 1.0 else " (CFG)"))
            ax.set_xlabel("fixed-point iterations K per step")
            if j == 0:
                ax.set_ylabel("round-trip MSE ([0, 1] pixels)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="center right")
    fig.suptitle(
        f"Invert, then sample back: {results['num_digits']} held-out digits, "
        "demo UNet (v-prediction, zero terminal SNR)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--digits", type=int, default=50)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    start = time.perf_counter()
    results = run(args.digits, args.steps)
    results["seconds"] = time.perf_counter() - start
    text = markdown(results) + f"\n_Suite wall time: {results['seconds']:.0f} s (a shared 2-core machine)._\n"
    print(text)
    if args.write:
        B.update_results(
            os.path.join(HERE, "RESULTS.md"), f"{B.device_label()} | fixed_point_inversion", text
        )
        docs = os.path.join(HERE, "..", "docs")
        figure(results, os.path.join(docs, "fixed_point_inversion.png"))
        with open(os.path.join(docs, "fixed_point_inversion.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
