"""`Engine`: step-level (continuous) batching of DDIM requests in one compiled program.

A fixed number of slots B share one compiled tick: each slot holds one request with its own
step count S <= M, start step, eta, key, guidance scale and conditioning, and every tick
advances every running slot by k steps with one model call per step over all B slots (2B
when guided), each slot at its own timestep. Between ticks, finished slots are retired and
free ones take the next queued requests. The functional core (`EngineCore`: ``init``,
``admit``, ``tick``) is pure and jit-friendly; `Engine` is the host side (queue, handles,
results) around it, with one compiled program for admission and one for the tick.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ddim_jax._checks import ETA, ETA_REASON, Interval, check_in, eta_in_range
from ddim_jax._config import DDIMConfig
from ddim_jax._forward import add_noise
from ddim_jax._guidance import classifier_free_guidance
from ddim_jax._model_call import check_call_options, check_model_output
from ddim_jax._noise import key_batch_shape, step_keys
from ddim_jax._padded import schedule_is_valid
from ddim_jax._sample import check_runtime_key
from ddim_jax._state import DDIMState, create_state, set_timesteps
from ddim_jax._step import StepCoefficients, alpha_at, ddim_update, step_coefficients

__all__ = ["Engine", "EngineCore", "EngineState", "Request", "RequestHandle", "SlotRequest"]


class EngineState(NamedTuple):
    """The engine's device state: one row per slot (B slots, M = ``max_steps``).

    Attributes:
      x: ``(B, *latent_shape)`` float32, each slot's current latents (0 in a free slot).
      timesteps: ``(B, M)`` int32, each slot's padded schedule.
      coefs: `StepCoefficients` of ``(B, M)`` float32 each: each slot's per-step scalars.
      keys: ``(B, M)`` keys, the key of each slot's steps (its eta noise).
      step: ``(B,)`` int32, the index of the slot's next step.
      stop: ``(B,)`` int32, the slot's S (where its steps end).
      occupied: ``(B,)`` bool, the slot holds a request (running, or finished and not yet released).
      guidance_scale: ``(B,)`` float32, each slot's CFG scale (unused when not guided).
      guidance_rescale: ``(B,)`` float32, each slot's guidance rescale phi.
      cond, uncond: ``(B, *cond_shape)`` float32 conditioning (None without ``cond_shape``).
    """

    x: jax.Array
    timesteps: jax.Array
    coefs: StepCoefficients
    keys: jax.Array
    step: jax.Array
    stop: jax.Array
    occupied: jax.Array
    guidance_scale: jax.Array
    guidance_rescale: jax.Array
    cond: jax.Array | None
    uncond: jax.Array | None


class SlotRequest(NamedTuple):
    """One request as arrays, the admission program's input (all leaves may be traced).

    Attributes:
      num_steps: int32 scalar S.
      start_step: int32 scalar, the first step run (0 for text-to-image).
      eta: float32 scalar.
      key: the request's key data (``jax.random.key_data``: uint32), wrapped with the engine's
        ``key_impl`` inside admission (plain arrays cross processes and the jit boundary).
      latents: ``latent_shape`` float32: x_T, or the image (x0) to noise when ``img2img``.
      draw_latents: bool scalar: draw x_T from the key instead of using ``latents``.
      img2img: bool scalar: noise ``latents`` to the start step's level (`add_noise`).
      guidance_scale, guidance_rescale: float32 scalars.
      cond, uncond: ``cond_shape`` float32, or None.
    """

    num_steps: jax.Array
    start_step: jax.Array
    eta: jax.Array
    key: jax.Array
    latents: jax.Array
    draw_latents: jax.Array
    img2img: jax.Array
    guidance_scale: jax.Array
    guidance_rescale: jax.Array
    cond: jax.Array | None
    uncond: jax.Array | None


def request_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(noise_key, step_key) = jax.random.split(key)``: x_T (or the image-to-image noise) is
    ``jax.random.normal(noise_key, latent_shape)``; the eta noise is what `sample` draws with
    ``key=step_key[None]`` (one key per example, a batch of one)."""
    noise_key, step_key = jax.random.split(key)
    return noise_key, step_key


