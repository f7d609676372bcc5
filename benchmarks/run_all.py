"""Runs the benchmark suite and writes this device's section of ``benchmarks/RESULTS.md``.

The section is keyed by the device (``platform: device_kind``); sections of other devices in
the file are kept. With ``--quick`` (tiny sizes, a smoke check) nothing is written unless
``--out`` is given. If the environment variable ``OUT`` is set (the GPU machine), the section
is also written to ``$OUT/RESULTS_gpu.md`` and the whole file to ``$OUT/RESULTS.md``.

Usage::

  python benchmarks/run_all.py [--quick] [--out FILE] [--only NAME ...] [--note TEXT]
  python benchmarks/run_all.py --merge RESULTS_gpu.md   # fold a section file into RESULTS.md
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
import traceback

import _bench as B

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
# most important first: a run cut short still has the headline numbers
SUITES = (
    "scheduler_loop",
    "eta_noise",
    "compile_time",
    "memory",
    "unet_e2e",
    "dynamic_steps",
    "parallel_sampling",
    "checks_cost",
    "engine",
    "sd_unet",
    "serve_load",
)


def merge(src: str, dst: str) -> None:
    with open(src, encoding="utf-8") as f:
        text = f.read()
    found = list(re.finditer(B.SECTION_RE, text, re.S))
    if not found:
        sys.exit(f"no '<!-- section: ... -->' blocks in {src}")
    for m in found:
        body = m.group(0).split("\n", 1)[1].rsplit("<!-- end section -->", 1)[0]
        B.update_results(dst, m.group("key"), body)
        print(f"merged section {m.group('key')!r} into {dst}")


def _fmt(values: dict[str, float], fmt: str = "{:.2f}") -> str:
    return ", ".join(f"{k}: {fmt.format(v)}" for k, v in values.items())


def sd_goal_rows(sd: dict[str, float], gpu: bool, verdict) -> list[list[str]]:
    """Issue #18's goals for the SD-class UNet (benchmarks/sd_unet.py), GPU targets."""
    rows = []
    groups = [
        ("SD UNet: torch loop / ddim_jax.sample per image, batch 1", ">= 2x on GPU", "torch / sample, B=1",
         "{:.2f}x", lambda v: min(v) >= 2),
        ("SD UNet: sampler's share outside the model", "< 1% on GPU", "outside the model", "{:.2%}",
         lambda v: max(v) < 0.01),
        ("SD UNet: runtime step count / static program", "<= 1.05x on GPU", "runtime / static", "{:.3f}",
         lambda v: max(v) <= 1.05),
    ]  # fmt: skip
    for goal, target, key, fmt, ok in groups:
        values = {k: v for k, v in sd.items() if key in k}
        if values:
            measured = _fmt(values, fmt)
            rows.append(
                [
                    goal,
                    target,
                    measured,
                    verdict(ok(list(values.values())), measured) if gpu else "info (CPU)",
                ]
            )
    return rows


