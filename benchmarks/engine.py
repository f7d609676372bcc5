"""The serving engine (`ddim_jax.Engine`) against three batching policies, on the demo UNet.

A stream of requests with S drawn from {10, 25, 50} (and a second mix with image-to-image
strengths in {0.3, 0.6, 1.0}), eta = 0, each with its own key. Policies, side by side in one
run, each a real implementation whose results are the requests' own:

- **one at a time**: `sample` at batch 1 (a runtime-length state: one program for every S);
- **padded**: batches of up to B requests taken from the queue, run until the batch's largest S
  is done (an `Engine` that only takes a new batch when all its slots are free);
- **equal S**: batches of B requests with the same S and start step, formed from the queue,
  `sample` at batch B (per-example keys); a partial batch is flushed after a timeout;
- **engine**: `Engine` with B slots, continuous admission.

Reports saturation throughput (every request queued at time 0), the slots' utilisation (the
model-call rows that advanced a request), latency percentiles under open-loop Poisson arrivals
at 30%, 60% and 90% of the engine's saturation rate, and the tick's cost against one step of
`sample` at the same B.

Usage: ``python benchmarks/engine.py [--quick]``
"""

from __future__ import annotations

import collections
import functools
import re
import time

import _bench as B
import jax
import jax.numpy as jnp
import numpy as np

import ddim_jax

STEPS = (10, 25, 50)
STRENGTHS = (0.3, 0.6, 1.0)
LOADS = (0.3, 0.6, 0.9)
# (name, NHWC latent shape, UNet channels, slots B)
SETTINGS = {
    "cpu": ("digits", (8, 8, 1), (16, 32), 8),
    "gpu": ("latent 4x64x64", (64, 64, 4), (64, 128), 8),
    "quick": ("digits", (8, 8, 1), (8, 16), 4),
}
CONFIG = ddim_jax.DDIMConfig(**{**B.SD_CONFIG, "steps_offset": 0, "timestep_spacing": "trailing"})
MAX_STEPS = max(STEPS)


def make_model(shape, channels):
    from unet_e2e import make_model as unet

    model, params = unet((1, *shape), channels)
    return functools.partial(lambda m, x, t, p: m.apply(p, x, t), model), params


def make_requests(n, seed, img2img, shape):
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(n):
        s = int(rng.choice(STEPS))
        extra = {}
        if img2img:
            extra = dict(init_latents=rng.uniform(-1, 1, shape).astype(np.float32))
            extra["strength"] = float(rng.choice(STRENGTHS))
        requests.append(ddim_jax.Request(s, jax.random.key(seed * 100_000 + i), **extra))
    return requests


class OneAtATime:
    """`sample` on each request alone (batch 1), one program for every S and start step."""

    def __init__(self, model_fn, params, shape, slots):
        base = ddim_jax.create_state(CONFIG)

        @jax.jit
        def run(params, num_steps, start, x, key):
            state = ddim_jax.set_timesteps(base, num_steps, max_steps=MAX_STEPS)
            return ddim_jax.sample(model_fn, state, x, key=key, model_args=(params,), start_step=start)

        self.run, self.params, self.shape, self.base = run, params, shape, base
        self.queue, self.calls, self.rows = collections.deque(), 0, 0

    def start_latents(self, requests):
        """x at each request's start step, as `Request` documents (the engine draws it the same way)."""
        xs, keys = [], []
        for r in requests:
            noise_key, step_key = jax.random.split(r.key)
            noise = jax.random.normal(noise_key, self.shape)
            if r.init_latents is not None:
                state = ddim_jax.set_timesteps(self.base, r.num_steps)
                t = state.timesteps[r.start_step]
                noise = ddim_jax.add_noise(state, jnp.asarray(r.init_latents), noise, t)
            xs.append(noise)
            keys.append(step_key)
        return jnp.stack(xs), jnp.stack(keys)

    def submit(self, request, arrival):
        self.queue.append((request, arrival))

    def busy(self):
        return bool(self.queue)

    def work(self):
        """Runs the next unit of work; returns the (request, arrival) pairs it finished."""
        r, arrival = self.queue.popleft()
        x, key = self.start_latents([r])
        B.block(self.run(self.params, np.int32(r.num_steps), np.int32(r.start_step), x, key))
        self.calls += r.num_steps - r.start_step
        self.rows += r.num_steps - r.start_step
        return [(r, arrival)]

    def next_deadline(self):
        return None