@dataclasses.dataclass(frozen=True)
class EngineCore:
    """The engine's pure functions: ``init() -> state``, ``admit(state, slot, request) ->
    state``, ``tick(state, release, model_args) -> (state, finished)``; jit them (the state
    donated) or call them inside your own jitted code. `Engine` is the host side around them.

    ``model_fn(x, t, *model_args[, cond])`` gets ``t`` as a ``(B,)`` int32 array (``(2B,)``
    when guided), one timestep per row, and must treat the rows independently (no batch
    statistics); with ``cond_shape`` the conditioning comes last, ``(B, *cond_shape)`` (or
    the doubled batch ``[uncond, cond]`` in ``guidance_layout`` order when guided).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import ddim_jax
      >>> core = ddim_jax.EngineCore(lambda x, t: 0.1 * x, ddim_jax.create_state(ddim_jax.DDIMConfig()),
      ...                            slots=2, latent_shape=(3,), max_steps=10)
      >>> state = core.init()
      >>> request = core.request(num_steps=4, key=jax.random.key(0))
      >>> state = jax.jit(core.admit)(state, 1, request)
      >>> state, finished = jax.jit(core.tick)(state, jnp.zeros(2, bool), ())
      >>> state.step.tolist(), finished.tolist()
      ([0, 1], [False, False])
    """

    model_fn: Callable[..., jax.Array]
    base: DDIMState
    slots: int
    latent_shape: tuple[int, ...]
    max_steps: int
    steps_per_tick: int = 1
    cond_shape: tuple[int, ...] | None = None
    guided: bool = False
    guidance_layout: str = "concat"
    model_dtype: Any = None
    key_impl: Any = None

    @property
    def config(self) -> DDIMConfig:
        return self.base.config

    def _key(self, seed: int = 0) -> jax.Array:
        return jax.random.key(seed, impl=self.key_impl)

    def init(self) -> EngineState:
        """All slots free: zero latents, empty schedules."""
        b, m = self.slots, self.max_steps
        cond = lambda: None if self.cond_shape is None else jnp.zeros((b, *self.cond_shape), jnp.float32)  # noqa: E731
        return EngineState(
            x=jnp.zeros((b, *self.latent_shape), jnp.float32),
            timesteps=jnp.full((b, m), -1, jnp.int32),
            coefs=StepCoefficients(*(jnp.zeros((b, m), jnp.float32) for _ in StepCoefficients._fields)),
            keys=jax.random.split(self._key(), b * m).reshape(b, m),
            step=jnp.zeros(b, jnp.int32),
            stop=jnp.zeros(b, jnp.int32),
            occupied=jnp.zeros(b, bool),
            guidance_scale=jnp.zeros(b, jnp.float32),
            guidance_rescale=jnp.zeros(b, jnp.float32),
            cond=cond(),
            uncond=cond(),  # distinct buffers: the state is donated
        )

    def request(
        self,
        num_steps: Any,
        key: jax.Array,
        *,
        start_step: Any = 0,
        eta: Any = 0.0,
        latents: Any = None,
        img2img: bool = False,
        guidance_scale: Any = 0.0,
        guidance_rescale: Any = 0.0,
        cond: Any = None,
        uncond: Any = None,
    ) -> SlotRequest:
        """A `SlotRequest` (no checks: invalid values give a NaN result for that slot);
        ``latents=None`` draws x_T from the key (`request_keys`)."""
        cond_zero = None if self.cond_shape is None else jnp.zeros(self.cond_shape, jnp.float32)
        return SlotRequest(
            num_steps=jnp.asarray(num_steps, jnp.int32),
            start_step=jnp.asarray(start_step, jnp.int32),
            eta=jnp.asarray(eta, jnp.float32),
            key=jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key,
            latents=jnp.zeros(self.latent_shape, jnp.float32) if latents is None else jnp.asarray(latents),
            draw_latents=jnp.asarray(latents is None),
            img2img=jnp.asarray(img2img),
            guidance_scale=jnp.asarray(guidance_scale, jnp.float32),
            guidance_rescale=jnp.asarray(guidance_rescale, jnp.float32),
            cond=cond_zero if cond is None else jnp.asarray(cond, jnp.float32),
            uncond=cond_zero if uncond is None else jnp.asarray(uncond, jnp.float32),
        )

    def admit(self, state: EngineState, slot: jax.Array, request: SlotRequest) -> EngineState:
        """``state`` with ``request`` in ``slot`` (a traced int): every field of the slot is
        overwritten, so nothing of its previous occupant remains. The slot's schedule and
        per-step scalars are computed here from its S and eta, as `sample` computes them
        before its loop. An invalid S, start step or eta makes the slot's result NaN."""
        config, m, r = self.config, self.max_steps, request
        padded = set_timesteps(self.base, r.num_steps, max_steps=m)
        timesteps, prev = padded.timesteps, padded.prev_timesteps
        eta = r.eta.astype(jnp.float32)
        alpha_t, alpha_prev = alpha_at(padded, timesteps), alpha_at(padded, prev)
        noisy = step_coefficients(config, alpha_t, alpha_prev, eta, True)
        plain = step_coefficients(config, alpha_t, alpha_prev, eta, False)  # sample's eta = 0
        coefs = jax.tree.map(lambda n, p: jnp.where(eta == 0, p, n), noisy, plain)
        noise_key, step_key = request_keys(jax.random.wrap_key_data(r.key, impl=self.key_impl))
        keys = step_keys(step_key[None], m)[:, 0]
        noise = jax.random.normal(noise_key, self.latent_shape, jnp.float32)
        given = r.latents.astype(jnp.float32)
        x = jnp.where(r.draw_latents, noise, given)
        t_start = timesteps[jnp.clip(r.start_step, 0, m - 1)]
        noised = add_noise(padded, given[None], noise[None], t_start[None])[0]
        x = jnp.where(r.img2img, noised, x)
        valid = schedule_is_valid(timesteps, r.num_steps, r.start_step, config.num_train_timesteps)
        valid = valid & eta_in_range(eta)
        x = jnp.where(valid, x, jnp.nan)

        chosen = jnp.arange(self.slots) == slot

        def put(table, row):  # a select, not a scatter: elementwise on sharded slots too
            return jnp.where(chosen.reshape((-1,) + (1,) * (table.ndim - 1)), row, table)

        return EngineState(
            x=put(state.x, x),
            timesteps=put(state.timesteps, timesteps),
            coefs=jax.tree.map(put, state.coefs, coefs),
            keys=put(state.keys, keys),
            step=put(state.step, jnp.where(valid, r.start_step, 0)),
            stop=put(state.stop, jnp.where(valid, r.num_steps, 0)),  # invalid: done at once
            occupied=put(state.occupied, True),
            guidance_scale=put(state.guidance_scale, r.guidance_scale),
            guidance_rescale=put(state.guidance_rescale, r.guidance_rescale),
            cond=None if state.cond is None else put(state.cond, r.cond),
            uncond=None if state.uncond is None else put(state.uncond, r.uncond),
        )

    def model_output(self, state: EngineState, x: jax.Array, t: jax.Array, model_args: tuple) -> jax.Array:
        """The (guided) model output for the slots' latents ``x`` at per-slot timesteps ``t``."""
        x_in = x if self.model_dtype is None else x.astype(self.model_dtype)
        if not self.guided:
            cond = () if state.cond is None else (state.cond,)
            out = self.model_fn(x_in, t, *model_args, *cond)
            check_model_output(out)
            if out.shape != x.shape:
                raise ValueError(f"model_fn must return an array of shape {x.shape}, got {out.shape}")
            return out.astype(x.dtype)
        if self.guidance_layout == "concat":
            double = lambda a, b: jnp.concatenate([a, b])  # noqa: E731
        else:
            double = lambda a, b: jnp.stack([a, b], 1).reshape((-1, *a.shape[1:]))  # noqa: E731
        cond = () if state.cond is None else (double(state.uncond, state.cond),)
        doubled = double(x_in, x_in)
        out = self.model_fn(doubled, double(t, t), *model_args, *cond)
        check_model_output(out)
        if out.shape != doubled.shape:
            raise ValueError(
                f"with guided=True, model_fn must return the doubled batch of shape {doubled.shape}, "
                f"got {out.shape}"
            )
        out = out.astype(x.dtype)
        if self.guidance_layout == "concat":
            uncond, cond_out = jnp.split(out, 2)
        else:
            pairs = out.reshape((x.shape[0], 2, *x.shape[1:]))
            uncond, cond_out = pairs[:, 0], pairs[:, 1]
        # phi = 0 gives plain CFG exactly (rescale_noise_cfg: 1 * cfg + 0 * finite)
        return classifier_free_guidance(uncond, cond_out, state.guidance_scale, state.guidance_rescale)

    def tick(
        self, state: EngineState, release: jax.Array, model_args: tuple = ()
    ) -> tuple[EngineState, jax.Array]:
        """Frees the slots in ``release`` ((B,) bool: retired or cancelled), then advances every
        running slot by ``steps_per_tick`` steps, one model call per step over all slots, each
        at its own timestep; returns the state and the ``(B,)`` bool of occupied slots whose
        steps are done (their results are ``state.x``)."""
        config, ndim = self.config, 1 + len(self.latent_shape)
        occupied = state.occupied & ~release
        per_slot = lambda v: v.reshape(v.shape + (1,) * (ndim - 1))  # noqa: E731
        x = jnp.where(per_slot(occupied), state.x, 0.0)  # free slots hold zeros
        stop = jnp.where(occupied, state.stop, 0)
        step = jnp.where(occupied, state.step, 0)
        rows = jnp.arange(x.shape[0])  # this device's slots under shard_map

        def one_step(carry, _):
            x, step = carry
            running = occupied & (step < stop)
            index = jnp.clip(step, 0, self.max_steps - 1)
            t = jnp.where(running, state.timesteps[rows, index], 0)
            coef = StepCoefficients(*(c[rows, index] for c in state.coefs)).per_example(ndim)
            out = self.model_output(state, x, t, model_args)
            noisy = jnp.any(running & (coef.std.reshape(-1) > 0))
            noise = jax.lax.cond(
                noisy,
                lambda: jax.vmap(lambda k: jax.random.normal(k, self.latent_shape, x.dtype))(
                    state.keys[rows, index]
                ),
                lambda: jnp.zeros_like(x),
            )
            new = ddim_update(config, coef, out, x, noise=noise).prev_sample
            return (jnp.where(per_slot(running), new, x), step + running), None

        (x, step), _ = jax.lax.scan(one_step, (x, step), None, length=self.steps_per_tick)
        state = state._replace(x=x, step=step, stop=stop, occupied=occupied)
        return state, occupied & (step >= stop)


