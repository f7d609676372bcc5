"""The ``ddim-jax`` console script: ``ddim-jax demo`` trains, caches, samples and reports.

Five parts, each alone with ``--parts``, the first three by default: ``ddim`` (the DDIM
paper's Tables 1 and 2), ``schedule`` (Lin et al.'s zero terminal SNR, v-prediction and
trailing spacing against Stable Diffusion's setting, on image brightness), ``guidance``
(classifier-free guidance and its rescale), ``inversion`` (DDIM inversion against the exact
EDICT and BDIA, reconstructing and editing held-out digits) and ``brightness`` (Lin et al.'s
first claim with a closed-form perfect model, `ddim_jax.demo.brightness`; no training).
Labelled figures (`ddim_jax.demo.figures`) go beside the tables.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_ETAS",
    "DEFAULT_STEPS",
    "DEFAULT_PARTS",
    "PARTS",
    "build_parser",
    "main",
    "run_demo",
]

DEFAULT_STEPS = (10, 20, 50, 100)
DEFAULT_RECON_STEPS = (10, 20, 50, 100, 1000)
DEFAULT_ETAS = (0.0, 0.5, 1.0)
PARTS = ("ddim", "schedule", "guidance", "inversion", "brightness")
# inversion (about 55 s of CPU) and brightness (minutes) on request: keeps the default run within its budget
DEFAULT_PARTS = PARTS[:3]
_DEMO_MODULES = {
    "flax": "flax",
    "optax": "optax",
    "sklearn": "scikit-learn",
    "tqdm": "tqdm",
    "PIL": "Pillow",
    "matplotlib": "matplotlib",
}


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


MAX_SEED = 2**32 - 1  # jax.random.key overflows past int64; numpy's legacy seeds stop at 2**32 - 1


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32 - 1 = {MAX_SEED}], got {seed}")
    return seed


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated parts from {', '.join(PARTS)}, got {text!r}"
        )
    return parts


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ddim-jax`` (subcommand ``demo``).

    Example:
      >>> from ddim_jax.demo.cli import build_parser
      >>> args = build_parser().parse_args(["demo", "--steps", "10,20", "--parts", "ddim"])
      >>> args.steps, args.parts
      ((10, 20), ('ddim',))
    """
    from ddim_jax.demo.train import DEFAULT_CACHE_DIR, TrainSettings

    parser = argparse.ArgumentParser(prog="ddim-jax", description="ddim_jax command line tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train small class-conditional UNets on the digits, reproduce both papers in miniature",
        description=(
            "Trains two small class-conditional Flax UNets with optax on scikit-learn's 8x8 digits, given "
            "random brightness (cached): Stable Diffusion's schedule with epsilon prediction, and the same "
            "schedule rescaled to zero terminal SNR with v-prediction. Then, per --parts: 'ddim' measures "
            "the DDIM paper's Table 1 (sample quality vs steps S and eta) and Table 2 (reconstruction "
            "error of invert-then-sample vs S); 'schedule' measures Lin et al.'s claim that only zero "
            "terminal SNR with trailing timesteps reproduces the data's spread of image brightness; "
            "'guidance' measures classifier-free guidance scales with and without guidance rescale, and "
            "each guidance method (CFG-Zero*, APG, tangential CFG, CFG++, a window, a schedule) beside CFG; "
            "'inversion' reconstructs and edits held-out digits (d -> (d + 5) % 10) with DDIM inversion, "
            "EDICT and BDIA; 'brightness' samples a closed-form Bayes-optimal model of brightness-level "
            "images under SD's and the zero-SNR schedule at 8x8 to 128x128 (no training). The last two are "
            "not in the default run (--parts ddim,schedule,guidance,inversion,brightness for all five). "
            "Writes PNG grids, labelled figures, results.md and results.json. Defaults take a few minutes "
            "on a 2-core CPU."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument(
        "--parts", type=_parts, default=DEFAULT_PARTS, help=f"which parts to run, from {','.join(PARTS)}"
    )
    demo.add_argument("--out", default="demo_out", help="output directory (PNGs, results.md, results.json)")
    demo.add_argument(
        "--cache-dir",
        default=DEFAULT_CACHE_DIR,
        help="where trained parameters are cached, keyed by a hash of the training settings",
    )
    demo.add_argument("--no-cache", action="store_true", help="neither read nor write the parameter cache")
    demo.add_argument("--seed", type=_seed, default=0, help="seed of training and sampling")
    defaults = TrainSettings()
    train = demo.add_argument_group("training (both models)")
    train.add_argument("--train-steps", type=int, default=defaults.train_steps, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size, help="training batch size")
    train.add_argument(
        "--learning-rate", type=float, default=defaults.learning_rate, help="peak learning rate"
    )
    train.add_argument(
        "--channels", type=_int_list, default=defaults.channels, help="UNet channels per level"
    )
    ddim = demo.add_argument_group("part 'ddim': the DDIM paper's tables (epsilon model, leading spacing)")
    ddim.add_argument("--num-samples", type=int, default=400, help="samples per Table 1 cell")
    ddim.add_argument("--steps", type=_int_list, default=DEFAULT_STEPS, help="Table 1 step counts S")
    ddim.add_argument("--etas", type=_float_list, default=DEFAULT_ETAS, help="Table 1 eta values")
    ddim.add_argument(
        "--recon-steps", type=_int_list, default=DEFAULT_RECON_STEPS, help="Table 2 step counts S"
    )
    ddim.add_argument("--num-recon", type=int, default=50, help="held-out digits reconstructed in Table 2")
    ddim.add_argument(
        "--clip-sample",
        action="store_true",
        help="clip predicted x0 to [-1, 1] at every step (diffusers' default; off here, see README; "
        "not with part inversion)",
    )
    sched = demo.add_argument_group("part 'schedule': zero terminal SNR, v-prediction, trailing spacing")
    sched.add_argument("--schedule-steps", type=_int_list, default=(10, 25, 50), help="step counts S")
    sched.add_argument("--schedule-samples", type=int, default=400, help="samples per cell")
    guide = demo.add_argument_group("part 'guidance': classifier-free guidance and its rescale")
    guide.add_argument(
        "--guidance-scales", type=_float_list, default=(1.0, 3.0, 5.0, 7.5, 10.0), help="guidance scales w"
    )
    guide.add_argument("--guidance-rescales", type=_float_list, default=(0.0, 0.7), help="rescale values phi")
    guide.add_argument("--guidance-steps", type=int, default=25, help="sampling steps S (trailing spacing)")
    guide.add_argument("--per-digit", type=int, default=20, help="samples per digit per cell")
    guide.add_argument(
        "--guidance-methods",
        type=lambda text: tuple(m.strip() for m in text.split(",") if m.strip()),
        default=None,
        help="the guidance methods measured beside CFG at w > 1 (keys of ddim_jax.demo.guiders.GUIDERS; "
        "default: all)",
    )
    inv = demo.add_argument_group(
        "part 'inversion': DDIM inversion, EDICT and BDIA (v-prediction model, trailing spacing)"
    )
    inv.add_argument(
        "--inversion-steps", type=_int_list, default=(10, 20, 50), help="step counts S of each round trip"
    )
    inv.add_argument(
        "--inversion-guidance",
        type=_float_list,
        default=(1.0, 3.0),
        help="guidance scales w used both ways (invert under the digit, sample under it and its edit)",
    )
    inv.add_argument("--inversion-digits", type=int, default=50, help="held-out digits inverted and edited")
    bright = demo.add_argument_group("part 'brightness': the perfect model under each schedule (no training)")
    bright.add_argument(
        "--brightness-sizes",
        type=_int_list,
        default=(8, 32, 64, 128),
        help="image sizes (square, 3 channels)",
    )
    bright.add_argument(
        "--brightness-headline", type=int, default=64, help="the size that runs every S and eta"
    )
    bright.add_argument("--brightness-steps", type=_int_list, default=(10, 25, 50, 200), help="step counts S")
    bright.add_argument("--brightness-etas", type=_float_list, default=(0.0, 1.0), help="eta values")
    bright.add_argument("--brightness-samples", type=int, default=200, help="samples per cell")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _check_dir(flag: str, path: str) -> Path:
    """``path`` as a directory we can write to, created now; a ValueError naming ``flag`` otherwise."""
    directory = Path(path).expanduser()
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"--{flag} must be a directory, got the file {path!r}")
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--{flag} {path!r} cannot be created: {str(existing)!r} is a file")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".ddim_jax_write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--{flag} {path!r} is not a writable directory ({err.strerror})") from None
    return directory


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
    positive("per-digit", args.per_digit)
    positive("inversion-digits", args.inversion_digits)
    if args.clip_sample and "inversion" in args.parts:
        raise ValueError(
            "--clip-sample cannot be used with --parts inversion: exact inversion cannot undo clipping "
            f"(run the other parts with --parts {','.join(p for p in PARTS if p != 'inversion')})"
        )
    if args.schedule_samples < 2:
        raise ValueError(
            f"--schedule-samples must be >= 2 (a covariance needs two), got {args.schedule_samples}"
        )
    if args.brightness_samples < 2:
        raise ValueError(
            f"--brightness-samples must be >= 2 (a spread needs two), got {args.brightness_samples}"
        )
    if any(not 1 <= s <= 512 for s in args.brightness_sizes):
        raise ValueError(f"--brightness-sizes values must be in [1, 512], got {args.brightness_sizes}")
    if args.brightness_headline not in args.brightness_sizes:
        raise ValueError(
            f"--brightness-headline must be one of --brightness-sizes {args.brightness_sizes}, "
            f"got {args.brightness_headline}"
        )
    if any(not 0.0 <= eta <= 1.0 for eta in args.brightness_etas):
        raise ValueError(f"--brightness-etas values must be in [0, 1], got {args.brightness_etas}")
    for name in ("steps", "recon_steps", "schedule_steps", "inversion_steps", "brightness_steps"):
        for s in getattr(args, name):
            if not 1 <= s <= 1000:
                raise ValueError(f"--{name.replace('_', '-')} values must be in [1, 1000], got {s}")
    if not 1 <= args.guidance_steps <= 1000:
        raise ValueError(f"--guidance-steps must be in [1, 1000], got {args.guidance_steps}")
    if any(not 0.0 <= w <= 100.0 for w in args.guidance_scales):
        raise ValueError(f"--guidance-scales values must be in [0, 100], got {args.guidance_scales}")
    if any(not 0.0 <= w <= 100.0 for w in args.inversion_guidance):
        raise ValueError(f"--inversion-guidance values must be in [0, 100], got {args.inversion_guidance}")
    if any(not 0.0 <= phi <= 1.0 for phi in args.guidance_rescales):
        raise ValueError(f"--guidance-rescales values must be in [0, 1], got {args.guidance_rescales}")
    if args.guidance_methods is not None:
        from ddim_jax.demo.guiders import GUIDERS

        unknown = [m for m in args.guidance_methods if m not in GUIDERS]
        if unknown or not args.guidance_methods:
            raise ValueError(f"--guidance-methods must be from {','.join(GUIDERS)}, got {unknown or 'none'}")
    for eta in args.etas:
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"--etas values must be in [0, 1], got {eta}")
    if not 0.0 < args.learning_rate < 1.0:
        raise ValueError(f"--learning-rate must be in (0, 1), got {args.learning_rate}")
    if any(c < 1 for c in args.channels) or len(args.channels) > 3:
        raise ValueError(f"--channels must be 1 to 3 positive ints (8x8 -> 4x4 -> 2x2), got {args.channels}")


