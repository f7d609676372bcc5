"""Multi-process JAX on one machine: the multi-host path, and what happens when a process dies.

Each test launches worker processes (``multiprocess_worker.py``), each with 2 CPU devices,
joined by ``jax.distributed`` through a coordinator on 127.0.0.1 and gloo collectives. They
run every loop of ``multiprocess_worker.LOOPS`` on the global mesh; the gathered results must
equal this one process's run of the same loops on as many devices bit for bit. Processes are
always killed at the end of a test, and every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import multiprocess_worker as worker
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    sys.platform not in ("linux", "darwin"),
    reason="jaxlib has gloo CPU collectives (cross-process computations on CPU) on Linux and macOS only",
)

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 120  # a hung run fails here; a healthy one takes ~10-20 s on a busy 2-core machine
DEVICES_PER_PROCESS = 2
HEARTBEAT_S = 5  # the fault test's jax.distributed heartbeat timeout (JAX's default: 100 s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def workers(num_processes: int, out: Path, *args: str):
    """Starts ``num_processes`` workers (output in ``out/log<i>.txt``); kills any left at exit."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    port = free_port()
    procs = []
    try:
        for i in range(num_processes):
            command = [sys.executable, str(Path(worker.__file__)), "--coordinator", f"127.0.0.1:{port}"]
            command += ["--num-processes", str(num_processes), "--process-id", str(i), "--out", str(out)]
            with open(out / f"log{i}.txt", "w") as log:
                popen = subprocess.Popen(
                    [*command, *args],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=out,
                )
                procs.append(popen)
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()


def logs(out: Path, num_processes: int) -> str:
    return "\n".join(
        f"--- process {i}:\n{(out / f'log{i}.txt').read_text()[-3000:]}" for i in range(num_processes)
    )


def wait_for_exit(procs: list[subprocess.Popen], deadline: float) -> dict[int, float]:
    """Waits until every process has exited or ``deadline`` (``time.monotonic()``) passes; returns
    each exited process's exit time."""
    ended = {}
    while len(ended) < len(procs) and time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = time.monotonic()
        time.sleep(0.02)
    return ended


@functools.cache
def single_process_results(num_devices: int) -> dict[str, np.ndarray]:
    """Every `LOOPS` entry run in this one process, on a mesh of ``num_devices`` devices
    (or unsharded on one device for 1), from the same global inputs as the workers."""
    state = worker.ddim_state()
    if num_devices == 1:
        arrays = {k: jax.device_put(v, jax.devices()[0]) for k, v in worker.global_inputs().items()}
        inputs = worker.Inputs(**arrays)
    else:
        inputs = worker.assemble(worker.batch_mesh(jax.devices()[:num_devices]))
    results = {}
    for name in worker.LOOPS:
        output = worker.compile_loop(name, state, inputs)(state, inputs)
        results.update({key: np.asarray(out) for key, out in worker.output_arrays(name, output).items()})
    return results


@pytest.mark.parametrize("num_processes", [2, 4])
def test_processes_run_the_loops_like_one_process(num_processes, tmp_path):
    """The gathered results equal this process's run on a mesh of as many devices bit for bit,
    and one device's up to float rounding (how XLA fuses a loop may depend on the shard size)."""
    num_devices = num_processes * DEVICES_PER_PROCESS
    if jax.device_count() < num_devices:
        pytest.skip(
            f"the single-process reference needs {num_devices} devices (conftest.py sets 8 CPU devices)"
        )
    start = time.monotonic()
    with workers(num_processes, tmp_path, "--devices", str(DEVICES_PER_PROCESS)) as procs:
        ended = wait_for_exit(procs, start + DEADLINE_S)
        assert len(ended) == num_processes, f"hung past {DEADLINE_S} s\n{logs(tmp_path, num_processes)}"
        codes = [p.returncode for p in procs]
    assert codes == [0] * num_processes, f"exit codes {codes}\n{logs(tmp_path, num_processes)}"
    print(f"{num_processes} processes: {time.monotonic() - start:.1f} s")
    results = np.load(tmp_path / "results.npz")
    expected, one_device = single_process_results(num_devices), single_process_results(1)
    assert sorted(results.files) == sorted(expected)
    for key in expected:
        assert results[key].shape == expected[key].shape
        np.testing.assert_array_equal(results[key], expected[key], err_msg=key)
        np.testing.assert_allclose(results[key], one_device[key], rtol=0, atol=1e-5, err_msg=key)


def test_the_engine_runs_spmd_with_admission_on_process_0(tmp_path):
    """Two processes serve one stream with `ddim_jax.Engine` (slots over both, admission decided
    on process 0 and broadcast): the results equal one process's engine (no mesh) bit for bit."""
    start = time.monotonic()
    with workers(2, tmp_path, "--devices", str(DEVICES_PER_PROCESS), "--engine") as procs:
        ended = wait_for_exit(procs, start + DEADLINE_S)
        assert len(ended) == 2, f"hung past {DEADLINE_S} s\n{logs(tmp_path, 2)}"
        codes = [p.returncode for p in procs]
    assert codes == [0, 0], f"exit codes {codes}\n{logs(tmp_path, 2)}"
    results = np.load(tmp_path / "results.npz")["engine"]
    expected = np.stack(worker.engine_stream(None))
    assert results.shape == expected.shape == (9, *worker.LATENT)  # 10 submitted, 1 cancelled
    np.testing.assert_array_equal(results, expected)


def wait_for_output(out: Path, num_processes: int, text: str, deadline: float) -> bool:
    """Waits until every process's log holds ``text``; False if ``deadline`` passes first."""
    while time.monotonic() < deadline:
        if all(text in (out / f"log{i}.txt").read_text() for i in range(num_processes)):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(
    ("num_processes", "victim"), [(3, 1), (2, 0)], ids=["worker_dies", "coordinator_dies"]
)
def test_a_dead_process_ends_the_others_with_an_error(num_processes, victim, tmp_path):
    """SIGKILL one process mid-run, while all of them repeat a loop and a cross-process gather:
    the others must exit with an error within a bounded time instead of hanging.

    JAX's coordination service finds a dead process by its missing heartbeats
    (``heartbeat_timeout_seconds``, here 5 s) and ends every other process; when the dead one
    is process 0, which runs the service, the others lose their connection to it and end."""
    args = ["--rounds", "0", "--heartbeat-timeout", str(HEARTBEAT_S), "--loops", "invert_guided"]
    with workers(num_processes, tmp_path, *args) as procs:
        running = wait_for_output(tmp_path, num_processes, "round 1 done", time.monotonic() + DEADLINE_S)
        assert running, f"not all processes got to run\n{logs(tmp_path, num_processes)}"
        procs[victim].kill()
        killed = time.monotonic()
        survivors = [p for i, p in enumerate(procs) if i != victim]
        ended = wait_for_exit(survivors, killed + HEARTBEAT_S + 30)
    assert len(ended) == len(survivors), f"hung after process {victim} died\n{logs(tmp_path, num_processes)}"
    time_to_error = max(ended.values()) - killed
    print(f"process {victim} of {num_processes} killed: the others ended after {time_to_error:.1f} s")
    assert all(p.returncode != 0 for p in survivors), [p.returncode for p in procs]
    for i in range(num_processes):
        if i != victim:
            log = (tmp_path / f"log{i}.txt").read_text()
            assert "JAX distributed service detected fatal errors" in log, logs(tmp_path, num_processes)
    assert time_to_error < HEARTBEAT_S + 20