@dataclasses.dataclass(frozen=True)
class Request:
    """One image to generate: its step count, key and options (validated by `Engine.submit`).

    Attributes:
      num_steps: S, an int in [1, max_steps].
      key: a ``jax.random`` key (``jax.random.key(seed)``; legacy uint32 keys are wrapped).
        ``noise_key, step_key = jax.random.split(key)``: x_T (when ``latents`` is None) and the
        image-to-image noise are ``jax.random.normal(noise_key, latent_shape)``, and the eta
        noise is `sample`'s with ``key=step_key[None]``.
      eta: DDIM's eta in [0, 1].
      guidance_scale: the CFG scale w (a float >= 0), required by a guided engine, refused by
        an unguided one.
      guidance_rescale: guidance rescale phi in [0, 1] (diffusers' ``guidance_rescale``), guided only.
      cond: the conditioning, of the engine's ``cond_shape`` (with ``cond_shape`` only).
      uncond: the unconditional conditioning of a guided engine (a negative prompt); default
        the engine's ``uncond``.
      latents: x_T, of the engine's ``latent_shape``; None draws it from the key.
      init_latents: the image (x0) for image-to-image, noised to the start step's level.
      strength: image-to-image strength in (0, 1]: the request runs the last
        ``int(num_steps * strength)`` steps (diffusers' rule: ``start_step = S - int(S * s)``).

    Example:
      >>> import jax, ddim_jax
      >>> ddim_jax.Request(25, jax.random.key(0), eta=0.5).num_steps
      25
    """

    num_steps: int
    key: Any
    eta: float = 0.0
    guidance_scale: float | None = None
    cond: Any = None
    uncond: Any = None
    latents: Any = None
    init_latents: Any = None
    strength: float | None = None
    guidance_rescale: float = 0.0

    @property
    def start_step(self) -> int:
        """The first step run: 0, or ``S - int(S * strength)`` for image-to-image."""
        if self.strength is None:
            return 0
        return self.num_steps - int(self.num_steps * self.strength)


