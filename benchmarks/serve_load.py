"""Load and fault test of the HTTP server (``examples/server.py``), loopback only, bounded in time.

Starts the server as a subprocess on 127.0.0.1 and drives it with an async aiohttp client:

1. **Cold and warm start**: time from spawning the process to its first 200, with an empty
   compilation cache directory (cold) and again with the one the cold process filled (warm).
2. **Saturation**: a closed loop that keeps the queue full; its throughput is the rate the
   open-loop phases are scaled by.
3. **Load**: open-loop Poisson arrivals at each fraction of that rate (``--loads``), with faults
   mixed in: malformed JSON, wrong types, huge values, oversized bodies, and clients that
   disconnect mid-request.
4. **Rolling restart** under load (``--restart-load``): a second server process starts on the
   same port (``SO_REUSEPORT``), the first gets SIGTERM and drains, the second serves the rest.
5. **Burst**: 10x the queue limit at once: the excess is refused (429, Retry-After), none lost.
6. Optionally (``--long N``): N requests at 80% of saturation.

Every request ends in one outcome: an HTTP status, ``disconnected`` (the client hung up on
purpose), ``connect_failed`` (no server accepted the connection) or ``lost`` (sent, never
answered). Reports throughput, p50/p95/p99 latency per phase, the counts, every refusal's
reason, and the server's RSS growth; writes JSON (``--json``) and figures (``--figures``).

Usage:
  python benchmarks/serve_load.py --quick                       # the CI-sized run (~1 min)
  python benchmarks/serve_load.py --long 5000 --json r.json --figures docs/
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import random
import signal
import sys
import tempfile
import time
from typing import Any

import aiohttp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "examples", "server.py")


@dataclasses.dataclass
class Outcome:
    """One request's end: ``status`` (an HTTP code or a word), its latency and reason."""

    phase: str
    kind: str  # "normal" or the fault's name
    sent: float  # seconds since the run started
    latency: float
    status: int | str
    reason: str | None = None  # the error's text for a non-2xx answer
    retry_after: str | None = None


