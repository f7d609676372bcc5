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
import os
import re
import sys
import time
import traceback

import _bench as B

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
# most important first: a run cut short still has the headline numbers
SUITES = ("scheduler_loop", "eta_noise", "unet_e2e", "compile_time", "memory")


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
    start = time.perf_counter()
    parts = [f"## {key}\n", B.env_markdown()]
    if args.note:
        parts.append(f"\n**{args.note}**")

    def write(final: bool) -> None:
        status = "" if final else "\n_(run in progress or cut short: later suites missing)_\n"
        body = "\n".join(parts) + status
        if out:
            B.update_results(out, key, body)
        if env_out:
            B.update_results(os.path.join(env_out, "RESULTS_gpu.md"), key, body)
            if out:
                with open(out, encoding="utf-8") as f, open(os.path.join(env_out, "RESULTS.md"), "w") as g:
                    g.write(f.read())

    for name in args.only or SUITES:
        t0 = time.perf_counter()
        if args.budget is not None and t0 - start > args.budget:
            parts.append(f"\n### {name}: skipped (time budget of {args.budget:.0f} s spent)\n")
            continue
        print(f"[run_all] {name} ...", flush=True)
        try:
            text = __import__(name).run(quick=args.quick)
        except Exception:  # keep the other suites' results
            text = f"### {name}: FAILED\n\n```\n{traceback.format_exc(limit=4)}```\n"
        print(text, flush=True)
        parts.append("\n" + text)
        print(f"[run_all] {name} took {time.perf_counter() - t0:.1f} s", flush=True)
        write(final=False)
    parts.append(f"\n_Suite wall time: {time.perf_counter() - start:.0f} s._\n")
    write(final=True)
    if out:
        print(f"[run_all] wrote section {key!r} of {out}")


if __name__ == "__main__":
    main()