class EqualS(OneAtATime):
    """Batches of ``slots`` requests with the same S and start step, `sample` at batch B; a
    partial batch is flushed (padded with copies) once its oldest request waited ``timeout``."""

    def __init__(self, model_fn, params, shape, slots, timeout):
        super().__init__(model_fn, params, shape, slots)
        self.slots, self.timeout = slots, timeout
        self.groups = collections.defaultdict(collections.deque)

    def submit(self, request, arrival):
        self.groups[request.num_steps, request.start_step].append((request, arrival))

    def busy(self):
        return any(self.groups.values())

    def _ready(self, now):
        full = [g for g in self.groups.values() if len(g) >= self.slots]
        if full:
            return full[0]
        waiting = [g for g in self.groups.values() if g and now - g[0][1] >= self.timeout]
        return min(waiting, key=lambda g: g[0][1]) if waiting else None

    def ready(self, now):
        return self._ready(now) is not None

    def work(self, now=None):
        group = self._ready(time.perf_counter() if now is None else now)
        if group is None:
            return []
        batch = [group.popleft() for _ in range(min(self.slots, len(group)))]
        requests = [r for r, _ in batch]
        padded = requests + [requests[0]] * (self.slots - len(requests))
        x, keys = self.start_latents(padded)
        r = requests[0]
        B.block(self.run(self.params, np.int32(r.num_steps), np.int32(r.start_step), x, keys))
        self.calls += r.num_steps - r.start_step
        self.rows += len(requests) * (r.num_steps - r.start_step)
        return batch

    def next_deadline(self):
        oldest = [g[0][1] for g in self.groups.values() if g]
        return min(oldest) + self.timeout if oldest else None


class EnginePolicy:
    """`Engine` with ``slots`` slots: continuous admission, or (``padded``) a new batch only
    when every slot is free (the batch then runs to its largest S)."""

    def __init__(self, model_fn, params, shape, slots, steps_per_tick=1, padded=False):
        self.engine = ddim_jax.Engine(
            model_fn, CONFIG, slots=slots, latent_shape=shape, max_steps=MAX_STEPS,
            steps_per_tick=steps_per_tick, model_args=(params,),
        )  # fmt: skip
        self.slots, self.padded = slots, padded
        self.queue, self.arrivals = collections.deque(), {}

    def submit(self, request, arrival):
        self.queue.append((request, arrival))

    def busy(self):
        return bool(self.queue) or not self.engine.idle

    def work(self):
        if not self.padded or self.engine.idle:
            room = self.slots - self.engine.stats()["busy_slots"] - self.engine.stats()["queued"]
            for _ in range(min(room, len(self.queue))):
                r, arrival = self.queue.popleft()
                self.arrivals[self.engine.submit(r).id] = (r, arrival)
        return [self.arrivals.pop(h.id) for h in self.engine.step()]

    def next_deadline(self):
        return None

    @property
    def calls(self):
        return self.engine.stats()["model_calls"]

    @property
    def rows(self):
        return self.engine.stats()["request_steps"]


def drive(policy, requests, arrivals):
    """Runs ``requests`` arriving at ``arrivals`` (seconds from now); returns (wall, latencies)."""
    start = time.perf_counter()
    pending = collections.deque(zip(arrivals, requests, strict=True))
    latencies = []
    while pending or policy.busy():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            arrival, r = pending.popleft()
            policy.submit(r, arrival)
        ready = policy.ready(now) if isinstance(policy, EqualS) else policy.busy()
        if ready:
            finished = policy.work(now) if isinstance(policy, EqualS) else policy.work()
            done_at = time.perf_counter() - start
            latencies += [done_at - arrival for _, arrival in finished]
            continue
        wake = [t for t in (pending[0][0] if pending else None, policy.next_deadline()) if t is not None]
        time.sleep(max(0.0, min(wake) - (time.perf_counter() - start)) if wake else 0.0)
    return time.perf_counter() - start, np.asarray(latencies)


