"""Shared helpers for the benchmark scripts: timing, environment, contenders, markdown."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

# torch's OpenMP threads otherwise spin after each op and slow whatever runs next on a CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ddim_jax  # noqa: E402

# Stable Diffusion's scheduler config: the most common DDIM setting in the wild. No clipping,
# so the hand-written floor below is the whole update.
SD_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)

MODEL_SCALE = 0.1  # the elementwise stand-in model: eps = 0.1 * x, in every contender


def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
    return MODEL_SCALE * x


def on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def state_for(steps: int, **overrides: Any) -> ddim_jax.DDIMState:
    config = ddim_jax.DDIMConfig(**{**SD_CONFIG, **overrides})
    return ddim_jax.set_timesteps(ddim_jax.create_state(config), steps)


# Headline numbers each suite records for run_all's goal table: name -> {label: value}.
SUMMARY: dict[str, dict[str, float]] = {}


# Wall-clock time (time.perf_counter) after which suites skip their remaining cases; run_all's --budget.
DEADLINE: float | None = None


def out_of_time() -> bool:
    return DEADLINE is not None and time.perf_counter() > DEADLINE


def record(name: str, label: str, value: float) -> None:
    SUMMARY.setdefault(name, {})[label] = float(value)


def block(x: Any) -> Any:
    return jax.block_until_ready(x)


# ----------------------------------------------------------------------------- the floor


def floor_coefficients(state: ddim_jax.DDIMState, eta: float = 0.0) -> dict[str, jax.Array]:
    """Per-step scalars of the DDIM update, computed once on the host (float64 -> float32)."""
    table = np.asarray(state.alphas_cumprod, np.float64)
    one_minus = np.asarray(state.one_minus_alphas_cumprod, np.float64)
    t, tp = np.asarray(state.timesteps), np.asarray(state.prev_timesteps)
    a_t, om_t = table[t], one_minus[t]
    a_prev = np.where(tp >= 0, table[np.maximum(tp, 0)], float(state.final_alpha_cumprod))
    om_prev = np.where(tp >= 0, one_minus[np.maximum(tp, 0)], float(state.final_one_minus_alpha_cumprod))
    std = eta * np.sqrt(om_prev / om_t * (1 - a_t / a_prev))
    coef = dict(
        inv_sqrt_a=1 / np.sqrt(a_t),
        sqrt_1ma=np.sqrt(om_t),
        sqrt_a_prev=np.sqrt(a_prev),
        dir=np.sqrt(np.maximum(om_prev - std**2, 0)),
        std=std,
    )
    return {k: jnp.asarray(v, jnp.float32) for k, v in coef.items()}


def floor_sample(
    coef: dict[str, jax.Array], x: jax.Array, timesteps: jax.Array, key=None, model=model_fn
) -> jax.Array:
    """The minimal fused DDIM loop: one lax.scan over precomputed coefficients, nothing else."""
    keys = None if key is None else jax.random.split(key, timesteps.shape[0])

    def body(x, inputs):
        c, t, k = inputs
        eps = model(x, t)
        x0 = (x - c["sqrt_1ma"] * eps) * c["inv_sqrt_a"]
        x = c["sqrt_a_prev"] * x0 + c["dir"] * eps
        if k is not None:
            x = x + c["std"] * jax.random.normal(k, x.shape, x.dtype)
        return x, None

    x, _ = jax.lax.scan(body, x, (coef, timesteps, keys))
    return x


# ----------------------------------------------------------------------------- diffusers


def torch_device() -> str | None:
    """'cuda' when JAX runs on a GPU and torch sees one, 'cpu' on CPU; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    if on_gpu():
        return "cuda" if torch.cuda.is_available() else None
    return "cpu"


def diffusers_runner(shape: Sequence[int], steps: int, eta: float = 0.0) -> tuple[Callable, Callable] | None:
    """(run, result) for diffusers' DDIMScheduler in a pipeline-style Python loop, or None."""
    device = torch_device()
    try:
        import torch
        from diffusers import DDIMScheduler
    except Exception as e:  # missing, or broken against this torch: leave diffusers out, say why
        print(f"[bench] diffusers left out: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    if device is None:
        return None
    sched = DDIMScheduler(**SD_CONFIG)
    sched.set_timesteps(steps, device=device)
    x_T = torch.from_numpy(np.array(latents(shape))).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}

    def run():
        gen = torch.Generator(device=device).manual_seed(0)
        x = x_T
        for t in sched.timesteps:
            eps = MODEL_SCALE * x
            x = sched.step(eps, t, x, eta=eta, generator=gen if eta > 0 else None).prev_sample
        sync()
        out["x"] = x

    def result():
        return out["x"].cpu().numpy()

    return run, result