def goals_markdown(summary: dict[str, dict[str, float]], gpu: bool) -> str:
    """The issue's goals, each with its measured value (from the suites' recorded numbers)."""
    rows = []

    def verdict(ok: bool, miss: str) -> str:
        return "met" if ok else f"**missed** ({miss})"

    if "floor" in summary:
        worst = max(summary["floor"].values())
        target = 1.1 if gpu else 1.3
        rows.append(
            [
                "sample within the floor (time ratio, per shape)",
                f"<= {target}x",
                _fmt(summary["floor"]),
                verdict(worst <= target, f"worst {worst:.2f}x"),
            ]
        )
    if "diffusers" in summary:
        worst = min(summary["diffusers"].values())
        ok = worst >= 15 if gpu else True
        rows.append(
            [
                "speedup per step vs diffusers",
                ">= 15x on GPU",
                _fmt(summary["diffusers"], "{:.1f}x"),
                verdict(ok, f"worst {worst:.1f}x") if gpu else "info (CPU)",
            ]
        )
    for impl in ("threefry2x32", "rbg", "unsafe_rbg"):
        values = summary.get(f"eta:{impl}")
        if values:
            worst = max(values.values())
            rows.append(
                [
                    f"eta=1 / eta=0, {impl} keys",
                    "<= 2x on GPU",
                    _fmt(values, "{:.1f}x"),
                    verdict(worst <= 2, f"worst {worst:.1f}x") if gpu else "info (CPU)",
                ]
            )
    if "compile" in summary:
        c = summary["compile"]
        ratio = max(c.values()) / min(c.values())
        rows.append(
            [
                "compile time flat in steps (sample, eta=0, seconds)",
                "flat",
                _fmt(c, "{:.2f}"),
                verdict(ratio <= 1.5, f"max/min {ratio:.1f}x"),
            ]
        )
    mem = summary.get("memory", {})
    b1, b64 = mem.get("B=1, 50 steps, trajectory=False"), mem.get("B=64, 50 steps, trajectory=False")
    if b1 and b64:
        per = b64 / b1
        rows.append(
            [
                "memory O(batch): (output + temp) at B=64 / B=1, no trajectory",
                "about 64, flat in steps",
                f"{per:.1f}",
                verdict(per <= 64 * 1.25, f"{per:.0f}"),
            ]
        )
    steps_mem = {k.split(", ")[1]: v for k, v in mem.items() if k.startswith("B=8") and k.endswith("False")}
    if steps_mem:
        ratio = max(steps_mem.values()) / min(steps_mem.values())
        rows.append(
            [
                "memory flat in steps (B=8, no trajectory, MiB)",
                "flat",
                _fmt({k: v / 2**20 for k, v in steps_mem.items()}, "{:.2f}"),
                verdict(ratio <= 1.1, f"max/min {ratio:.2f}"),
            ]
        )
    rounds = {k: v for k, v in summary.get("parallel_rounds", {}).items() if k.startswith("S=100,")}
    if rounds:
        deltas = summary.get("parallel_fcd_delta", {})
        ok = [k for k, v in rounds.items() if v <= 1 / 3 and abs(deltas.get(k, math.inf)) <= 1]
        rows.append(
            [
                "parallel_sample: rounds / S at S = 100, FCD - sample's in noise stds",
                "<= 1/3, |delta| <= 1",
                "; ".join(
                    f"{k.split(', ')[1]}: {v:.2f} ({deltas.get(k, math.nan):+.1f})" for k, v in rounds.items()
                ),
                verdict(bool(ok), "no tolerance meets both"),
            ]
        )
    latency = {k: v for k, v in summary.get("parallel_latency", {}).items() if "B=1, S=100," in k}
    if latency:
        best = max(latency.values())
        rows.append(
            [
                "parallel_sample: latency speedup vs sample at S = 100, batch 1",
                ">= 2x on GPU",
                _fmt(latency, "{:.2f}x"),
                verdict(best >= 2, f"best {best:.2f}x") if gpu else "info (CPU)",
            ]
        )
    if "unet" in summary:
        rows.append(["UNet: share of time outside the model", "-", _fmt(summary["unet"], "{:.1%}"), "info"])
    if "dynamic" in summary:

        def dynamic_target(label: str) -> float:
            return (1.05 if "UNet" in label else 1.2) if gpu else 1.1

        misses = [f"{k}: {v:.2f}x" for k, v in summary["dynamic"].items() if v > dynamic_target(k)]
        rows.append(
            [
                "runtime step count: runtime / static time per step (issues #11, #22)",
                "<= 1.2x (UNet <= 1.05x) on GPU, <= 1.1x on CPU",
                _fmt(summary["dynamic"], "{:.2f}"),
                verdict(not misses, ", ".join(misses)),
            ]
        )
    programs = summary.get("stream programs", {})
    if "runtime" in programs:
        rows.append(
            [
                "programs compiled for a stream of 20 requests (runtime S and start_step)",
                "1",
                f"{programs['runtime']:.0f} (static: {programs.get('static', float('nan')):.0f})",
                verdict(programs["runtime"] == 1, f"{programs['runtime']:.0f}"),
            ]
        )
    engine = summary.get("engine", {})
    for label, target, ok in [
        ("engine / padded throughput", ">= 1.6x", lambda v: v >= 1.6),
        ("engine / equal S throughput", ">= 1.0x", lambda v: v >= 1.0),
        ("p99 engine / equal S at 60%", "<= 0.5x", lambda v: v <= 0.5),
        ("tick, k=1 / sample step", "<= 1.1x on CPU", lambda v: v <= 1.1),
    ]:
        if label in engine:
            value = f"{engine[label]:.2f}x"
            rows.append(
                [f"serving engine (issue 27): {label}", target, value, verdict(ok(engine[label]), value)]
            )
    rows += sd_goal_rows(summary.get("sd_unet", {}), gpu, verdict)
    if not rows:
        return ""
    return "### Goals (issues #5, #11, #15, #18), from the numbers above\n\n" + B.table(
        ["goal", "target", "measured", "verdict"], rows
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats; writes only with --out")
    p.add_argument("--out", default=None, help=f"markdown file to update (default {DEFAULT_OUT})")
    p.add_argument("--only", nargs="+", choices=SUITES, default=None, help="run only these suites")
    p.add_argument("--note", default="", help="a line added under the section's heading")
    p.add_argument("--budget", type=float, default=None, help="skip suites once this many seconds passed")
    p.add_argument("--merge", metavar="FILE", help="merge the sections of FILE into --out and exit")
    args = p.parse_args()
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if args.merge:
        merge(args.merge, out or DEFAULT_OUT)
        return
    key = B.device_label() + (" (quick)" if args.quick else "")
    env_out = os.environ.get("OUT")
    targets = [path for path in (out, env_out and os.path.join(env_out, "RESULTS_gpu.md")) if path]
    full = args.only is None
    start = time.perf_counter()
    if args.budget is not None:
        B.DEADLINE = start + args.budget
    header = f"## {key}\n\n{B.env_markdown()}\n" + (f"\n**{args.note}**\n" if args.note else "")

    def write(section: str, body: str) -> None:
        for path in targets:
            B.update_results(path, section, body)
        if env_out and out:
            with open(out, encoding="utf-8") as f, open(os.path.join(env_out, "RESULTS.md"), "w") as g:
                g.write(f.read())

    if full or not all(B.has_section(path, key) for path in targets):
        # written first, so that this device's suites follow its heading in the file
        write(key, header + "\n_(run in progress or cut short: the goal table comes at the end)_\n")
    for name in args.only or SUITES:
        t0 = time.perf_counter()
        if args.budget is not None and t0 - start > args.budget:
            text = f"### {name}: skipped (time budget of {args.budget:.0f} s spent)\n"
        else:
            print(f"[run_all] {name} ...", flush=True)
            try:
                text = __import__(name).run(quick=args.quick)
            except Exception:  # keep the other suites' results
                text = f"### {name}: FAILED\n\n```\n{traceback.format_exc(limit=4)}```\n"
            text += f"\n_{name}: {B.utc_now()}, {time.perf_counter() - t0:.0f} s._\n"
        print(text, flush=True)
        write(f"{key} | {name}", text)
    if full:
        goals = goals_markdown(B.SUMMARY, B.on_gpu())
        wall = f"\n_Suite wall time: {time.perf_counter() - start:.0f} s._\n"
        write(key, header + ("\n" + goals + "\n" if goals else "") + wall)
    for path in targets:
        print(f"[run_all] updated {path}")


if __name__ == "__main__":
    main()