def tick_overhead(model_fn, params, shape, slots, repeats):
    """Seconds per step of the tick (k = 1 and k = 4, every slot running) and of `sample` at batch B."""
    base = ddim_jax.create_state(CONFIG)
    x = B.latents((slots, *shape))

    @jax.jit
    def run(params, x):
        state = ddim_jax.set_timesteps(base, np.int32(MAX_STEPS), max_steps=MAX_STEPS)
        return ddim_jax.sample(model_fn, state, x, model_args=(params,))

    contenders = {"sample": lambda: B.block(run(params, x))}
    per_call = {"sample": MAX_STEPS}
    release = np.zeros(slots, bool)
    for k in (1, 4):
        engine = ddim_jax.Engine(
            model_fn, CONFIG, slots=slots, latent_shape=shape, max_steps=MAX_STEPS, steps_per_tick=k,
            model_args=(params,),
        )  # fmt: skip
        for i in range(slots):
            engine.submit(ddim_jax.Request(MAX_STEPS, jax.random.key(i)))
        engine.step()  # admits and compiles

        def tick(engine=engine):  # the compiled tick and its host sync (slots past S run too, idle)
            engine._state, done = engine._tick(engine._state, release, (params,))
            np.asarray(done)

        contenders[f"tick, k={k}"], per_call[f"tick, k={k}"] = tick, k
    per = B.interleaved(contenders, repeats, stat=min, clock=time.process_time)
    return {name: t / per_call[name] for name, t in per.items()}


def run(quick: bool = False, repeats: int | None = None) -> str:
    kind = "quick" if quick else ("gpu" if B.on_gpu() else "cpu")
    name, shape, channels, slots = SETTINGS[kind]
    n = 16 if quick else 64
    repeats = repeats or (3 if quick else 7)
    model_fn, params = make_model(shape, channels)
    policies = {
        "one at a time": lambda: OneAtATime(model_fn, params, shape, slots),
        "padded": lambda: EnginePolicy(model_fn, params, shape, slots, padded=True),
        "equal S": lambda: EqualS(model_fn, params, shape, slots, timeout=0.0),
        "engine": lambda: EnginePolicy(model_fn, params, shape, slots),
        "engine, k=4": lambda: EnginePolicy(model_fn, params, shape, slots, steps_per_tick=4),
    }
    made = {label: make() for label, make in policies.items()}
    warm = make_requests(2 * slots, 99, False, shape) + make_requests(slots, 98, True, shape)
    for policy in made.values():  # compile (and warm) every program before timing
        drive(policy, warm, np.zeros(len(warm)))
    rows, throughput, batch_time = [], {}, 0.0
    rounds = 1 if quick else 3
    for mix, img2img in [
        ("S in {10, 25, 50}", False),
        ("S in {10, 25, 50}, strength in {0.3, 0.6, 1}", True),
    ]:
        requests = make_requests(n, 1 if img2img else 0, img2img, shape)
        wall, cpu, counts = collections.defaultdict(list), collections.defaultdict(list), {}
        for _ in range(rounds):  # interleaved rounds, best of: the CPU is shared
            for label, policy in made.items():
                calls, used, c0 = policy.calls, policy.rows, time.process_time()
                wall[label].append(drive(policy, requests, np.zeros(n))[0])
                cpu[label].append(time.process_time() - c0)
                counts[label] = (policy.calls - calls, policy.rows - used)
        for label in made:
            calls, used = counts[label]
            throughput[mix, label] = n / min(wall[label])
            width = 1 if label == "one at a time" else slots
            rows.append(
                [mix, label, f"{n / min(wall[label]):.1f}", f"{n / min(cpu[label]):.1f}", calls,
                 f"{used / (calls * width):.0%}"]
            )  # fmt: skip
            if label == "equal S" and not img2img:
                batch_time = min(wall[label]) / calls * np.mean(STEPS)  # seconds for a batch of mean S
        base = throughput[mix, "engine"]
        for row in rows[-len(made) :]:
            row.append(f"{base / throughput[mix, row[1]]:.2f}x")
    mix = "S in {10, 25, 50}"
    for label in ("padded", "equal S"):
        B.record("engine", f"engine / {label} throughput", throughput[mix, "engine"] / throughput[mix, label])
    # open-loop Poisson arrivals at fractions of the engine's saturation rate
    rate = throughput[mix, "engine"]
    made["equal S"] = EqualS(model_fn, params, shape, slots, timeout=batch_time)
    drive(made["equal S"], warm, np.zeros(len(warm)))
    latency_rows = []
    requests = make_requests(n, 2, False, shape)
    for load in LOADS:
        arrivals = np.cumsum(np.random.default_rng(int(10 * load)).exponential(1 / (load * rate), n))
        p99 = {}
        for label in ("one at a time", "padded", "equal S", "engine"):
            wall, lat = drive(made[label], requests, arrivals)
            p50, p95, p99[label] = np.percentile(lat, [50, 95, 99])
            latency_rows.append(
                [f"{load:.0%} ({load * rate:.1f}/s)", label, f"{1e3 * p50:.0f}", f"{1e3 * p95:.0f}",
                 f"{1e3 * p99[label]:.0f}", f"{n / wall:.1f}"]
            )  # fmt: skip
        if load == 0.6:
            B.record("engine", "p99 engine / equal S at 60%", p99["engine"] / p99["equal S"])
    per_step = tick_overhead(model_fn, params, shape, slots, repeats)
    step = per_step.pop("sample")
    for label, t in per_step.items():
        B.record("engine", f"{label} / sample step", t / step)
    tick_rows = [
        [label, f"{1e3 * t:.3f}", f"{1e3 * step:.3f}", f"{t / step:.2f}"] for label, t in per_step.items()
    ]
    setting = f"demo UNet {name} ch={channels}, B = {slots} slots, eta = 0, {n} requests"
    return (
        f"### Serving engine: saturation throughput ({setting}, every request queued at t = 0)\n\n"
        + B.table(
            [
                "mix",
                "policy",
                "images/s",
                "images per CPU-s",
                "model calls",
                "slot rows used",
                "engine / policy (images/s)",
            ],
            rows,
        )  # fmt: skip
        + f"\n\n### Serving engine: latency under Poisson arrivals ({setting}, k = 1; equal S flushes "
        f"a partial batch after {1e3 * batch_time:.0f} ms, one batch of mean S)\n\n"
        + B.table(["load (rate)", "policy", "p50 ms", "p95 ms", "p99 ms", "images/s"], latency_rows)
        + f"\n\n### Serving engine: the tick per step against one step of `sample` at batch {slots} "
        f"(process CPU time, best of {repeats} interleaved repeats)\n\n"
        + B.table(["tick", "tick ms per step", "sample ms per step", "tick / sample"], tick_rows)
        + "\n"
    )