class _Clock:
    """Wall and process CPU seconds per part of the run."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.start = self.mark = (time.perf_counter(), time.process_time())

    def lap(self, part: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall[part] = self.wall.get(part, 0.0) + now[0] - self.mark[0]
        self.cpu[part] = self.cpu.get(part, 0.0) + now[1] - self.mark[1]
        self.mark = now

    def total(self) -> tuple[float, float]:
        return time.perf_counter() - self.start[0], time.process_time() - self.start[1]


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the demo's ``args.parts``; returns the results dict also saved as ``results.json``.

    Raises:
      ValueError: for out-of-range arguments and unusable ``--out`` / ``--cache-dir``,
        before any training.

    Example (tiny settings, no parameter cache; the printed tables are swallowed here):
      >>> import contextlib, io, tempfile
      >>> from ddim_jax.demo.cli import build_parser, run_demo
      >>> tiny = "--channels 4 --train-steps 2 --batch-size 4 --num-samples 2 --steps 2 --etas 0"
      >>> tiny += " --recon-steps 2 --num-recon 2 --no-cache --quiet --parts ddim"
      >>> with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
      ...     results = run_demo(build_parser().parse_args(["demo", "--out", out, *tiny.split()]))
      >>> results["params_from_cache"], sorted(results["files"]), list(results["reconstruction"]["mse"])
      ({'epsilon': False}, ['real', 'samples', 'steps'], ['2'])
    """
    _check_args(args)
    out = _check_dir("out", args.out)
    cache_dir = None if args.no_cache else _check_dir("cache-dir", args.cache_dir)
    clock = _Clock()
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from ddim_jax.demo import figures as fig
    from ddim_jax.demo.data import load_digits_split, to_unit_range, vary_brightness
    from ddim_jax.demo.experiments import Sampler, quality_table, reconstruction_table, tables_markdown
    from ddim_jax.demo.fixes import brightness_table, fixes_markdown, guidance_grid_images, guidance_table
    from ddim_jax.demo.guiders import GUIDERS, guiders_figure, guiders_markdown, guiders_table
    from ddim_jax.demo.inversion import METHODS, run_inversion_part
    from ddim_jax.demo.metrics import default_feature_net
    from ddim_jax.demo.png import image_grid, write_png
    from ddim_jax.demo.train import TrainSettings, fixed_settings, load_or_train, make_model

    progress = not args.quiet
    parts = set(args.parts)
    epsilon = TrainSettings(
        channels=tuple(args.channels),
        train_steps=args.train_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    needed = {"epsilon": epsilon} if parts & {"ddim", "schedule"} else {}
    if parts & {"schedule", "guidance", "inversion"}:
        needed["v_prediction"] = fixed_settings(epsilon)
    on_digits = bool(parts - {"brightness"})  # part brightness needs no digits, models nor classifier
    digits = load_digits_split() if on_digits else None
    clock.lap("setup")
    params, cached = {}, {}
    for name, settings in needed.items():
        params[name], cached[name] = load_or_train(
            settings, digits.x_train, digits.y_train, cache_dir, progress=progress
        )
        clock.lap(f"train_{name}" if not cached[name] else f"load_{name}")
        print(f"{name} denoiser: {'loaded from cache' if cached[name] else 'trained'}", file=sys.stderr)
    if on_digits:
        features = default_feature_net(0)  # a fixed metric, comparable across --seed values
        x_reference = np.asarray(vary_brightness(digits.x_train, jax.random.key(100)))
        x_held_out = np.asarray(vary_brightness(digits.x_test, jax.random.key(99)))
        clock.lap("classifier")

    def sampler(name: str, **sampling: Any) -> Sampler:
        settings = needed[name]
        return Sampler(make_model(settings), params[name], settings.scheduler_config(**sampling), bar)

    total = 0
    if "ddim" in parts:
        total += len(args.etas) * sum(args.steps) + 2 * sum(args.recon_steps)
    if "schedule" in parts:
        total += 3 * sum(args.schedule_steps)
    if "guidance" in parts:
        total += len(args.guidance_scales) * len(args.guidance_rescales) * args.guidance_steps
    if "inversion" in parts:  # invert, then sample: per method, S and w
        total += 2 * len(METHODS) * len(args.inversion_guidance) * sum(args.inversion_steps)
    bar = tqdm(total=total, desc="DDIM sampling (all cells)", unit="step", disable=not progress)
    results: dict[str, Any] = {"parts": list(args.parts)}
    files: dict[str, str] = {}
    figures: dict[str, str] = {}  # labelled matplotlib figures (RGBA), apart from the grayscale grids
    markdown = []

    def save_figure(key: str, name: str, draw: Any, *inputs: Any) -> None:
        """Draws one labelled figure (`ddim_jax.demo.figures`) under ``out`` and records it in ``figures``."""
        figures[key] = name
        draw(*inputs, out / name)

    def save_grid(key: str, name: str, images: np.ndarray, ncols: int = 10) -> None:
        """Writes ``images`` ([-1, 1]) as one PNG grid under ``out`` and records it in ``files``."""
        files[key] = name
        write_png(out / name, image_grid(to_unit_range(images), ncols=ncols))

    if "ddim" in parts:
        ddim = sampler("epsilon", clip_sample=args.clip_sample)
        quality, eta0 = quality_table(
            ddim,
            features,
            x_reference,
            x_held_out,
            steps=args.steps,
            etas=args.etas,
            num_samples=args.num_samples,
            seed=args.seed,
        )
        clock.lap("table1")
        recon = reconstruction_table(ddim, x_held_out[: args.num_recon], steps=args.recon_steps)
        clock.lap("table2")
        results.update(quality=quality, reconstruction=recon, ddim_scheduler_config=ddim.config.to_dict())
        markdown.append(tables_markdown(quality, recon))
        if eta0:
            best = max(eta0)
            save_grid("samples", f"samples_S{best}_eta0.png", eta0[best][:100])
            rows = np.concatenate([eta0[s][:10] for s in sorted(eta0)])
            save_grid("steps", "same_noise_by_steps.png", rows)
        save_grid("real", "real_digits.png", x_held_out[:100])
        save_figure("fcd", "fcd_by_steps.png", fig.fcd_by_steps, quality)
    if "schedule" in parts:
        samplers = {
            "a": sampler("epsilon", steps_offset=1),
            "b": sampler("v_prediction", steps_offset=1),
            "c": sampler("v_prediction", timestep_spacing="trailing"),
        }
        brightness, last = brightness_table(
            samplers,
            features,
            x_reference,
            x_held_out,
            steps=args.schedule_steps,
            num_samples=args.schedule_samples,
            seed=args.seed,
        )
        clock.lap("schedule")
        results["brightness"] = brightness
        results["schedule_scheduler_configs"] = {k: v.config.to_dict() for k, v in samplers.items()}
        n = min(20, args.schedule_samples)  # a row each: held-out data, then samplers a, b, c
        rows = np.concatenate([x_held_out[:n], *(last[k][:n] for k in "abc")])
        save_grid("brightness", "brightness_real_a_b_c.png", rows, ncols=n)
        save_figure("schedule", "schedule_fcd.png", fig.schedule_fcd, brightness)
    if "guidance" in parts:
        guided = sampler("v_prediction", timestep_spacing="trailing")
        guidance, samples = guidance_table(
            guided,
            features,
            x_reference,
            scales=args.guidance_scales,
            rescales=args.guidance_rescales,
            num_steps=args.guidance_steps,
            per_digit=args.per_digit,
            seed=args.seed,
        )
        clock.lap("guidance")
        results["guidance"] = guidance
        grid = guidance_grid_images(samples, args.guidance_scales, args.guidance_rescales)
        ncols = 11 * len(args.guidance_rescales) - 1
        save_grid("guidance", "guidance_grid.png", grid, ncols=ncols)
        save_figure("guidance", "guidance_exposure.png", fig.guidance_exposure, guidance)
    markdown.append(fixes_markdown(results.get("brightness"), results.get("guidance")))
    if "guidance" in parts:  # each guidance method beside CFG, at the scales w > 1
        scales = [w for w in args.guidance_scales if w > 1]
        methods, _ = guiders_table(
            guided, features, x_reference, scales=scales, num_steps=args.guidance_steps,
            per_digit=args.per_digit, seed=args.seed, methods=args.guidance_methods or tuple(GUIDERS),
        )  # fmt: skip
        clock.lap("guidance_methods")
        results["guidance_methods"] = dict(methods, figure="guidance_methods.png")
        guiders_figure(methods, out / "guidance_methods.png")
        markdown.append(guiders_markdown(methods))
    if "inversion" in parts:
        n = min(args.inversion_digits, len(x_held_out))
        results["inversion"], inversion_files, text = run_inversion_part(
            sampler("v_prediction", timestep_spacing="trailing"),
            features,
            x_held_out[:n],
            digits.y_test[:n],
            out,
            steps=args.inversion_steps,
            guidance_scales=args.inversion_guidance,
            figures=figures,
        )
        clock.lap("inversion")
        files.update(inversion_files)
        markdown.append(text)
    if "brightness" in parts:
        from ddim_jax.demo import brightness as exact

        print("part brightness: sampling the exact model (no progress bar)", file=sys.stderr)
        h = args.brightness_headline
        results["exact_brightness"], samples = exact.run_part(
            sizes=args.brightness_sizes,
            headline=h,
            steps=args.brightness_steps,
            etas=args.brightness_etas,
            num_samples=args.brightness_samples,
            seed=args.seed,
        )
        clock.lap("brightness")
        table = results["exact_brightness"]
        markdown.append(exact.brightness_markdown(table))
        data = exact.sample_data(
            exact.demo_prior(), jax.random.key(args.seed + 1), (args.brightness_samples, h, h, 3)
        )
        save_figure("brightness_histograms", "brightness_histograms.png", fig.brightness_histograms, table)
        extremes = (samples, np.asarray(data), table["names"])
        save_figure("brightness_extremes", "brightness_extremes.png", fig.brightness_extremes, *extremes)
        save_figure("brightness_by_steps", "brightness_by_steps.png", fig.brightness_by_steps, table)
        save_figure(
            "brightness_by_resolution", "brightness_by_resolution.png", fig.brightness_by_resolution, table
        )
    bar.close()
    clock.lap("images_and_metrics")
    wall, cpu = clock.total()
    results.update(
        train_settings={name: s.to_dict() for name, s in needed.items()},
        params_from_cache=cached,
        seconds=dict(clock.wall, total=wall),
        cpu_seconds=dict(clock.cpu, total=cpu),
        cpu_count=os.cpu_count(),
        device=str(jax.devices()[0].platform),
        files=files,
        figures=figures,
    )
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    split = ", ".join(f"{k} {clock.wall[k]:.1f} s ({clock.cpu[k]:.1f} s CPU)" for k in clock.wall)
    models = (
        f"\nModels: UNet channels {tuple(epsilon.channels)}, {epsilon.train_steps} training steps of batch "
        f"{epsilon.batch_size} each, scaled_linear betas (0.00085 to 0.012), "
        f"T = {epsilon.num_train_timesteps}; "
        f"sampling clip_sample={args.clip_sample} in part ddim, False elsewhere."
    )
    timing = (
        (models if needed else "\nNo trained model (part brightness samples a closed-form one).") + "\n"
        f"Wall time {wall:.1f} s, process CPU time {cpu:.1f} s on {results['device']} with "
        f"{os.cpu_count()} cores. Per part: {split}.\n"
    )
    text = "\n".join(m for m in markdown if m) + timing
    (out / "results.md").write_text(text)
    print(text)
    written = [*files.values(), *figures.values(), "results.md", "results.json"]
    print(f"wrote {', '.join(str(out / f) for f in written)}")
    return results


def _missing_demo_extra() -> list[str]:
    """The pip names of the ``demo`` extra's packages that cannot be imported."""
    missing = []
    for module, package in _DEMO_MODULES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ddim-jax`` console script; returns the exit status.

    Example:
      >>> from ddim_jax.demo.cli import main
      >>> main(["demo", "--num-samples", "1"])  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      SystemExit: 2
    """
    missing = _missing_demo_extra()
    if missing:
        print(
            f"ddim-jax: error: the demo needs the 'demo' extra (missing: {', '.join(missing)}); "
            "install it with: pip install 'ddim_jax[demo]'",
            file=sys.stderr,
        )
        return 2
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
