"""Devices, meshes and processes for training: data-parallel and multi-host BANG on JAX's own distribution.

A run lays its devices out as a 2-D mesh ``(models, data)``: the models of a run (stacked on a leading axis and
``vmap``-ed in the step) are split over the ``models`` axis, and every model's batch over the ``data`` axis. BANG
couples the examples of a batch — η uses the maximum κ norm of the *global* batch — and the step is one jitted
program over the global batch, so XLA inserts the cross-device reductions (the maximum and the sums) itself and the
result is that of single-device training up to the order of floating-point additions.

Several processes (hosts) join with :func:`initialize` (``jax.distributed.initialize``; on CPU with gloo
collectives). Every process runs the same command, holds the same data and feeds its devices' share of every global
batch; only process 0 writes files (:func:`is_writer`).

Failing fast. JAX's coordination service ends a process whose peers are missing or lost with a C++ abort after
minutes. Here every wait is bounded by one timeout (``timeout``, default :data:`DEFAULT_TIMEOUT` s: joining,
and the heartbeat that notices a lost peer); :func:`agree` checks right after joining that every process runs the
same settings; and the experiments run a multi-process command under :func:`supervise`, which turns the service's
fatal errors into one line naming the cause (the lost process id, the coordinator that did not answer) and makes
SIGTERM end a process cleanly.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["DEFAULT_TIMEOUT", "DistributedError", "Terminated", "agree", "initialize", "is_multiprocess",
           "is_writer", "lost_peer_message", "lost_processes", "make_mesh", "put_batch", "put_models",
           "put_replicated", "supervise", "terminate_cleanly", "finish"]

DEFAULT_TIMEOUT = 60  # seconds: joining a run, and noticing a lost peer
_KEY = "bang_jax/settings/"
_DONE = "bang_jax/done"
_ACK = "bang_jax/ack/"
_FAILED = "\x00failed: "  # a settings value saying the process stopped before it could share its settings
_EXIT_FILE = "BANG_JAX_EXIT_FILE"  # where a supervised child records the exit status it has settled on


class DistributedError(RuntimeError):
    """A multi-process run that cannot go on (peers missing, settings differ); the message says which."""


class Terminated(BaseException):  # noqa: N818 - a signal, like KeyboardInterrupt: no `except Exception` eats it
    """Raised in the main thread on SIGTERM (see :func:`terminate_cleanly`)."""


def is_multiprocess(coordinator: str | None = None) -> bool:
    """Whether this command joins a multi-process run (a coordinator given, or JAX's environment variable)."""
    return bool(coordinator) or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def _check_address(coordinator: str) -> None:
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator must be HOST:PORT with a port in 1–65535 (or 'auto'), got {coordinator!r}")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout: int = DEFAULT_TIMEOUT) -> None:
    """Joins a multi-process run: all three arguments; ``coordinator="auto"`` (the cluster's environment: SLURM,
    Cloud TPU pods, …, read by ``jax.distributed.initialize()``); JAX's environment variables; or nothing (one
    process, nothing to do).

    Must be called before any other JAX call. On CPU, collectives between processes go through gloo. ``timeout``
    (seconds) bounds the wait for the other processes and the coordinator, and how long a silent peer may go
    unnoticed; past it JAX ends the process (run it under :func:`supervise` for a one-line reason).
    """
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= 86_400:
        raise ValueError(f"--distributed-timeout must be a number of seconds from 1 to 86400, got {timeout!r}")
    if coordinator == "auto":
        if num_processes is not None or process_id is not None:
            raise ValueError("--coordinator auto reads the process count and id from the cluster: leave out "
                             "--num-processes and --process-id")
        coordinator = None
    else:
        given = [v is not None for v in (coordinator, num_processes, process_id)]
        if any(given) and not all(given):
            raise ValueError("a multi-process run needs --coordinator HOST:PORT, --num-processes N and "
                             "--process-id I together (or --coordinator auto on a cluster)")
        if all(given):
            if num_processes < 1 or not 0 <= process_id < num_processes:
                raise ValueError(f"--process-id must be in [0, {num_processes}) and --num-processes positive, got "
                                 f"{process_id} of {num_processes}")
            _check_address(coordinator)
        elif not os.environ.get("JAX_COORDINATOR_ADDRESS"):
            return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used by the CPU backend
    jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout,
                               heartbeat_timeout_seconds=timeout, shutdown_timeout_seconds=timeout)


def _client():
    from jax._src import distributed as jax_distributed  # noqa: PLC0415 - the coordination service's client

    return jax_distributed.global_state.client


