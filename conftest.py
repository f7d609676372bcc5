"""Pytest setup: 8 CPU devices for the sharding tests (set before JAX is first used), and JAX's
persistent compilation cache when ``JAX_COMPILATION_CACHE_DIR`` names a directory (README's
test command makes a fresh one): a program compiled by one xdist worker, subprocess or test is
then loaded, not compiled, by the next. A cache hit skips only XLA's compilation: tracing, and so
the suite's counts of traces and of ``jit`` cache entries, stay as without the cache."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    # every program, however quick to compile (JAX's defaults keep only those over 1 s); in
    # os.environ, so the subprocesses that tests start (examples, multi-process workers) share it
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # also here: a plugin may have imported jax first
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
