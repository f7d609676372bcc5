"""An HTTP server on `ddim_jax.Engine`: validated requests, a bounded queue, health and metrics,
client disconnects cancelled, graceful shutdown, and warm restarts from JAX's compilation cache.

The web stack is aiohttp (``pip install -e ".[serve]"``): one asyncio package with the server and
the client the load test (``benchmarks/serve_load.py``) needs, maintained by aio-libs since 2014,
with request-size limits, handler cancellation on client disconnect and ``SO_REUSEPORT`` built in.
The engine is not thread-safe, so one thread drives it (submit, cancel, ``step``) fed by a queue;
results go back to the asyncio loop with ``loop.call_soon_threadsafe``.

The default model is the demo's class-conditional digits UNet (8x8, one channel), trained once
with the demo's settings and cached under ``~/.cache/ddim_jax`` exactly as ``ddim-jax demo``
caches it (about a minute on 2 CPU cores; ``--train-steps`` for fewer, ``--untrained`` for
random weights). Compiled programs are written to JAX's persistent compilation cache
(``--compile-cache``), so a restarted server loads them instead of compiling.

Endpoints (all on 127.0.0.1 unless ``--host`` says otherwise):

- ``POST /generate``, JSON body: ``class`` (0-9, or null for unconditional), ``steps``
  (1 to ``--max-steps``), ``guidance_scale`` (0-20), ``eta`` (0-1), ``seed`` (0 to 2**32 - 1;
  drawn at random if absent), ``init_image`` (8x8 nested list of pixel values in [0, 1]) with
  ``strength`` (0, 1], ``format`` ("png" or "json"). 200: the image; 400: malformed JSON;
  413: body over ``--max-body``; 422: an invalid field (named in ``field``); 429: queue full;
  503: shutting down or waited past ``--request-timeout``. 429 and 503 carry ``Retry-After``.
- ``GET /healthz``: 200 ``{"status": "ok"}`` while serving, 503 ``draining`` during shutdown.
- ``GET /metrics``: queue depth, busy slots, requests done / refused / cancelled, throughput,
  latency percentiles, RSS (JSON).

SIGTERM (or SIGINT) drains: the listening socket closes at once (with ``--reuse-port`` a new
process on the same port takes the new connections), requests already admitted finish, new ones
on open connections get 503, and whatever is still unfinished after ``--drain-timeout`` is
cancelled and answered 503. The process exits 0 once every request has an answer.

Usage:
  python examples/server.py                          # port 8000, the demo's trained model
  python examples/server.py --port 0 --untrained     # any free port, random weights (tests)
  curl -s -X POST localhost:8000/generate -d '{"class": 7, "steps": 20, "guidance_scale": 3}' -o 7.png
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import io
import itertools
import json
import math
import os
import queue
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import types
from typing import Any

START = time.perf_counter()  # the process's time to first response counts from here

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from aiohttp import web  # noqa: E402

import ddim_jax  # noqa: E402

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "ddim_jax")


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class Served:
    """What the server needs of a model: the engine's arguments and the image conversions."""

    name: str
    model_fn: Any
    config: ddim_jax.DDIMConfig
    engine_kwargs: dict[str, Any]
    image_shape: tuple[int, ...]  # the init_image a request may send (pixel values in [0, 1])
    num_classes: int