def agree(settings: str, *, timeout: int = DEFAULT_TIMEOUT, describe=None) -> None:
    """Checks that every process of the run has the same ``settings`` (a string, e.g. the run's config as JSON);
    raises :class:`DistributedError` naming the first process that differs (with ``describe(mine, theirs)``, a
    description of the difference) or that did not answer within ``timeout`` seconds. One process: nothing to do.
    """
    if jax.process_count() == 1:
        return
    client = _client()
    me = jax.process_index()
    client.key_value_set(_KEY + str(me), settings)
    for other in range(jax.process_count()):
        if other == me:
            continue
        try:
            theirs = client.blocking_key_value_get(_KEY + str(other), timeout * 1000)
        except Exception:  # noqa: BLE001 - the service's timeout error
            raise DistributedError(f"process {other} did not share its settings within {timeout} s "
                                   "(--distributed-timeout)") from None
        if theirs.startswith(_FAILED):
            raise DistributedError(f"process {other} stopped: {theirs.removeprefix(_FAILED)}")
        if theirs != settings:
            what = describe(settings, theirs) if describe is not None else ""
            what = f" (process {other} → process {me}: {what})" if what else ""
            raise DistributedError(
                f"process {other} runs with other settings than process {me}{what}; every "
                "process must run the same command (only --process-id differs)")


def _set(key: str, value: str) -> None:
    try:
        _client().key_value_set(key, value, allow_overwrite=True)
    except Exception:  # noqa: BLE001 - the service may be gone already; nothing more to tell
        pass


def finish(code: int, message: str = "", *, timeout: int = DEFAULT_TIMEOUT) -> None:
    """The end of a multi-process command, called by every process (nothing to do with one process).

    A process that failed publishes ``message`` in place of its settings, so peers still waiting in :func:`agree`
    name the real cause. Process 0 (which hosts the coordination service and works longest: it alone evaluates and
    writes the run) announces its end and waits up to ``timeout`` s for the others to see it; the others, done with
    their share, wait for that announcement — however long process 0's later stages take — instead of leaving
    (JAX's shutdown barrier would otherwise end process 0 mid-evaluation) and stop early only if process 0 is
    gone.
    """
    if jax.process_count() == 1:
        return
    me = jax.process_index()
    if code:
        _settle(code)  # failing already: an abort of the service from here on changes nothing
        if message:
            _set(_KEY + str(me), _FAILED + message)
    client = _client()
    if me == 0:
        _set(_DONE, str(code))
        _settle(code)
        for other in range(1, jax.process_count()):
            try:
                client.blocking_key_value_get(_ACK + str(other), timeout * 1000)
            except Exception:  # noqa: BLE001 - a peer that is gone does not answer; process 0 is done anyway
                pass
        return
    while True:
        try:
            client.blocking_key_value_get(_DONE, 60_000)
            break
        except Exception:  # noqa: BLE001 - not yet (or process 0 is gone: checked next)
            try:
                if 0 not in client.get_live_nodes([0]):
                    raise DistributedError("process 0 left the run before it finished") from None
            except DistributedError:
                raise
            except Exception:  # noqa: BLE001 - the service (hosted by process 0) is gone
                raise DistributedError("process 0 left the run before it finished") from None
    _settle(code)  # process 0 announced its end: the run is over, whatever the service does once it leaves
    _set(_ACK + str(me), "1")


def _settle(code: int) -> None:
    """Records, for the supervisor, the exit status this process has settled on: once the run's outcome is known,
    the coordination service aborting as the processes leave (a race at the very end) must not turn it into a
    second error line and another status."""
    path = os.environ.get(_EXIT_FILE)
    if path:
        try:
            Path(path).write_text(str(code))
        except OSError:
            pass


def lost_processes(timeout: int = DEFAULT_TIMEOUT) -> list[int]:
    """The ids of the processes that left the run, waiting up to ``timeout`` seconds for the coordination service
    to notice (a collective that failed because a peer died usually fails before its heartbeat times out)."""
    if jax.process_count() == 1:
        return []
    everyone = list(range(jax.process_count()))
    deadline = time.monotonic() + timeout + 5
    while time.monotonic() < deadline:
        try:
            live = set(_client().get_live_nodes(everyone))
        except Exception:  # noqa: BLE001 - the coordinator itself (process 0) is gone
            return [0] if jax.process_index() != 0 else []
        gone = [p for p in everyone if p not in live]
        if gone:
            return gone
        time.sleep(1)
    return []


