"""Draws docs/speed.png from benchmarks/RESULTS.md: time per step of each contender, per device.

Reads the "Scheduler-only loop" table of every device block that has one (CPU and GPU today)
and plots microseconds per step against the latent shape, log scale, one panel per device.
Nothing is measured here: rerun it after `run_all.py` has rewritten RESULTS.md.

    python benchmarks/plot_speed.py [--results benchmarks/RESULTS.md] [--out docs/speed.png]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ["floor (fused scan)", "ddim_jax.sample", "loop of jitted step", "diffusers (torch)"]
SECTION = re.compile(
    r"<!-- section: (?P<device>[^|>]+?) \| scheduler_loop -->\n(?P<body>.*?)<!-- end section -->", re.S
)


def scheduler_loop_tables(text: str) -> dict[str, dict[str, dict[str, float]]]:
    """``{device: {latents: {contender: us_per_step}}}`` from RESULTS.md's scheduler_loop blocks."""
    tables: dict[str, dict[str, dict[str, float]]] = {}
    for match in SECTION.finditer(text):
        rows = tables.setdefault(match["device"].strip(), {})
        for line in match["body"].splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 3 and cells[1] in CONTENDERS:
                rows.setdefault(cells[0], {})[cells[1]] = float(cells[2])
    return tables


def plot(tables: dict[str, dict[str, dict[str, float]]], out: Path) -> None:
    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4.2), sharey=True, squeeze=False)
    width = 0.8 / len(CONTENDERS)
    for ax, (device, rows) in zip(axes[0], tables.items(), strict=True):
        shapes = list(rows)
        x = np.arange(len(shapes))
        for i, name in enumerate(CONTENDERS):
            ax.bar(x + (i - 1.5) * width, [rows[s].get(name, np.nan) for s in shapes], width, label=name)
        ax.set_xticks(x, shapes)
        ax.set_yscale("log")
        name = device.split(": ", 1)[-1]  # "cpu: cpu" -> "cpu", "gpu: NVIDIA H200" -> "NVIDIA H200"
        ax.set_title(f"{name.upper() if name == 'cpu' else name}: 50 DDIM steps, elementwise model")
        ax.set_xlabel("latents (float32)")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("time per step (us, log scale; lower is better)")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "speed.png")
    args = parser.parse_args()
    tables = scheduler_loop_tables(args.results.read_text(encoding="utf-8"))
    if not tables:
        raise SystemExit(f"no scheduler_loop table in {args.results}")
    plot(tables, args.out)


if __name__ == "__main__":
    main()