class RequestHandle:
    """A submitted request: its ``status`` ("queued", "running", "done", "cancelled") and,
    once done, its ``result()``. Made by `Engine.submit`.

    Example:
      >>> import jax, ddim_jax
      >>> engine = ddim_jax.Engine(lambda x, t: 0.1 * x, ddim_jax.DDIMConfig(), slots=1,
      ...                          latent_shape=(2,), max_steps=5)
      >>> handle = engine.submit(ddim_jax.Request(5, jax.random.key(0)))
      >>> handle.status
      'queued'
    """

    def __init__(self, request: Request, number: int):
        self.request = request
        self.id = number
        self.status = "queued"
        self.slot: int | None = None
        self._result: np.ndarray | None = None
        self._slot_request: SlotRequest | None = None

    def done(self) -> bool:
        return self.status == "done"

    def result(self) -> np.ndarray:
        """The final latents, ``latent_shape`` float32 (numpy); a RuntimeError unless done."""
        if self.status != "done":
            raise RuntimeError(f"request {self.id} is {self.status}, not done: it has no result")
        return self._result

    def __repr__(self) -> str:
        return f"RequestHandle(id={self.id}, status={self.status!r}, num_steps={self.request.num_steps})"


def _python_int(name: str, value: Any, low: int, high: int) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or not low <= number <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return number


def _python_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or np.ndim(value) != 0 or isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a Python or numpy float, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    return number