def lost_peer_message(err: Exception, timeout: int = DEFAULT_TIMEOUT) -> str:
    """One line for a collective that failed in a multi-process run: which process was lost, if the service
    knows within ``timeout`` seconds."""
    gone = lost_processes(timeout)
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    if gone:
        return (f"process {', '.join(map(str, gone))} left the run (lost mid-work); process {jax.process_index()} "
                f"stops too ({first})")
    return f"a collective between the processes failed: {first}"


_TERMINATION_INSTALLED = False


def terminate_cleanly(grace: float = 10.0) -> None:
    """SIGTERM raises :class:`Terminated` in the main thread (so the command can say where it stopped); if the main
    thread is blocked (e.g. in a collective with a lost peer) the process exits with status 143 after ``grace``
    seconds. Call from the main thread; replaces any earlier SIGTERM handler (JAX's preemption notifier, which
    would otherwise swallow the signal)."""
    global _TERMINATION_INSTALLED
    if threading.current_thread() is not threading.main_thread() or _TERMINATION_INSTALLED:
        return
    _TERMINATION_INSTALLED = True
    read, write = os.pipe()
    os.set_blocking(write, False)

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, lambda *_: None)  # one-shot: a second SIGTERM must not interrupt the exit
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def watchdog():
        while True:
            data = os.read(read, 64)
            if signal.SIGTERM in data:
                time.sleep(grace)
                sys.stderr.write("\nterminated (SIGTERM)\n")
                sys.stderr.flush()
                os._exit(143)

    threading.Thread(target=watchdog, daemon=True, name="sigterm-watchdog").start()


# ------------------------------------------------------------------------------------------------------------
# The supervisor: one line instead of the coordination service's C++ abort.

_LOG = re.compile(r"^[EWI]\d{4} \d\d:\d\d:\d\d")  # the service's own log lines
_TASK = re.compile(r"/task:(\d+)|Task (\d+) heartbeat timeout")


def _reason(log: str, coordinator: str, num_processes: int | None, timeout: int, process_id: int | None) -> str:
    """One line for a fatal error of the coordination service, from the end of the process's log."""
    tasks = {int(a or b) for a, b in _TASK.findall(log)}
    for m in re.finditer(r"stopped sending heartbeats\):\s*\n((?:\s*\d+\s*\n)+)", log + "\n"):
        tasks |= {int(t) for t in m.group(1).split()}
    tasks = sorted(tasks - {process_id})
    if "RegisterTask" in log or "Connect" in log and "DEADLINE_EXCEEDED" in log:
        count = f"all {num_processes} processes" if num_processes else "all processes"
        return (f"could not start the multi-process run: {count} must join the coordinator at {coordinator} "
                f"within {timeout} s (--distributed-timeout); check that every process was started, with the same "
                "--coordinator and --num-processes, and that process 0 is reachable there")
    if tasks:
        who = ", ".join(map(str, tasks))
        return (f"process {who} left the run (it stopped responding; --distributed-timeout {timeout} s); see its "
                "own output for why")
    if process_id not in (None, 0) and ("UNAVAILABLE" in log or "Connection" in log or "Socket" in log):
        return (f"process 0 (the coordinator, {coordinator}) left the run or cannot be reached; see its own output "
                "for why")
    if "heartbeat" in log.lower() or "UNAVAILABLE" in log or "Connection" in log:
        return (f"a peer process stopped responding or the coordinator at {coordinator} went away; see the other "
                "processes' output for why")
    return "the JAX distributed service stopped the run (see the lines above)"


_FATAL_START = re.compile(rb"(?:^|[\r\s])F\d{4} \d\d:\d\d:\d\d")  # the service's fatal log line, also after a bar


def supervise(command: list[str], *, coordinator: str, num_processes: int | None, process_id: int | None,
              timeout: int, last_checkpoint=lambda: "", env: dict | None = None) -> int:
    """Runs ``command`` (this same command, marked as supervised) as a child process and returns its exit status.

    Its output passes through byte for byte, except the coordination service's fatal C++ abort (the ``F…`` line
    and its stack) and its log lines, which become one ``error:`` line naming the cause. SIGTERM and Ctrl-C are
    passed to the child (in its own session, so it gets each signal once), which stops cleanly; a child that has
    not stopped ``timeout`` seconds after the signal is killed.
    """
    fd, settled = tempfile.mkstemp(prefix="bang-jax-exit-")
    os.close(fd)
    try:
        return _supervise(command, coordinator=coordinator, num_processes=num_processes, process_id=process_id,
                          timeout=timeout, last_checkpoint=last_checkpoint, env=env, settled=settled)
    finally:
        try:
            os.unlink(settled)
        except OSError:
            pass


