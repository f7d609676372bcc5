"""The ``ddim-jax`` console script: ``ddim-jax demo`` trains, caches, samples and reports."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "run_demo", "build_parser", "DEFAULT_STEPS", "DEFAULT_ETAS"]

DEFAULT_STEPS = (10, 20, 50, 100, 1000)
DEFAULT_ETAS = (0.0, 0.5, 1.0)


def _number_list(kind: type, what: str):
    """An argparse type parsing comma-separated ``kind`` values (``what`` names them in errors)."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one of the {what}, got {text!r}")
        return values

    return parse


_int_list = _number_list(int, "integers")
_float_list = _number_list(float, "numbers")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ddim-jax`` (subcommand ``demo``).

    Example:
      >>> from ddim_jax.demo.cli import build_parser
      >>> build_parser().parse_args(["demo", "--steps", "10,20"]).steps
      (10, 20)
    """
    from ddim_jax.demo.train import TrainSettings

    parser = argparse.ArgumentParser(prog="ddim-jax", description="ddim_jax command line tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a small UNet on scikit-learn's digits, sample it with DDIM, reproduce the paper's tables",
        description=(
            "Trains a small Flax UNet denoiser with optax on scikit-learn's 8x8 digits (cached), samples "
            "it with DDIM, writes PNG grids, and measures the DDIM paper's Table 1 (sample quality vs "
            "steps S and eta) and Table 2 (reconstruction error of invert-then-sample vs S) in miniature. "
            "Defaults take a few minutes on a 2-core CPU."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--out", default="demo_out", help="output directory (PNGs, results.md, results.json)")
    demo.add_argument(
        "--cache-dir",
        default=os.path.join("~", ".cache", "ddim_jax"),
        help="where trained parameters are cached, keyed by a hash of the training settings",
    )
    demo.add_argument("--no-cache", action="store_true", help="neither read nor write the parameter cache")
    demo.add_argument("--seed", type=int, default=0, help="seed of training and sampling")
    defaults = TrainSettings()
    demo.add_argument("--train-steps", type=int, default=defaults.train_steps, help="optimizer steps")
    demo.add_argument("--batch-size", type=int, default=defaults.batch_size, help="training batch size")
    demo.add_argument(
        "--learning-rate", type=float, default=defaults.learning_rate, help="peak learning rate"
    )
    demo.add_argument("--channels", type=_int_list, default=defaults.channels, help="UNet channels per level")
    demo.add_argument("--num-samples", type=int, default=400, help="samples per Table 1 cell")
    demo.add_argument("--steps", type=_int_list, default=DEFAULT_STEPS, help="Table 1 step counts S")
    demo.add_argument("--etas", type=_float_list, default=DEFAULT_ETAS, help="Table 1 eta values")
    demo.add_argument("--recon-steps", type=_int_list, default=DEFAULT_STEPS, help="Table 2 step counts S")
    demo.add_argument("--num-recon", type=int, default=100, help="held-out digits reconstructed in Table 2")
    demo.add_argument(
        "--clip-sample",
        action="store_true",
        help="clip predicted x0 to [-1, 1] at every step (diffusers' default; off here, see README)",
    )
    demo.add_argument(
        "--part",
        choices=("tables", "inversion"),
        default="tables",
        help="tables: the paper's Tables 1 and 2; inversion: DDIM inversion against the exact EDICT "
        "and BDIA round trips on --num-recon held-out digits at --inversion-steps (about a minute)",
    )
    demo.add_argument(
        "--inversion-steps", type=_int_list, default=(10, 20, 50), help="step counts S of --part inversion"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    def positive(name: str, value: Any) -> None:
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")

    positive("train-steps", args.train_steps)
    positive("batch-size", args.batch_size)
    if args.num_samples < 2:
        raise ValueError(
            f"--num-samples must be >= 2 (a covariance needs two samples), got {args.num_samples}"
        )
    positive("num-recon", args.num_recon)
    if args.part == "inversion" and args.clip_sample:
        raise ValueError(
            "--clip-sample cannot be used with --part inversion: exact inversion cannot undo clipping"
        )
    for name in ("steps", "recon_steps", "inversion_steps"):
        for s in getattr(args, name):
            if not 1 <= s <= 1000:
                raise ValueError(f"--{name.replace('_', '-')} values must be in [1, 1000], got {s}")
    for eta in args.etas:
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"--etas values must be in [0, 1], got {eta}")
    if not 0.0 < args.learning_rate < 1.0:
        raise ValueError(f"--learning-rate must be in (0, 1), got {args.learning_rate}")
    if any(c < 1 for c in args.channels) or len(args.channels) > 3:
        raise ValueError(f"--channels must be 1 to 3 positive ints (8x8 -> 4x4 -> 2x2), got {args.channels}")


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the demo for parsed ``args``; returns the results dict also saved as ``results.json``.

    Raises:
      ValueError: for out-of-range arguments.

    Example (tiny settings, no parameter cache; the printed tables are swallowed here):
      >>> import contextlib, io, tempfile
      >>> from ddim_jax.demo.cli import build_parser, run_demo
      >>> tiny = "--channels 4 --train-steps 1 --batch-size 2 --num-samples 2 --steps 2 --etas 0"
      >>> tiny += " --recon-steps 2 --num-recon 2 --no-cache --quiet"
      >>> with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
      ...     results = run_demo(build_parser().parse_args(["demo", "--out", out, *tiny.split()]))
      >>> results["params_from_cache"], sorted(results["files"]), list(results["reconstruction"]["mse"])
      (False, ['real', 'samples', 'steps'], ['2'])
    """
    _check_args(args)
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from ddim_jax.demo.data import load_digits_split, to_unit_range
    from ddim_jax.demo.experiments import Sampler, quality_table, reconstruction_table, tables_markdown
    from ddim_jax.demo.metrics import default_feature_net
    from ddim_jax.demo.png import image_grid, write_png
    from ddim_jax.demo.train import TrainSettings, load_or_train, make_model

    start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    settings = TrainSettings(
        channels=tuple(args.channels),
        train_steps=args.train_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    digits = load_digits_split()
    params, cached = load_or_train(
        settings, digits.x_train, None if args.no_cache else args.cache_dir, progress=progress
    )
    train_time = time.perf_counter() - start
    print(f"denoiser: {'loaded from cache' if cached else 'trained'} in {train_time:.1f} s", file=sys.stderr)
    if args.part == "inversion":
        from ddim_jax.demo.inversion import run_inversion_part

        model = make_model(settings)
        return run_inversion_part(
            args, model, params, settings, digits, out, cached=cached, train_time=train_time, start=start
        )
    features = default_feature_net(0)  # a fixed metric, comparable across --seed values

    n_recon = min(args.num_recon, len(digits.x_test))
    total = len(args.etas) * sum(args.steps) + 2 * sum(args.recon_steps)
    bar = tqdm(total=total, desc="DDIM sampling (all cells)", unit="step", disable=not progress)
    sampler = Sampler(make_model(settings), params, settings.scheduler_config(args.clip_sample), bar)
    t0 = time.perf_counter()
    quality, eta0 = quality_table(
        sampler,
        features,
        digits.x_train,
        digits.x_test,
        steps=args.steps,
        etas=args.etas,
        num_samples=args.num_samples,
        seed=args.seed,
    )
    t1 = time.perf_counter()
    recon = reconstruction_table(sampler, digits.x_test[:n_recon], steps=args.recon_steps)
    t2 = time.perf_counter()
    bar.close()

    files = {}
    if eta0:
        best = max(eta0)
        grid = eta0[best][:100]
        files["samples"] = f"samples_S{best}_eta0.png"
        write_png(out / files["samples"], image_grid(to_unit_range(grid), ncols=10))
        rows = np.concatenate([eta0[s][:10] for s in sorted(eta0)])
        files["steps"] = "same_noise_by_steps.png"
        write_png(out / files["steps"], image_grid(to_unit_range(rows), ncols=10))
    files["real"] = "real_digits.png"
    write_png(out / files["real"], image_grid(to_unit_range(digits.x_test[:100]), ncols=10))

    markdown = tables_markdown(quality, recon)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    results = {
        "quality": quality,
        "reconstruction": recon,
        "train_settings": settings.to_dict(),
        "params_from_cache": cached,
        "scheduler_config": settings.scheduler_config(args.clip_sample).to_dict(),
        "seconds": {"train_or_load": train_time, "table1": t1 - t0, "table2": t2 - t1, "total": wall},
        "cpu_seconds": cpu,
        "cpu_count": os.cpu_count(),
        "device": str(jax.devices()[0].platform),
        "files": files,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    timing = (
        f"\nSampler: ddim_jax.sample, linear betas, T = {settings.num_train_timesteps}, leading timesteps, "
        f"clip_sample={args.clip_sample}; UNet channels {tuple(settings.channels)}, "
        f"{settings.train_steps} training steps of batch {settings.batch_size}.\n"
        f"Wall time {wall:.1f} s (denoiser {'loaded' if cached else 'training'} {train_time:.1f} s, "
        f"Table 1 {t1 - t0:.1f} s, Table 2 {t2 - t1:.1f} s) on {results['device']} with "
        f"{os.cpu_count()} cores; process CPU time {cpu:.1f} s.\n"
    )
    (out / "results.md").write_text(markdown + timing)
    print(markdown + timing)
    print(f"wrote {', '.join(str(out / f) for f in [*files.values(), 'results.md', 'results.json'])}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ddim-jax`` console script; returns the exit status.

    Example:
      >>> from ddim_jax.demo.cli import main
      >>> main(["demo", "--num-samples", "1"])  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      SystemExit: 2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        try:
            run_demo(args)
        except ValueError as err:
            if str(err).startswith("--"):
                print(f"ddim-jax demo: error: {err}", file=sys.stderr)
                raise SystemExit(2) from None
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