def plot(results: str, out: str, section: str = "cpu: cpu | engine") -> None:
    """Draws p50 and p99 latency against load for each policy from the latency table in
    ``results`` (benchmarks/RESULTS.md, this suite's section) to ``out`` (a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(results, encoding="utf-8") as f:
        text = f.read()
    body = text.split(f"<!-- section: {section} -->", 1)[1].split("<!-- end section -->", 1)[0]
    table = body.split("latency under Poisson arrivals", 1)[1].split("###", 1)[0]
    points = collections.defaultdict(list)
    for load, policy, p50, _, p99, _ in re.findall(
        r"^\| (\d+)% \([^)]*\) \| ([^|]+) \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \|$", table, re.M
    ):
        points[policy.strip()].append((int(load), int(p50), int(p99)))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, column, title in [(axes[0], 1, "p50"), (axes[1], 2, "p99")]:
        for policy, values in points.items():
            ax.plot([v[0] for v in values], [v[column] for v in values], "o-", label=policy)
        ax.set(xlabel="load (% of the engine's saturation rate)", title=f"{title} latency", yscale="log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("latency (ms)")
    axes[1].legend()
    fig.suptitle("Serving policies under Poisson arrivals (S in {10, 25, 50}, demo UNet, shared 2-core CPU)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    p = B.parser(__doc__.splitlines()[0])
    p.add_argument("--plot", nargs=2, metavar=("RESULTS_MD", "PNG"), help="only draw the latency figure")
    args = p.parse_args()
    if args.plot:
        plot(*args.plot)
    else:
        print(run(quick=args.quick, repeats=args.repeats))