def load_digits(args: argparse.Namespace) -> Served:
    """The demo's class-conditional digits UNet: trained and cached as ``ddim-jax demo`` does."""
    from ddim_jax.demo.train import (
        NULL_LABEL,
        NUM_CLASSES,
        TrainSettings,
        denoiser_fn,
        make_model,
    )

    # the demo's defaults unless changed: the same cache entry as `ddim-jax demo`
    settings = TrainSettings(channels=tuple(args.channels), train_steps=args.train_steps)
    model = make_model(settings)
    if args.untrained:  # drawn with numpy: compiling model.init would cost as much as the tick
        from stable_diffusion import random_params

        x, t, labels = jnp.zeros((1, 8, 8, 1)), jnp.zeros((), jnp.int32), jnp.zeros(1, jnp.int32)
        init = types.SimpleNamespace(init_weights=lambda key: model.init(key, x, t, None, labels))
        params = random_params(init, args.seed)
    else:
        params = trained_params(settings, os.path.expanduser(args.cache_dir))
    labelled = denoiser_fn(model)

    def model_fn(x, t, params, labels):  # labels: the engine's [uncond; cond] rows, as float32
        return labelled(x, t, params, labels.astype(jnp.int32))

    return Served(
        name=f"digits UNet {list(settings.channels)}" + (" (untrained)" if args.untrained else ""),
        model_fn=model_fn,
        config=settings.scheduler_config(timestep_spacing="trailing"),
        engine_kwargs=dict(
            latent_shape=(8, 8, 1),
            model_args=(jax.device_put(params),),
            cond_shape=(),
            guided=True,
            uncond=np.float32(NULL_LABEL),  # the "no class" label: CFG's unconditional branch
        ),
        image_shape=(8, 8),
        num_classes=NUM_CLASSES,
    )


def trained_params(settings, cache_dir: str):
    """The demo's cached parameters for ``settings``, trained first (about a minute) if absent.

    The digits (and scikit-learn) are loaded only to train: a warm start skips them.
    """
    from ddim_jax.demo.train import cache_path, load_or_train

    if cache_path(settings, cache_dir).is_file():
        try:
            return load_or_train(settings, None, None, cache_dir, progress=False)[0]
        except (TypeError, ValueError, AttributeError):  # an unreadable file: retrain below
            pass
    from ddim_jax.demo.data import load_digits_split

    digits = load_digits_split()
    return load_or_train(settings, digits.x_train, digits.y_train, cache_dir, progress=False)[0]