def _supervise(command, *, coordinator, num_processes, process_id, timeout, last_checkpoint, env, settled) -> int:
    env = dict(os.environ if env is None else env, BANG_JAX_SUPERVISED="1", PYTHONUNBUFFERED="1",
               **{_EXIT_FILE: settled})
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the service's error log lines; its fatal ones still come
    child = subprocess.Popen(command, stderr=subprocess.PIPE, env=env, start_new_session=True)
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None

    def write(data: bytes) -> None:
        sys.stderr.flush()
        if out is not None:
            out.write(data)
            out.flush()
        else:
            sys.stderr.write(data.decode(errors="replace"))

    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signum)
            killer = threading.Timer(timeout, lambda: child.poll() is None and child.kill())
            killer.daemon = True
            killer.start()

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    fatal, done, tail, partial = False, False, [], b""
    try:
        while True:
            chunk = os.read(child.stderr.fileno(), 65536)
            if not chunk:
                break
            partial += chunk
            *lines, partial = partial.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                tail = (tail + [line])[-400:]
                m = None if fatal else _FATAL_START.search(raw)
                if m is not None:
                    fatal = True
                    if m.start() > 0 and not done:
                        write(raw[: m.start()].rstrip(b"\r ") + b"\n")  # what a progress bar drew before it
                if not (fatal or done or _LOG.match(line)):
                    write(raw + b"\n")
                done = done or line.startswith(("error: ", "terminated", "interrupted"))  # the rest is noise
            if partial and not (fatal or done) and b"\r" in partial:  # progress bars redraw without a newline
                head, _, partial = partial.rpartition(b"\r")
                write(head + b"\r")
        if partial and not (fatal or done or _FATAL_START.search(partial)):
            write(partial)  # the last line, without a newline
        rc = child.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if child.poll() is None:
            child.kill()
    try:
        decided = int(Path(settled).read_text().strip())
    except (OSError, ValueError):  # not settled (or a torn write): the abort is the news
        decided = None
    if (fatal or rc == -signal.SIGABRT) and decided is not None:
        return decided  # the child had settled its outcome (and said why) before the service aborted
    if fatal or rc == -signal.SIGABRT:
        who = f"process {process_id}: " if process_id is not None else ""
        print(f"error: {who}{_reason(chr(10).join(tail), coordinator, num_processes, timeout, process_id)}"
              f"{last_checkpoint()}", file=sys.stderr)
        return 1
    return 128 - rc if rc < 0 else rc


def is_writer() -> bool:
    """Whether this process writes the run directory (process 0)."""
    return jax.process_index() == 0


def make_mesh(num_models: int, batch_size: int, *, shard_models: bool, devices=None) -> Mesh | None:
    """The ``(models, data)`` mesh of a run, or ``None`` on a single device.

    The models axis takes the largest divisor of the device count that divides ``num_models`` (only when
    ``shard_models``, i.e. the models are vmapped, and only within one process); the data axis takes the largest
    divisor of the remaining devices that divides ``batch_size``. Devices that fit neither are left idle (a
    message says so).
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) == 1:
        return None
    n = len(devices)
    models = math.gcd(num_models, n) if shard_models and jax.process_count() == 1 else 1
    data = math.gcd(batch_size, n // models)
    if models * data < n:
        print(f"note: using {models * data} of {n} devices ({models} for the models × {data} for the batch of "
              f"{batch_size}); the batch size must divide over the data axis", flush=True)
    return Mesh(np.asarray(devices[: models * data]).reshape(models, data), ("models", "data"))


def _put(x, mesh: Mesh, spec: PartitionSpec):
    x = np.asarray(x)
    sharding = NamedSharding(mesh, spec)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_replicated(tree, mesh: Mesh | None):
    """Every leaf on every device of the mesh (e.g. the training set, the model's constants)."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, tree)
    return jax.tree.map(lambda x: _put(x, mesh, PartitionSpec()), tree)


def put_models(tree, mesh: Mesh | None):
    """Leaves with a leading model axis, split over the mesh's ``models`` axis (replicated over ``data``)."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: _put(jax.device_get(x), mesh, PartitionSpec("models")), tree)


def put_batch(idx: np.ndarray, mesh: Mesh | None):
    """Batch indices ``[..., B]`` split over the ``data`` axis along their last axis."""
    if mesh is None:
        return idx
    spec = PartitionSpec(*([None] * (np.ndim(idx) - 1)), "data")
    return _put(idx, mesh, spec)