class ServerProcess:
    """``examples/server.py`` in a subprocess: started, polled for RSS, stopped with SIGTERM."""

    def __init__(self, args: list[str], port: int):
        self.args, self.port = args, port
        self.ready: dict[str, Any] = {}
        self.stopped: dict[str, Any] = {}
        self.spawned = 0.0

    async def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.spawned = time.perf_counter()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, SERVER, "--port", str(self.port), "--reuse-port", *self.args,
            stdout=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "ready":
                self.ready = event
            elif event.get("event") == "stopped":
                self.stopped = event

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while not self.ready:
            if self.proc.returncode is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"server did not become ready (exit code {self.proc.returncode})")
            await asyncio.sleep(0.05)

    def rss(self) -> int | None:
        try:
            with open(f"/proc/{self.proc.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return None

    async def stop(self, timeout: float = 60.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        await self._reader
        return self.proc.returncode


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- requests


def normal_body(rng: random.Random, steps: tuple[int, ...]) -> dict[str, Any]:
    body = {
        "class": rng.randrange(10),
        "steps": rng.choice(steps),
        "guidance_scale": rng.uniform(1, 5),
        "eta": rng.choice([0.0, 0.5]),
        "seed": rng.randrange(2**32),
    }
    if rng.random() < 0.2:  # image to image
        body["init_image"] = [[rng.random() for _ in range(8)] for _ in range(8)]
        body["strength"] = rng.uniform(0.5, 1.0)  # at least one step at steps >= 2
    return body


def fault_body(kind: str, rng: random.Random, max_body: int) -> bytes:
    """The raw body of a faulty request (each answered 400, 413 or 422)."""
    if kind == "malformed_json":
        return rng.choice([b'{"class": 3,', b"not json", b"\xff\xfe{}", b""])
    if kind == "wrong_type":
        return json.dumps(
            rng.choice([{"steps": "ten"}, {"class": [1]}, {"eta": None}, [1, 2], {"seed": 1.5}])
        ).encode()
    if kind == "huge_value":
        return rng.choice([b'{"steps": 1000000000000}', b'{"guidance_scale": 1e308}', b'{"seed": 1e400}',
                           b'{"seed": 123456789012345678901234567890}', b'{"eta": -1e300}',
                           b'{"seed": ' + b"9" * 5000 + b"}", b"[" * (max_body // 2)])  # fmt: skip
    if kind == "oversized":
        return b'{"class": 1, "pad": "' + b"x" * (4 * max_body) + b'"}'
    raise ValueError(kind)


FAULTS = ("malformed_json", "wrong_type", "huge_value", "oversized", "disconnect")


class Client:
    """Sends requests and records exactly one `Outcome` for each."""

    def __init__(self, port: int, t0: float, timeout: float, max_body: int):
        self.url = f"http://127.0.0.1:{port}/generate"
        self.port, self.t0, self.max_body = port, t0, max_body
        # a connection per request: a kept-alive connection that a draining server closes
        # would turn a request into an unanswered one on the client's side, not the server's
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
        )
        self.outcomes: list[Outcome] = []

    async def post(self, phase: str, kind: str, body: bytes) -> Outcome:
        sent = time.perf_counter()
        status, reason, retry = None, None, None
        try:
            async with self.session.post(
                self.url, data=body, headers={"Content-Type": "application/json"}
            ) as r:
                payload = await r.read()
                status, retry = r.status, r.headers.get("Retry-After")
                if status != 200:
                    try:
                        reason = json.loads(payload)["error"]
                    except (ValueError, KeyError, TypeError):
                        reason = None  # a refusal without its reason: the test fails on it
        except aiohttp.ClientConnectorError:
            status = "connect_failed"
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            status, reason = "lost", type(e).__name__
        outcome = Outcome(phase, kind, sent - self.t0, time.perf_counter() - sent, status, reason, retry)
        self.outcomes.append(outcome)
        return outcome

    async def disconnect(self, phase: str, body: bytes, after: float) -> None:
        """Sends a valid request on a raw socket and hangs up ``after`` seconds later."""
        sent = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            self.outcomes.append(Outcome(phase, "disconnect", sent - self.t0, 0.0, "connect_failed"))
            return
        head = "POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        try:
            line = await asyncio.wait_for(reader.readline(), after)
            status: int | str = int(line.split()[1]) if line else "lost"  # answered before we hung up
        except asyncio.TimeoutError:
            status = "disconnected"
        writer.close()
        self.outcomes.append(Outcome(phase, "disconnect", sent - self.t0, time.perf_counter() - sent, status))

    async def request(self, phase: str, kind: str, rng: random.Random, steps: tuple[int, ...]) -> None:
        if kind == "normal":
            await self.post(phase, kind, json.dumps(normal_body(rng, steps)).encode())
        elif kind == "disconnect":
            body = json.dumps({**normal_body(rng, steps), "steps": max(steps)}).encode()
            await self.disconnect(phase, body, after=rng.uniform(0.001, 0.05))
        else:
            await self.post(phase, kind, fault_body(kind, rng, self.max_body))

    async def close(self) -> None:
        await self.session.close()


async def open_loop(
    client: Client, phase: str, rate: float, n: int, rng: random.Random, steps, fault_share, stop=None
):
    """``n`` requests (fewer if the event ``stop`` is set first) with exponential gaps of mean
    1 / rate (Poisson arrivals), not waiting for answers; a share of them faults. Returns when
    all are answered."""
    tasks = []
    start = time.perf_counter()
    due = 0.0
    for _ in range(n):
        if stop is not None and stop.is_set():
            break
        due += rng.expovariate(rate)
        delay = start + due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        kind = rng.choice(FAULTS) if rng.random() < fault_share else "normal"
        tasks.append(asyncio.create_task(client.request(phase, kind, rng, steps)))
    await asyncio.gather(*tasks)
    return time.perf_counter() - start


async def closed_loop(
    client: Client, phase: str, concurrency: int, n: int, rng: random.Random, steps
) -> float:
    """``n`` normal requests from ``concurrency`` workers, each sending its next when answered."""
    left = iter(range(n))
    start = time.perf_counter()

    async def worker():
        for _ in left:
            await client.request(phase, "normal", rng, steps)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


async def first_response(server: ServerProcess, body: bytes, timeout: float) -> float:
    """Seconds from spawning ``server`` to its first 200 (it listens once its programs are ready)."""
    url = f"http://127.0.0.1:{server.port}/generate"
    deadline = time.perf_counter() + timeout
    async with aiohttp.ClientSession() as session:
        while time.perf_counter() < deadline:
            if server.proc.returncode is not None:
                raise RuntimeError(f"server exited with code {server.proc.returncode} before answering")
            try:
                async with session.post(url, data=body) as r:
                    if r.status == 200:
                        await r.read()
                        return time.perf_counter() - server.spawned
            except aiohttp.ClientConnectorError:
                pass
            await asyncio.sleep(0.02)
    raise RuntimeError(f"no 200 within {timeout} s")


# ----------------------------------------------------------------------------- the run


def summarize(outcomes: list[Outcome], duration: float | None = None) -> dict[str, Any]:
    """Counts by status class, throughput and latency percentiles of the 200s (ms)."""
    counts = collections.Counter()
    for o in outcomes:
        if isinstance(o.status, int):
            counts[f"{o.status // 100}xx"] += 1
            counts[str(o.status)] += 1
        else:
            counts[o.status] += 1
    ok = np.array([o.latency for o in outcomes if o.status == 200]) * 1e3
    summary: dict[str, Any] = {"requests": len(outcomes), "counts": dict(sorted(counts.items()))}
    if ok.size:
        summary.update({f"p{q}_ms": float(np.percentile(ok, q)) for q in (50, 95, 99)})
    if duration:
        summary["throughput_rps"] = float(ok.size / duration)
        summary["duration_s"] = duration
        summary["loadavg_1min"] = os.getloadavg()[0]  # the machine is shared: how busy it was
    return summary


def check(outcomes: list[Outcome]) -> list[str]:
    """The rules every run must keep; returns what broke (empty when all held)."""
    problems = []
    for o in outcomes:
        where = f"{o.phase}/{o.kind} at {o.sent:.2f} s"
        if o.status in ("lost", "connect_failed"):
            problems.append(f"{where}: {o.status} ({o.reason})")
        elif isinstance(o.status, int) and o.status != 200 and o.kind != "disconnect":  # (reads no body)
            if not o.reason:
                problems.append(f"{where}: {o.status} without a reason")
            if o.status in (429, 503) and not (o.retry_after or "").isdigit():
                problems.append(f"{where}: {o.status} without Retry-After")
            if o.status >= 500 and o.status != 503:
                problems.append(f"{where}: {o.status} {o.reason}")
            if o.kind == "normal" and o.status not in (429, 503):
                problems.append(f"{where}: a valid request answered {o.status} ({o.reason})")
            if o.kind not in ("normal", "disconnect") and o.status not in (400, 413, 422):
                problems.append(f"{where}: a {o.kind} answered {o.status} ({o.reason})")
        elif o.status == 200 and o.kind not in ("normal", "disconnect"):
            problems.append(f"{where}: a {o.kind} answered 200")
    return problems


async def run_load(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    steps = tuple(args.steps)
    cache = args.compile_cache or tempfile.mkdtemp(prefix="ddim_jax_serve_cache_")
    server_args = [
        "--slots", str(args.slots), "--queue-limit", str(args.queue_limit),
        "--max-steps", str(max(steps)), "--max-body", str(args.max_body),
        "--compile-cache", cache, "--drain-timeout", str(args.drain_timeout),
        *(["--untrained"] if args.untrained else []),
        *(["--channels", *map(str, args.channels)] if args.channels else []),
    ]  # fmt: skip
    port = free_port()
    first = json.dumps({"class": 1, "steps": min(steps), "seed": 0}).encode()
    results: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "figures"}}

    # 1. cold, then warm, time to first response
    starts = []
    for which in ("cold", "warm") if args.warm_start else ("cold",):
        server = ServerProcess(server_args, port)
        await server.start()
        ttfr = await first_response(server, first, args.start_timeout)
        await server.wait_ready(args.start_timeout)
        starts.append({"start": which, "first_response_s": ttfr, **server.ready})
        if which == "cold" and args.warm_start:
            await server.stop()
    results["starts"] = starts
    print(
        "[serve_load] time to first response:",
        ", ".join(f"{s['start']} {s['first_response_s']:.1f} s" for s in starts),
    )

    t0 = time.perf_counter()
    client = Client(port, t0, args.timeout, args.max_body)
    rss: list[tuple[float, int, int]] = []  # (time, pid, bytes)
    servers = [server]

    async def sample_rss():
        while True:
            current = servers[-1]
            value = current.rss()
            if value:
                rss.append((time.perf_counter() - t0, current.proc.pid, value))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample_rss())
    capacity = args.slots + args.queue_limit
    try:
        # 2. saturation (closed loop, queue kept full)
        await closed_loop(client, "warm-up", args.slots, 2 * args.slots, rng, steps)
        rss_base = server.rss()
        n_sat = max(16 * capacity, args.requests // 2)
        duration = await closed_loop(client, "saturation", capacity, n_sat, rng, steps)
        saturation = summarize([o for o in client.outcomes if o.phase == "saturation"], duration)
        rate_sat = saturation["throughput_rps"]
        print(f"[serve_load] saturation {rate_sat:.1f} req/s")
        phases = {"saturation": saturation}

        # 3. open-loop load with faults
        for load in args.loads:
            name = f"load {load:.2f}"
            duration = await open_loop(
                client, name, load * rate_sat, args.requests, rng, steps, args.fault_share
            )
            phases[name] = summarize([o for o in client.outcomes if o.phase == name], duration)
            phases[name]["offered_rps"] = load * rate_sat
            print(f"[serve_load] {name}: {phases[name]}")

        # 4. a rolling restart under load: a second process starts on the same port while the
        # first serves, then the first gets SIGTERM and drains; the second serves the rest
        restart: dict[str, Any] = {}
        if args.restart_load:
            name, rate = "restart", args.restart_load * rate_sat
            stop = asyncio.Event()
            cap = int(rate * (args.start_timeout + args.drain_timeout)) + args.requests
            replacement = ServerProcess(server_args, port)
            await replacement.start()
            if args.ready_first:  # started before the load (bounds the phase's request count)
                await replacement.wait_ready(args.start_timeout)
            task = asyncio.create_task(open_loop(client, name, rate, cap, rng, steps, args.fault_share, stop))
            await replacement.wait_ready(args.start_timeout)
            if args.ready_first:
                await asyncio.sleep(args.requests / rate)  # both processes serve
            restart = await rolling_restart(servers, replacement)
            restart["sigterm_at"] = restart.pop("sigterm") - t0
            server = replacement
            await asyncio.sleep(args.requests / rate)  # then the new process serves the rest
            stop.set()
            phases[name] = summarize([o for o in client.outcomes if o.phase == name], await task)
            phases[name]["offered_rps"] = rate
            print(f"[serve_load] {name}: {phases[name]}")
            rss_base = server.rss()  # the process that serves the rest, once it has served

        # 5. a burst of 10x the queue limit
        burst = [client.request("burst", "normal", rng, steps) for _ in range(10 * max(args.queue_limit, 1))]
        start = time.perf_counter()
        await asyncio.gather(*burst)
        phases["burst"] = summarize(
            [o for o in client.outcomes if o.phase == "burst"], time.perf_counter() - start
        )
        print(f"[serve_load] burst: {phases['burst']}")

        # 6. the long run
        if args.long:  # at 80% of a saturation measured again just before (the machine is shared)
            duration = await closed_loop(client, "saturation again", capacity, n_sat, rng, steps)
            again = summarize([o for o in client.outcomes if o.phase == "saturation again"], duration)
            phases["saturation again"] = again
            name, rate = "long 0.80", 0.8 * again["throughput_rps"]
            rss_long = server.rss()
            duration = await open_loop(client, name, rate, args.long, rng, steps, args.fault_share)
            phases[name] = summarize([o for o in client.outcomes if o.phase == name], duration)
            phases[name].update(offered_rps=rate, rss_start=rss_long, rss_end=server.rss())
            print(f"[serve_load] {name}: {phases[name]}")
        await asyncio.sleep(0.3)  # the server's cancel of the last disconnects
        async with client.session.get(f"http://127.0.0.1:{port}/metrics") as r:
            metrics = await r.json()
        rss_end = server.rss()
    finally:
        sampler.cancel()
        await client.close()
        codes = [await s.stop() for s in servers]
    disconnects = [o for o in client.outcomes if o.kind == "disconnect"]
    hung_up = sum(o.status == "disconnected" for o in disconnects)
    refused = [f"{o.status}: {o.reason}" for o in client.outcomes if o.status not in (200, "disconnected")]
    last = servers[-1]
    results.update(
        phases=phases,
        restart=restart,
        exit_codes=codes,
        stopped=[s.stopped for s in servers],
        metrics=metrics,
        total=summarize(client.outcomes),
        problems=check(client.outcomes),
        disconnects={"sent": len(disconnects), "hung_up": hung_up},
        rss={
            "pid": last.proc.pid,
            "start_bytes": rss_base,
            "end_bytes": rss_end,
            "samples": rss,
        },
        refusal_reasons=dict(collections.Counter(refused)),
        outcomes=[dataclasses.asdict(o) for o in client.outcomes],
    )  # fmt: skip
    r = results["rss"]
    r["growth"] = (r["end_bytes"] - r["start_bytes"]) / r["start_bytes"] if r["start_bytes"] else None
    return results


async def rolling_restart(servers: list[ServerProcess], new: ServerProcess) -> dict:
    """SIGTERMs the serving process (it drains) while ``new``, ready on the same port
    (``SO_REUSEPORT``), takes the connections."""
    old = servers[-1]
    servers.append(new)
    start = time.perf_counter()
    code = await old.stop()
    return {
        "sigterm": start,
        "old_exit_code": code,
        "drain_s": time.perf_counter() - start,
        "old_stopped": old.stopped,
        "new_ready_s": new.ready.get("ready_s"),
        "rss_new_ready": new.rss(),
    }


# ----------------------------------------------------------------------------- figures and tables

STATUS_COLORS = {"200": "tab:green", "429": "tab:orange", "503": "tab:red", "4xx": "tab:blue",
                 "disconnected": "tab:gray"}  # fmt: skip


def _load_phases(results: dict) -> list[tuple[str, dict]]:
    return [(k, v) for k, v in results["phases"].items() if k.startswith("load ")]


def _sigterm_at(results: dict) -> float | None:
    restart = results.get("restart") or {}
    if "sigterm_at" in restart:
        return restart["sigterm_at"]
    return None


def write_figures(results: dict, out_dir: str) -> list[str]:
    """Three labelled PNGs: latency and throughput against offered load; the answers over time
    and per phase (overload, the restart); cold against warm time to first response."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    sat = results["phases"]["saturation"]["throughput_rps"]
    phases = _load_phases(results)
    offered = np.array([v["offered_rps"] for _, v in phases])

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for q, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
        a.plot(offered, [v.get(f"{q}_ms", np.nan) for _, v in phases], style, label=q)
    a.axvline(sat, color="k", lw=0.8, ls="--", label=f"saturation {sat:.1f} req/s")
    a.set(xlabel="offered load (requests/s, Poisson)", ylabel="latency of 200 answers (ms)", yscale="log",
          title="Latency against load")  # fmt: skip
    a.legend()
    b.plot(offered, [v["throughput_rps"] for _, v in phases], "o-", label="served (200/s)")
    b.plot(offered, offered, color="0.6", ls=":", label="offered")
    b.axhline(sat, color="k", lw=0.8, ls="--", label="closed-loop saturation")
    b.set(xlabel="offered load (requests/s, Poisson)", ylabel="requests/s", title="Throughput against load")
    b.legend()
    fig.suptitle(_caption(results), fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "serve_latency_vs_load.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.2, 1]})
    outcomes = [o for o in results["outcomes"] if o["phase"] != "warm-up"]
    end = max(o["sent"] + o["latency"] for o in outcomes)
    bins = np.arange(0, end + 1, 1.0)
    for key, color in STATUS_COLORS.items():
        times = [o["sent"] + o["latency"] for o in outcomes if _status_class(o["status"]) == key]
        if times:
            a.plot(bins[:-1], np.histogram(times, bins)[0], color=color, lw=1, label=key)
    sigterm = _sigterm_at(results)
    if sigterm is not None:
        a.axvline(sigterm, color="k", ls="--", lw=0.8, label="SIGTERM (rolling restart)")
    a.set(xlabel="time in the run (s)", ylabel="answers per second", title="Answers over the run, by status")
    a.legend(fontsize=8)
    names = [k for k, _ in phases] + [n for n in ("restart", "burst", "long 0.80") if n in results["phases"]]
    bottom = np.zeros(len(names))
    for key, color in STATUS_COLORS.items():
        counts = np.array([_share(results["phases"][n], key) for n in names])
        labels = [n.replace("load ", "x").replace("long 0.80", "long\nx0.80") for n in names]
        b.bar(labels, counts, bottom=bottom, color=color, label=key)
        bottom += counts
    b.set(xlabel="phase (load as a multiple of saturation)", ylabel="share of requests",
          title=f"Answers per phase (burst: {10 * results['settings']['queue_limit']} at once)")  # fmt: skip
    b.legend(fontsize=8)
    fig.suptitle(_caption(results), fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "serve_overload.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 2.8))
    parts = ("imports (jax, aiohttp, ddim_jax)", "load the model", "build the engine",
             "compile / load programs", "Python start-up + first request")  # fmt: skip
    colors = ("tab:gray", "tab:blue", "tab:purple", "tab:red", "tab:green")
    for i, s in enumerate(results["starts"]):
        pieces = _start_pieces(s)
        left = 0.0
        for piece, name, color in zip(pieces, parts, colors, strict=True):
            ax.barh(i, piece, left=left, color=color, label=name if i == 0 else None)
            left += piece
        ax.text(left + 0.3, i, f"{s['first_response_s']:.1f} s", va="center")
    ax.set_xlim(0, 1.15 * max(s["first_response_s"] for s in results["starts"]))
    ax.set_yticks(range(len(results["starts"])), [s["start"] for s in results["starts"]])
    ax.set(
        xlabel="seconds from spawning the process",
        title="Time to first response: cold and warm compilation cache",
    )
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "serve_cold_warm.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def _status_class(status: int | str) -> str:
    if status in (200, 429, 503):
        return str(status)
    return "4xx" if isinstance(status, int) and 400 <= status < 500 else str(status)


def _share(phase: dict, key: str) -> float:
    counts = phase["counts"]
    n = phase["requests"] or 1
    if key == "4xx":
        return (counts.get("4xx", 0) - counts.get("429", 0)) / n
    return counts.get(key, 0) / n


def _start_pieces(start: dict) -> list[float]:
    """A start's phases: import, model, engine, warm-up (programs), then up to the first 200."""
    engine = start["ready_s"] - start["import_s"] - start["model_s"] - start["warm_up_s"]
    return [
        start["import_s"],
        start["model_s"],
        engine,
        start["warm_up_s"],
        start["first_response_s"] - start["ready_s"],
    ]


def _caption(results: dict) -> str:
    s = results["settings"]
    model = "untrained" if s["untrained"] else "trained"
    return (
        f"digits UNet ({model}), {s['slots']} slots, queue limit {s['queue_limit']}, steps from "
        f"{s['steps']}, {s['fault_share']:.0%} faults; 2-core CPU shared with other jobs"
    )


def markdown(results: dict) -> str:
    """The tables for RESULTS.md: per phase, then the starts and the restart."""
    rows = []
    for name, v in results["phases"].items():
        c = v["counts"]
        rows.append(
            [name, f"{v['offered_rps']:.1f}" if "offered_rps" in v else "-", f"{v['throughput_rps']:.1f}",
             v["requests"],
             c.get("200", 0), c.get("4xx", 0) - c.get("429", 0), c.get("429", 0), c.get("5xx", 0),
             c.get("disconnected", 0), c.get("lost", 0) + c.get("connect_failed", 0),
             *(f"{v.get(q, float('nan')):.0f}" for q in ("p50_ms", "p95_ms", "p99_ms"))]
        )  # fmt: skip
    head = ["phase", "offered req/s", "served req/s", "requests", "200", "4xx (faults)", "429", "5xx",
            "hung up", "lost", "p50 ms", "p95 ms", "p99 ms"]  # fmt: skip
    lines = [_table(head, rows), ""]
    start_rows = [[s["start"], *(f"{p:.1f}" for p in _start_pieces(s)), f"{s['first_response_s']:.1f}"]
                  for s in results["starts"]]  # fmt: skip
    lines += [
        _table(["start", "import", "model", "engine", "programs", "first request", "total s"], start_rows),
        "",
    ]
    return "\n".join(lines)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="the CI size: small requests, untrained model, ~1 min"
    )
    p.add_argument("--requests", type=int, default=400, help="requests per load phase")
    p.add_argument("--loads", type=float, nargs="+", default=[0.3, 0.6, 0.8, 1.0, 1.3, 2.0])
    p.add_argument("--restart-load", type=float, default=0.8, help="load of the restart phase (0: none)")
    p.add_argument("--ready-first", action="store_true", help="start the second process before the load")
    p.add_argument("--long", type=int, default=0, help="then this many requests at 80%% of saturation")
    p.add_argument(
        "--steps", type=int, nargs="+", default=[10, 25, 50], help="step counts requests draw from"
    )
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--queue-limit", type=int, default=32)
    p.add_argument("--max-body", type=int, default=64 * 1024)
    p.add_argument("--fault-share", type=float, default=0.1, help="share of load requests that are faults")
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (then: lost)")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--compile-cache", default=None, help="default: a fresh temporary directory (cold start)")
    p.add_argument("--untrained", action="store_true", help="random weights (same cost per step)")
    p.add_argument("--channels", type=int, nargs="+", help="the server's UNet channels (default its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warm-start", dest="warm_start", action="store_false", help="skip the warm start")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--figures", help="write the figures (PNG) into this directory")
    p.add_argument("--replot", metavar="JSON", help="only redraw the figures and tables of a saved run")
    return p


QUICK = dict(
    requests=60, loads=[0.5, 1.0, 2.0], restart_load=1.0, steps=[2, 4, 8, 16], slots=4, queue_limit=8,
    untrained=True, warm_start=False, channels=[8], ready_first=True,
)  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    return args


def run(quick: bool = False) -> str:
    """For ``run_all.py``: the CI-sized run (``quick``) or 200 requests per phase; the tables."""
    results = asyncio.run(run_load(parse(["--quick"] if quick else ["--requests", "200"])))
    problems = results["problems"]
    verdict = (
        f"{len(problems)} broken rules: {problems[:3]}"
        if problems
        else "0 lost, every refusal with its reason"
    )
    return f"### serve_load: the HTTP server under load and faults\n\n{markdown(results)}\n{verdict}\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.replot:
        with open(args.replot) as f:
            results = json.load(f)
        print(markdown(results))
        if args.figures:
            print("wrote", *write_figures(results, args.figures))
        return 0
    results = asyncio.run(run_load(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    brief = {k: results[k] for k in ("total", "restart", "exit_codes", "disconnects", "problems")}
    print(json.dumps(brief, indent=1))
    print(f"RSS growth {results['rss']['growth']:+.1%}")
    print(markdown(results))
    if args.figures:
        print("wrote", *write_figures(results, args.figures))
    return 1 if results["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