def to_png(latents: np.ndarray) -> bytes:
    """``(H, W, 1)`` latents in [-1, 1] as an 8-bit grayscale PNG."""
    from ddim_jax.demo.png import write_png

    pixels = np.round(np.clip((np.asarray(latents)[..., 0] + 1) / 2, 0, 1) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    write_png(buffer, pixels)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- validation


class FieldError(ValueError):
    """A request field that is missing, of the wrong type or out of range (HTTP 422)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class Job:
    """A validated request: everything the engine thread needs to build a `ddim_jax.Request`."""

    label: int | None
    steps: int
    guidance_scale: float
    eta: float
    seed: int
    init_image: np.ndarray | None
    strength: float | None
    format: str


FIELDS = ("class", "steps", "guidance_scale", "eta", "seed", "init_image", "strength", "format")


def _number(body: dict, name: str, lo: float, hi: float, default: Any, *, integer: bool = False) -> Any:
    value = body.get(name, default)
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise FieldError(name, f"must be {kind} in [{lo}, {hi}], got {json.dumps(value)[:40]}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise FieldError(name, f"must be {kind} in [{lo}, {hi}], got {value!r:.40}")
    return value


def validate(body: Any, *, max_steps: int, served: Served) -> Job:
    """The request's fields checked against their types and ranges, before any compute.

    Raises `FieldError` naming the first bad field: unknown fields are refused too, so a typo
    (``"guidence_scale"``) is an error rather than a silent default.
    """
    if not isinstance(body, dict):
        raise FieldError("body", f"must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise FieldError(unknown[0], f"unknown field; expected some of {', '.join(FIELDS)}")
    label = body.get("class")
    if label is not None:
        label = _number(body, "class", 0, served.num_classes - 1, None, integer=True)
    steps = _number(body, "steps", 1, max_steps, min(25, max_steps), integer=True)
    guidance_scale = float(_number(body, "guidance_scale", 0.0, 20.0, 3.0))
    eta = float(_number(body, "eta", 0.0, 1.0, 0.0))
    seed = body.get("seed")
    seed = secrets.randbelow(2**32) if seed is None else _number(body, "seed", 0, 2**32 - 1, 0, integer=True)
    init_image, strength = body.get("init_image"), body.get("strength")
    if init_image is not None:
        try:
            init_image = np.asarray(init_image, np.float64)
        except (ValueError, TypeError):
            raise FieldError("init_image", "must be a nested list of numbers") from None
        if init_image.shape != served.image_shape:
            raise FieldError(
                "init_image", f"must have shape {list(served.image_shape)}, got {list(init_image.shape)}"
            )
        if not (np.isfinite(init_image).all() and (init_image >= 0).all() and (init_image <= 1).all()):
            raise FieldError("init_image", "pixel values must be finite and in [0, 1]")
        strength = float(_number(body, "strength", 0.0, 1.0, 0.8))
        if int(steps * strength) < 1:  # diffusers' rule: the request runs int(steps * strength) steps
            raise FieldError("strength", f"runs int(steps * strength) = 0 steps at steps={steps}: raise it")
    elif strength is not None:
        raise FieldError("strength", "needs an init_image")
    fmt = body.get("format", "png")
    if fmt not in ("png", "json"):
        raise FieldError("format", f"must be 'png' or 'json', got {json.dumps(fmt)[:40]}")
    return Job(label, steps, guidance_scale, eta, seed, init_image, strength, fmt)


# ----------------------------------------------------------------------------- the engine thread


class Refused(Exception):
    """A request answered without a result: HTTP ``status`` with ``reason`` (and Retry-After)."""

    def __init__(self, status: int, reason: str, field: str | None = None):
        super().__init__(reason)
        self.status, self.reason, self.field = status, reason, field


class EngineWorker:
    """Drives one `ddim_jax.Engine` from a thread of its own: the engine is not thread-safe.

    The asyncio side calls `submit` and `cancel` (they only enqueue); the thread admits, ticks
    and retires, and hands each result (or error) back to the loop's future.
    """

    def __init__(self, served: Served, *, slots: int, max_steps: int, steps_per_tick: int):
        kwargs = served.engine_kwargs
        self._null = kwargs["uncond"]
        self._make = lambda: ddim_jax.Engine(
            served.model_fn,
            served.config,
            **kwargs,
            slots=slots,
            max_steps=max_steps,
            steps_per_tick=steps_per_tick,
        )
        self.engine = self._make()
        self.stats = self.engine.stats()  # a snapshot, replaced (never mutated) after each tick
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[int, tuple[Any, asyncio.Future]] = {}  # job id -> (handle, future)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def request(self, job: Job) -> Any:
        """The engine request for a validated job (its own key: results never depend on the slot)."""
        init = None if job.init_image is None else (2 * job.init_image[..., None] - 1).astype(np.float32)
        return ddim_jax.Request(
            job.steps,
            jax.random.key(job.seed),
            eta=job.eta,
            guidance_scale=job.guidance_scale,
            cond=self._null if job.label is None else np.float32(job.label),
            init_latents=init,
            strength=job.strength,
        )

    def warm_up(self) -> float:
        """Runs one text-to-image and one image-to-image request (compiles, or loads from the
        persistent cache, every program the engine uses); returns the seconds it took."""
        start = time.perf_counter()
        image = np.zeros((8, 8))
        for job in (Job(1, 2, 3.0, 0.0, 0, None, None, "png"), Job(None, 2, 1.0, 0.5, 1, image, 0.5, "png")):
            handle = self.engine.submit(self.request(job))
            self.engine.run_until_idle()
            assert handle.status == "done", handle.status
        self.stats = self.engine.stats()
        return time.perf_counter() - start

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def submit(self, job_id: int, job: Job) -> asyncio.Future:
        future = self._loop.create_future()
        self._inbox.put(("submit", job_id, job, future))
        return future

    def cancel(self, job_id: int) -> None:
        self._inbox.put(("cancel", job_id, None, None))

    def stop(self) -> None:
        self._inbox.put(("stop", None, None, None))
        self._thread.join(timeout=30)

    def _answer(self, future: asyncio.Future, value: Any = None, error: Exception | None = None) -> None:
        def settle():
            if not future.done():  # a cancelled future (client gone) takes nothing
                future.set_exception(error) if error is not None else future.set_result(value)

        self._loop.call_soon_threadsafe(settle)

    def _handle(self, kind: str, job_id: int, job: Job | None, future: asyncio.Future | None) -> bool:
        if kind == "stop":
            return False
        if kind == "cancel":
            live = self._live.pop(job_id, None)
            if live is not None:
                self.engine.cancel(live[0])
        else:
            try:
                self._live[job_id] = (self.engine.submit(self.request(job)), future)
            except (ValueError, TypeError) as e:  # the engine's own checks: a 422 naming the field
                self._answer(future, error=Refused(422, str(e)))
        return True

    def _commands(self) -> list[tuple]:
        """What the loop sent since the last tick; waits for something only when idle."""
        commands = []
        try:
            commands.append(self._inbox.get(block=self.engine.idle))
            while True:
                commands.append(self._inbox.get_nowait())
        except queue.Empty:
            return commands

    def _run(self) -> None:
        running = True
        while running:
            for command in self._commands():
                running = self._handle(*command) and running
            if self.engine.idle:
                continue
            try:
                finished = self.engine.step()
            except Exception:  # an engine fault fails the requests it held, not the server
                traceback.print_exc()
                for _, future in self._live.values():
                    self._answer(future, error=Refused(500, "engine error; the request was not finished"))
                self._live.clear()
                self.engine = self._make()
                continue
            done = {id(h) for h in finished}
            for job_id in [j for j, (h, _) in self._live.items() if id(h) in done]:
                handle, future = self._live.pop(job_id)
                if handle.status == "done":
                    self._answer(future, np.asarray(handle.result()))
            self.stats = self.engine.stats()


# ----------------------------------------------------------------------------- HTTP


class Server:
    """The aiohttp application: admission control, the handlers, metrics and the drain."""

    def __init__(self, worker: EngineWorker, served: Served, args: argparse.Namespace):
        self.worker, self.served, self.args = worker, served, args
        self.capacity = args.slots + args.queue_limit  # admitted requests (running + queued) at most
        self.pending: dict[int, asyncio.Future] = {}
        self.draining = False
        self.ids = itertools.count()
        self.counts = collections.Counter()
        self.finished_at: collections.deque[float] = collections.deque(maxlen=10_000)
        self.latencies: collections.deque[float] = collections.deque(maxlen=2_000)
        self.started = time.monotonic()
        self.app = web.Application(client_max_size=args.max_body)
        self.app.add_routes(
            [
                web.post("/generate", self.generate),
                web.get("/healthz", self.health),
                web.get("/metrics", self.metrics),
            ]
        )

    def throughput(self, window: float = 10.0) -> float:
        """Requests answered 200 per second over the last ``window`` seconds."""
        now = time.monotonic()
        span = min(window, now - self.started)
        return sum(1 for t in self.finished_at if t > now - window) / span if span > 0 else 0.0

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead over the recent throughput."""
        rate = self.throughput()
        return int(min(60, max(1, math.ceil(len(self.pending) / rate)))) if rate > 0 else 1

    def refusal(self, error: Refused) -> web.Response:
        self.counts[f"refused_{error.status}"] += 1
        headers = {"Retry-After": str(self.retry_after())} if error.status in (429, 503) else {}
        body = {"error": error.reason, "field": error.field, "status": error.status}
        response = web.json_response(body, status=error.status, headers=headers)
        if self.draining:
            response.force_close()
        return response

    async def read_job(self, request: web.Request) -> Job:
        if request.content_length is not None and request.content_length > self.args.max_body:
            raise Refused(
                413, f"body of {request.content_length} bytes over the limit of {self.args.max_body}", "body"
            )
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Refused(413, f"body over the limit of {self.args.max_body} bytes", "body") from None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:  # (also integers of over 4300 digits)
            raise Refused(400, f"malformed JSON: {e}", "body") from None
        except RecursionError:  # [[[[...: json's decoder recurses per level
            raise Refused(400, "malformed JSON: nested too deeply", "body") from None
        try:
            return validate(body, max_steps=self.args.max_steps, served=self.served)
        except FieldError as e:
            raise Refused(422, str(e), e.field) from None

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.counts["received"] += 1
        start = time.monotonic()
        try:
            job = await self.read_job(request)
            if self.draining:
                raise Refused(503, "shutting down; retry on the restarted server")
            if len(self.pending) >= self.capacity:
                raise Refused(429, f"queue full ({len(self.pending)} admitted, limit {self.capacity})")
        except Refused as e:
            return self.refusal(e)
        job_id = next(self.ids)
        future = self.worker.submit(job_id, job)
        self.pending[job_id] = future
        try:
            latents = await asyncio.wait_for(future, self.args.request_timeout)
        except asyncio.CancelledError:  # the client disconnected: free the slot
            self.worker.cancel(job_id)
            self.counts["cancelled"] += 1
            raise
        except asyncio.TimeoutError:
            self.worker.cancel(job_id)
            return self.refusal(
                Refused(503, f"not finished within {self.args.request_timeout} s; overloaded")
            )
        except Refused as e:
            return self.refusal(e)
        finally:
            self.pending.pop(job_id, None)
        now = time.monotonic()
        self.finished_at.append(now)
        self.latencies.append(now - start)
        self.counts["done"] += 1
        headers = {"X-Seed": str(job.seed), "X-Steps": str(job.steps)}
        if job.format == "json":
            image = np.clip((latents[..., 0] + 1) / 2, 0, 1)
            response = web.json_response(
                {"seed": job.seed, "steps": job.steps, "image": image.round(4).tolist()}
            )
        else:
            response = web.Response(body=to_png(latents), content_type="image/png", headers=headers)
        if self.draining:
            response.force_close()
        return response

    async def health(self, request: web.Request) -> web.Response:
        status = "draining" if self.draining else "ok"
        return web.json_response(
            {"status": status, "model": self.served.name}, status=503 if self.draining else 200
        )

    async def metrics(self, request: web.Request) -> web.Response:
        stats = self.worker.stats
        lat = np.asarray(self.latencies) * 1e3
        percentiles = {f"p{q}": float(np.percentile(lat, q)) if lat.size else None for q in (50, 95, 99)}
        return web.json_response(
            {
                "queue_depth": stats["queued"],
                "slots": stats["slots"],
                "slots_busy": stats["busy_slots"],
                "admitted": len(self.pending),
                "capacity": self.capacity,
                "requests": dict(self.counts),
                "engine": stats,
                "throughput_rps": self.throughput(),
                "latency_ms": percentiles,
                "uptime_s": time.monotonic() - self.started,
                "rss_bytes": rss_bytes(),
                "draining": self.draining,
            }
        )

    async def drain(self, sites: list[web.BaseSite]) -> dict[str, int]:
        """Stops accepting connections, waits for admitted requests, answers the rest 503."""
        self.draining = True
        await accept_backlog(sites)
        for site in sites:
            await site.stop()
        admitted = len(self.pending)
        deadline = time.monotonic() + self.args.drain_timeout
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        unfinished = list(self.pending.items())
        for job_id, future in unfinished:
            self.worker.cancel(job_id)
            if not future.done():
                future.set_exception(
                    Refused(503, f"shutting down: not finished within {self.args.drain_timeout} s")
                )
        await asyncio.sleep(0)  # let the handlers write their answers
        return {"admitted_at_sigterm": admitted, "answered_503": len(unfinished)}


def queued_connections(site: web.BaseSite) -> int:
    """Connections the kernel holds for ``site``'s listening sockets, not yet accepted (Linux:
    ``tcpi_unacked`` of a listening socket's ``TCP_INFO``; 0 where that is not available)."""
    total = 0
    for sock in getattr(site._server, "sockets", None) or ():
        with contextlib.suppress(OSError, AttributeError, struct.error):
            total += struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 24)[0]
    return total