def _host_array(name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A float array of ``shape``, copied to the host as float32 (finite values only)."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a concrete array, not a traced one")
    dtype = getattr(value, "dtype", None)
    array = np.asarray(value)
    kind = np.dtype(dtype) if dtype is not None else array.dtype
    if kind.kind != "f" or kind.itemsize > 4:
        raise TypeError(f"{name} must be a float32 (or narrower float) array, got dtype {kind}")
    if array.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {array.shape}")
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got NaN or inf values")
    return array


_REMOTE = object()  # a slot taken on process 0, in another process's view of a multi-process run


class Engine:
    """Serves a stream of requests, each with its own S, start step, eta, key, guidance scale
    and conditioning, from a fixed batch of slots in one compiled tick.

    Each `Engine.step` admits queued requests into free slots, runs one tick (``steps_per_tick``
    steps, one model call each over all slots, each slot at its own timestep; no host round
    trip inside it), then reads the finished flags and retires those requests. A request's
    result equals `sample` run on it alone (same S, start step, eta, key, guidance and
    conditioning; see `Request` for how its key is used) to float32 round-off, whatever its
    slot and neighbours. Not thread-safe: drive it from one thread.

    Args:
      model_fn: ``model_fn(x, t, *model_args[, cond])``; ``t`` is a ``(slots,)`` int32 array
        (``(2 * slots,)`` when guided), one timestep per row; rows must not interact (no batch
        statistics). Free slots are called with zero latents at ``t = 0``.
      config_or_state: a `DDIMConfig`, or a state from `create_state` (its timesteps unused).
      slots: B, the batch the model sees (2B when guided).
      latent_shape: one request's latents, without the batch axis.
      max_steps: M, the largest S a request may ask for.
      steps_per_tick: k >= 1, steps per tick (fewer host syncs; a request finishing
        mid-tick leaves its slot idle for the rest of it).
      model_args: extra model arguments (parameters): traced arguments of the compiled tick,
        never constants; assign ``engine.model_args`` to swap them (same shapes: no recompile).
      cond_shape: one request's conditioning shape, or None for an unconditional model.
      guided: classifier-free guidance: the model is called on the doubled batch and each
        request needs a ``guidance_scale``.
      guidance_layout: ``"concat"`` ([x, x], conditioning [uncond, cond]) or ``"interleave"``
        (each slot's pair adjacent), as in `sample`.
      model_dtype: the dtype the model sees (e.g. ``jnp.bfloat16``); the carry stays float32.
      mesh: a `jax.sharding.Mesh`: slots are sharded over its first axis (``slots`` must be
        a multiple of its size there).
      uncond: the default unconditional conditioning (``cond_shape``) of a guided engine;
        zeros if None.
      key_impl: the PRNG implementation of the requests' keys (None: jax's default).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import ddim_jax
      >>> def model_fn(x, t, w):  # t: one timestep per slot
      ...     return w * x + 1e-4 * t[:, None]
      >>> engine = ddim_jax.Engine(model_fn, ddim_jax.DDIMConfig(), slots=2, latent_shape=(3,),
      ...                          max_steps=50, model_args=(jnp.float32(0.1),))
      >>> handles = [engine.submit(ddim_jax.Request(s, jax.random.key(s))) for s in (10, 25, 50)]
      >>> engine.run_until_idle()
      >>> [h.status for h in handles], handles[0].result().shape
      (['done', 'done', 'done'], (3,))
      >>> stats = engine.stats()
      >>> stats["done"], stats["model_calls"], engine.traces["tick"]
      (3, 60, 1)
    """

    def __init__(
        self,
        model_fn: Callable[..., jax.Array],
        config_or_state: DDIMConfig | DDIMState,
        *,
        slots: int,
        latent_shape: tuple[int, ...],
        max_steps: int,
        steps_per_tick: int = 1,
        model_args: tuple = (),
        cond_shape: tuple[int, ...] | None = None,
        guided: bool = False,
        guidance_layout: str = "concat",
        model_dtype: Any = None,
        mesh: jax.sharding.Mesh | None = None,
        uncond: Any = None,
        key_impl: Any = None,
    ):
        check_call_options(model_fn, model_args, guidance_layout, model_dtype)
        if isinstance(config_or_state, DDIMConfig):
            base = create_state(config_or_state)
        elif isinstance(config_or_state, DDIMState):
            base = config_or_state
        else:
            raise TypeError(
                f"config_or_state must be a DDIMConfig or a DDIMState, got {type(config_or_state).__name__}"
            )
        n_train = base.config.num_train_timesteps
        slots = _python_int("slots", slots, 1, 2**20)
        max_steps = _python_int("max_steps", max_steps, 1, n_train)
        steps_per_tick = _python_int("steps_per_tick", steps_per_tick, 1, max_steps)
        set_timesteps(base, 1, max_steps=max_steps)  # the state's own checks (e.g. M * T < 2**31)
        latent_shape = self._shape("latent_shape", latent_shape)
        cond_shape = None if cond_shape is None else self._shape("cond_shape", cond_shape)
        if not isinstance(guided, bool):
            raise TypeError(f"guided must be a bool, got {guided!r}")
        if mesh is not None:
            if not isinstance(mesh, jax.sharding.Mesh):
                raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
            size = mesh.shape[mesh.axis_names[0]]
            if slots % size:
                raise ValueError(
                    f"slots={slots} must be a multiple of the mesh's {mesh.axis_names[0]!r} axis ({size})"
                )
        if uncond is not None and not (guided and cond_shape is not None):
            raise ValueError("uncond needs guided=True and a cond_shape")
        self.core = EngineCore(
            model_fn, base, slots, latent_shape, max_steps, steps_per_tick, cond_shape, guided,
            guidance_layout, model_dtype, key_impl,
        )  # fmt: skip
        check_runtime_key(self.core._key())  # step i's key is split(key, M)[i], as in sample
        self.model_args = model_args
        self.mesh = mesh
        self._uncond = None
        if cond_shape is not None:
            zeros = np.zeros(cond_shape, np.float32)
            self._uncond = zeros if uncond is None else _host_array("uncond", uncond, cond_shape)
        self.traces = {"admit": 0, "tick": 0}
        self._admit, self._tick = self._programs()
        self._distributed = mesh is not None and jax.process_count() > 1
        self._state = self._init()
        self._queue: deque[RequestHandle] = deque()
        self._slots: list[RequestHandle | None] = [None] * slots
        self._release = np.zeros(slots, bool)
        self._numbers = itertools.count()
        self._counts = dict(done=0, refused=0, cancelled=0, ticks=0, model_calls=0, request_steps=0)

    @staticmethod
    def _shape(name: str, shape: Any) -> tuple[int, ...]:
        if not isinstance(shape, (tuple, list)) or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in shape
        ):
            raise ValueError(f"{name} must be a tuple of positive ints, got {shape!r}")
        return tuple(int(d) for d in shape)

    def _sharding(self, rank: int) -> Any:
        if self.mesh is None:
            return None
        spec = jax.sharding.PartitionSpec(self.mesh.axis_names[0], *(None,) * (rank - 1))
        return jax.sharding.NamedSharding(self.mesh, spec)

    def _init(self) -> EngineState:
        if self.mesh is None:
            return self.core.init()
        shardings = jax.tree.map(lambda v: self._sharding(v.ndim), jax.eval_shape(self.core.init))
        return jax.jit(self.core.init, out_shardings=shardings)()

    def _global(self, value: np.ndarray) -> Any:
        """A host (B, ...) array as the tick's sharded input (the same value on every process)."""
        if self.mesh is None:
            return value
        return jax.make_array_from_callback(
            value.shape, self._sharding(value.ndim), lambda index: value[index]
        )

    def _host(self, array: jax.Array) -> np.ndarray:
        """A sharded array's whole value on this host (a collective across processes)."""
        if self._distributed:
            return np.asarray(multihost_utils.process_allgather(array, tiled=True))
        return np.asarray(array)

    def _programs(self) -> tuple[Callable, Callable]:
        core = self.core

        def admit(state, slot, request):
            self.traces["admit"] += 1  # runs only when jax traces (compiles)
            return core.admit(state, slot, request)

        def tick(state, release, model_args):
            self.traces["tick"] += 1
            return core.tick(state, release, model_args)

        if self.mesh is None:
            return jax.jit(admit, donate_argnums=0), jax.jit(tick, donate_argnums=0)
        # Sharded: the tick runs per device on its own slots (shard_map), so it moves no data
        # between devices whatever the guidance layout; the model sees the local slots.
        axis = self.mesh.axis_names[0]
        shapes = jax.eval_shape(core.init)
        specs = jax.tree.map(lambda v: jax.sharding.PartitionSpec(axis), shapes)
        local_tick = jax.shard_map(
            tick,
            mesh=self.mesh,
            in_specs=(specs, jax.sharding.PartitionSpec(axis), jax.sharding.PartitionSpec()),
            out_specs=(specs, jax.sharding.PartitionSpec(axis)),
        )
        shardings = jax.tree.map(lambda v: self._sharding(v.ndim), shapes)
        return jax.jit(admit, donate_argnums=0, out_shardings=shardings), jax.jit(
            local_tick, donate_argnums=0
        )

    # -- submission -------------------------------------------------------------------------

    def _key(self, key: Any) -> jax.Array:
        shape = key_batch_shape(key)
        if shape != ():
            raise TypeError(
                "key must be one jax.random key, e.g. jax.random.key(0) (not a batch of keys), got "
                f"{type(key).__name__} with shape {jnp.shape(key)}"
            )
        if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key, impl=self.core.key_impl)
        expected = jax.random.key_impl(self.core._key())
        if jax.random.key_impl(key) != expected:
            raise ValueError(
                f"key must be a {expected} key (the engine's key_impl), got {jax.random.key_impl(key)}"
            )
        return key

    def _slot_request(self, req: Request) -> SlotRequest:
        """Validates ``req`` (errors name the field) and converts it to `SlotRequest` arrays."""
        if not isinstance(req, Request):
            raise TypeError(f"submit takes a ddim_jax.Request, got {type(req).__name__}")
        core = self.core
        s = _python_int("num_steps", req.num_steps, 1, core.max_steps)
        key = self._key(req.key)
        eta = _python_float("eta", req.eta)
        check_in("eta", eta, ETA, ETA_REASON)
        if core.guided:
            if req.guidance_scale is None:
                raise ValueError("guidance_scale is required: the engine is guided (guided=True)")
            scale = _python_float("guidance_scale", req.guidance_scale)
            if scale < 0:
                raise ValueError(f"guidance_scale must be >= 0, got {scale}")
            rescale = _python_float("guidance_rescale", req.guidance_rescale)
            check_in("guidance_rescale", rescale, Interval(0, 1))
        elif req.guidance_scale is not None:
            raise ValueError("guidance_scale must be None: the engine is not guided (guided=False)")
        elif req.guidance_rescale != 0:
            raise ValueError("guidance_rescale must be 0: the engine is not guided (guided=False)")
        else:
            scale = rescale = 0.0
        cond = uncond = None
        if core.cond_shape is None:
            for name in ("cond", "uncond"):
                if getattr(req, name) is not None:
                    raise ValueError(f"{name} must be None: the engine has no cond_shape")
        else:
            if req.cond is None:
                raise ValueError(f"cond is required: the engine's cond_shape is {core.cond_shape}")
            cond = _host_array("cond", req.cond, core.cond_shape)
            if req.uncond is not None and not core.guided:
                raise ValueError("uncond must be None: the engine is not guided (guided=False)")
            uncond = (
                self._uncond if req.uncond is None else _host_array("uncond", req.uncond, core.cond_shape)
            )
        if req.init_latents is not None or req.strength is not None:
            if req.init_latents is None or req.strength is None:
                raise ValueError("image-to-image needs both init_latents and strength")
            if req.latents is not None:
                raise ValueError("pass latents (x_T) or init_latents (image-to-image), not both")
            strength = _python_float("strength", req.strength)
            if not 0 < strength <= 1:
                raise ValueError(f"strength must be in (0, 1], got {strength}")
            if int(s * strength) < 1:
                raise ValueError(
                    f"strength={strength} with num_steps={s} runs int(num_steps * strength) = 0 steps: "
                    "raise strength or num_steps"
                )
            latents, img2img = _host_array("init_latents", req.init_latents, core.latent_shape), True
        elif req.latents is not None:
            latents, img2img = _host_array("latents", req.latents, core.latent_shape), False
        else:
            latents, img2img = None, False
        return core.request(
            s, key, start_step=req.start_step, eta=eta, latents=latents, img2img=img2img,
            guidance_scale=scale, guidance_rescale=rescale, cond=cond, uncond=uncond,
        )  # fmt: skip

    def submit(self, request: Request) -> RequestHandle:
        """Queues ``request``; a ValueError or TypeError naming the field if it is invalid (then
        nothing else changes and it counts as refused)."""
        try:
            slot_request = self._slot_request(request)
        except (TypeError, ValueError):
            self._counts["refused"] += 1
            raise
        if self._distributed and jax.process_index() != 0:
            raise RuntimeError("in a multi-process run, submit on process 0: it decides admission")
        handle = RequestHandle(request, next(self._numbers))
        handle._slot_request = jax.tree.map(np.asarray, slot_request)
        self._queue.append(handle)
        return handle

    def cancel(self, handle: RequestHandle) -> bool:
        """Cancels a queued or running request (its slot is freed at the next tick); False if
        it had already finished or been cancelled."""
        if handle.status == "queued":
            self._queue.remove(handle)
        elif handle.status == "running":
            self._slots[handle.slot] = None
            self._release[handle.slot] = True
        else:
            return False
        handle.status = "cancelled"
        handle._slot_request = None
        self._counts["cancelled"] += 1
        return True

    # -- running ---------------------------------------------------------------------------

    def _admissions(self) -> tuple[list[tuple[int, SlotRequest]], np.ndarray]:
        """The (slot, request) pairs to admit now, and the release mask; in a multi-process run
        decided on process 0 and broadcast to the others."""
        admitted = []
        for slot, occupant in enumerate(self._slots):
            if occupant is None and self._queue:
                handle = self._queue.popleft()
                admitted.append((slot, handle._slot_request))
                handle._slot_request = None
                handle.status, handle.slot = "running", slot
                self._slots[slot] = handle
                self._release[slot] = False
        release = self._release.copy()
        if not self._distributed:
            return admitted, release
        template = self._template
        rows = [np.zeros(self.core.slots, bool), release, jax.tree.map(np.copy, template)]
        for slot, request in admitted:
            rows[0][slot] = True
            for table, value in zip(jax.tree.leaves(rows[2]), jax.tree.leaves(request), strict=True):
                table[slot] = value
        chosen, release, table = jax.tree.map(
            np.asarray, multihost_utils.broadcast_one_to_all(rows, is_source=jax.process_index() == 0)
        )
        admitted = [
            (int(slot), jax.tree.map(lambda v, s=slot: v[s], table)) for slot in np.flatnonzero(chosen)
        ]
        for slot in np.flatnonzero(release):  # cancelled on process 0
            if self._slots[slot] is _REMOTE:
                self._slots[slot] = None
        for slot, _ in admitted:
            if self._slots[slot] is None:  # another process's view: the slot is taken
                self._slots[slot] = _REMOTE
        return admitted, release

    @property
    def _template(self) -> SlotRequest:
        """A (B, ...) numpy table of slot requests, all zeros (the broadcast's fixed shapes)."""
        one = self.core.request(1, self.core._key())
        return jax.tree.map(lambda v: np.zeros((self.core.slots, *np.shape(v)), np.asarray(v).dtype), one)

    def step(self) -> list[RequestHandle]:
        """Admits queued requests into free slots, runs one tick, retires the finished
        requests; returns the handles that finished now (none if nothing is running)."""
        admitted, release = self._admissions()
        for slot, request in admitted:
            self._state = self._admit(self._state, np.int32(slot), request)
        if all(occupant is None for occupant in self._slots):
            return []
        self._state, finished = self._tick(self._state, self._global(release), self.model_args)
        self._release[:] = False
        self._counts["ticks"] += 1
        self._counts["model_calls"] += self.core.steps_per_tick
        finished = self._host(finished)  # the one host sync of a tick
        done = []
        if any(finished[slot] for slot, h in enumerate(self._slots) if h is not None):
            x = self._host(self._state.x)
            for slot, handle in enumerate(self._slots):
                if handle is None or not finished[slot]:
                    continue
                self._slots[slot] = None
                self._release[slot] = True
                if handle is _REMOTE:
                    continue
                handle._result = x[slot].copy()
                handle.status = "done"
                done.append(handle)
                self._counts["done"] += 1
                self._counts["request_steps"] += handle.request.num_steps - handle.request.start_step
        return done

    def run_until_idle(self, max_ticks: int | None = None) -> None:
        """Steps until no request is queued or running (or ``max_ticks`` ticks have run). In a
        multi-process run, call it on every process: process 0's queue decides when to stop."""
        ticks = 0
        while max_ticks is None or ticks < max_ticks:
            busy = not self.idle
            if self._distributed:
                busy = bool(multihost_utils.broadcast_one_to_all(np.bool_(busy)))
            if not busy:
                return
            self.step()
            ticks += 1

    def wait(self, handle: RequestHandle) -> np.ndarray:
        """Steps until ``handle`` is done; its result (a RuntimeError if it was cancelled)."""
        while handle.status in ("queued", "running"):
            self.step()
        return handle.result()

    @property
    def idle(self) -> bool:
        """True when no request is queued or running."""
        return not self._queue and all(occupant is None for occupant in self._slots)

    @property
    def state(self) -> EngineState:
        """The current device state (donated to the next tick: copy what you keep)."""
        return self._state

    def stats(self) -> dict[str, int]:
        """Counts: queued, busy_slots, slots, done, refused, cancelled, ticks, model_calls
        (one per step of a tick, each over all slots) and request_steps (the steps the done
        requests needed: ``request_steps / (model_calls * slots)`` is the slots' utilisation)."""
        busy = sum(occupant is not None for occupant in self._slots)
        return dict(queued=len(self._queue), busy_slots=busy, slots=self.core.slots, **self._counts)