# ----------------------------------------------------------------------------- timing


def latents(shape: Sequence[int]) -> jax.Array:
    return jax.random.normal(jax.random.key(0), tuple(shape), jnp.float32)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    contenders: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    min_time: float = 0.01,
    stat: Callable[[list[float]], float] = statistics.median,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median (or ``stat``) seconds per call of each contender, timed round-robin (each call blocks).

    ``clock`` may be ``time.process_time`` (CPU seconds of this process, all threads): on a
    CPU shared with other work, a ratio of CPU times is steadier than one of wall times.

    Each round visits the contenders in a fresh random order (no contender always follows
    the same one). Each timed measurement runs a contender ``n`` times back to back, ``n``
    chosen after the warm-up so that one measurement takes at least ``min_time`` seconds.
    """
    number = {}
    for name, fn in contenders.items():
        for _ in range(warmup):
            fn()
        once = timed(fn)
        number[name] = 1 if once >= min_time else min(1000, int(min_time / max(once, 1e-7)) + 1)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    rng = random.Random(0)
    names = list(contenders)
    for _ in range(repeats):
        rng.shuffle(names)
        for name in names:
            fn, n = contenders[name], number[name]
            start = clock()
            for _ in range(n):
                fn()
            times[name].append((clock() - start) / n)
    return {name: stat(ts) for name, ts in times.items()}


def compile_jit(fn: Callable, *args: Any) -> tuple[Callable, float, float]:
    """(compiled, lower seconds, compile seconds) for a fresh ``jax.jit(fn)``."""
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    mid = time.perf_counter()
    compiled = lowered.compile()
    return compiled, mid - start, time.perf_counter() - mid


# ----------------------------------------------------------------------------- reporting


def versions() -> dict[str, str]:
    import jaxlib

    out = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
    for name in ("torch", "diffusers", "flax"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def device_label() -> str:
    d = jax.devices()[0]
    return f"{d.platform}: {d.device_kind}"


def utc_now() -> str:
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"


def env_markdown() -> str:
    d = jax.devices()[0]
    v = versions()
    lines = [
        f"- device: `{d.device_kind}` (platform `{d.platform}`, {len(jax.devices())} device(s)); "
        f"host: {platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- date: {utc_now()}",
    ]
    return "\n".join(lines)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def rel_diff(x: Any, ref: Any) -> str:
    """max |x - ref| / max |ref|, formatted."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return f"{np.max(np.abs(x - ref)) / np.max(np.abs(ref)):.1e}"


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def mib(nbytes: float | None) -> str:
    if nbytes is None:
        return "n/a"
    value = nbytes / 2**20
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (a smoke check)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per contender")
    return p


def default_repeats(quick: bool) -> int:
    if quick:
        return 3
    return 15 if on_gpu() else 5


SECTION_RE = r"<!-- section: (?P<key>.*?) -->\n.*?<!-- end section -->\n"


def has_section(path: str, key: str) -> bool:
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        return f"<!-- section: {key} -->" in f.read()


RESULTS_TITLE = """# Benchmark results

Written by `benchmarks/run_all.py`: one block per device (its heading gives the device, the
library versions and the date, then the goal table), each suite in its own block below it.
A run rewrites only its own device's blocks. Method and commands: [README.md](README.md).
"""


def update_results(path: str, key: str, body: str, title: str = RESULTS_TITLE) -> None:
    """Writes ``body`` as the section ``key`` of the markdown file, keeping the other sections."""
    text = title
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    block_text = f"<!-- section: {key} -->\n{body.rstrip()}\n<!-- end section -->\n"
    pattern = re.compile(SECTION_RE.replace("(?P<key>.*?)", re.escape(key)), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block_text, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block_text
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