async def accept_backlog(sites: list[web.BaseSite], timeout: float = 2.0) -> None:
    """Lets the loop accept what the kernel has queued before the listeners close: closing a
    listening socket resets the connections still in its queue (under ``SO_REUSEPORT`` Linux
    moves them to the other process only with ``net.ipv4.tcp_migrate_req=1``). They are then
    answered 503, not dropped."""
    deadline = time.monotonic() + timeout
    while any(queued_connections(site) for site in sites) and time.monotonic() < deadline:
        await asyncio.sleep(0.002)


def rss_bytes() -> int | None:
    """This process's resident set size (Linux ``/proc``), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def use_compilation_cache(path: str | None) -> None:
    """Points JAX's persistent compilation cache at ``path``: every program is written there
    (no minimum compile time or size), and a restarted server reads it back."""
    if path is None:
        return
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed in the ready line)")
    p.add_argument("--reuse-port", action="store_true", help="SO_REUSEPORT: a new process may share the port")
    p.add_argument("--slots", type=int, default=8, help="engine slots (requests sampled together)")
    p.add_argument("--steps-per-tick", type=int, default=1, help="denoising steps per engine tick")
    p.add_argument("--max-steps", type=int, default=50, help="the most steps a request may ask for")
    p.add_argument("--queue-limit", type=int, default=32, help="requests waiting beyond the slots; then 429")
    p.add_argument("--max-body", type=int, default=64 * 1024, help="largest request body in bytes; then 413")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds a request may wait; then 503")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish requests on SIGTERM")
    p.add_argument("--compile-cache", default=os.path.join(DEFAULT_CACHE_DIR, "jax_compile_cache"))
    p.add_argument("--no-compile-cache", action="store_true", help="compile every program at start")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="the demo's trained-parameter cache")
    p.add_argument("--train-steps", type=int, default=2000, help="training steps of the digits UNet")
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32], help="UNet channels per level")
    p.add_argument("--untrained", action="store_true", help="random weights: no training (tests, load runs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name, lo in (
        ("slots", 1),
        ("steps_per_tick", 1),
        ("max_steps", 1),
        ("queue_limit", 0),
        ("max_body", 64),
    ):
        if getattr(args, name) < lo:
            p.error(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")
    for name in ("request_timeout", "drain_timeout"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not 0 <= args.port < 65536:
        p.error(f"--port must be in [0, 65535], got {args.port}")


async def serve(args: argparse.Namespace, timings: dict[str, float]) -> int:
    served = load_digits(args)
    timings["model_s"] = time.perf_counter() - START - timings["import_s"]
    worker = EngineWorker(
        served, slots=args.slots, max_steps=args.max_steps, steps_per_tick=args.steps_per_tick
    )
    timings["warm_up_s"] = worker.warm_up()
    loop = asyncio.get_running_loop()
    worker.start(loop)
    server = Server(worker, served, args)
    runner = web.AppRunner(server.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, reuse_port=args.reuse_port or None)
    await site.start()
    port = runner.addresses[0][1]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    timings["ready_s"] = time.perf_counter() - START
    ready = {"event": "ready", "port": port, "pid": os.getpid(), "model": served.name, **timings}
    print(json.dumps(ready), flush=True)
    await stop.wait()
    report = await server.drain([site])
    await runner.cleanup()
    worker.stop()
    report = {"event": "stopped", **report, "requests": dict(server.counts), "rss_bytes": rss_bytes()}
    print(json.dumps(report), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    use_compilation_cache(None if args.no_compile_cache else args.compile_cache)
    timings = {"import_s": time.perf_counter() - START}
    return asyncio.run(serve(args, timings))


if __name__ == "__main__":
    sys.exit(main())
