"""Run one benchmark configuration in its own process, so that an OOM, a CUDA error, a segfault or a hang
in one configuration cannot stop a sweep or distort the next.

Workers come from a fork server started once per sweep with vimbench (torch, timm) already imported, so
each configuration starts in a fresh, CUDA-free process in well under a second.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading

_CTX = None
_PINNED = threading.local()


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["vimbench.measure.model", "vimbench.measure.ops"])
    return _CTX


def is_oom(exc: BaseException) -> bool:
    """True for out-of-memory errors: torch's CUDA OOM, MemoryError, or an allocator message saying so."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "failed to allocate" in msg or "can't allocate memory" in msg


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:500]


@contextlib.contextmanager
def pinned(env: dict):
    """Workers this thread starts (``run_isolated``) get ``env`` in their environment before ``fn`` runs.
    How a sweep over several GPUs gives each worker its own GPU (CUDA_VISIBLE_DEVICES, read when the worker
    first touches CUDA) without the measurers knowing; the rows record it (``cuda_visible_devices``)."""
    _PINNED.env = env
    try:
        yield
    finally:
        _PINNED.env = {}


def _child(fn, args, conn, env):
    os.environ.update(env)
    conn.send(None)  # running: the time limit counts from here, not from the fork server's start
    try:
        result = {"status": "ok", **(fn(*args) or {})}
    except BaseException as e:  # everything is reported to the parent, nothing escapes the worker
        result = {"status": "oom" if is_oom(e) else "error", "error": one_line(e)}
    conn.send(result)
    conn.close()


def run_isolated(fn, args: tuple = (), timeout: float | None = None) -> dict:
    """``fn(*args)`` (a dict of results) in a fresh worker process.

    Returns the dict with ``status`` "ok"; or {"status": "oom" | "error", "error": one line, ...} when it
    raised, died (signal or exit code) or ran past ``timeout`` seconds, counted from when the worker
    starts ``fn`` (then it is killed; the wait for the fork server to start, which imports torch, is not
    counted).
    ``fn`` must be importable by name (a module-level function). The worker gets the entry points this
    process skipped (``plugins.SKIPPED_ENV``) in its environment, to skip them too.
    """
    from vimbench.kernels.plugins import SKIPPED_ENV
    env = dict(getattr(_PINNED, "env", {}))
    if SKIPPED_ENV in os.environ:  # the fork server's environment is the one it started with
        env[SKIPPED_ENV] = os.environ[SKIPPED_ENV]
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, args, send, env), daemon=True)
    proc.start()
    send.close()
    try:
        recv.recv()
    except EOFError:  # the worker died before running fn
        pass
    if not recv.poll(timeout):
        proc.kill()
        proc.join()
        return {"status": "error", "error": f"timed out after {timeout:g} s; worker killed"}
    try:
        result = recv.recv()
    except EOFError:  # the worker died before sending anything
        result = None
    proc.join()
    if result is not None:
        return result
    code = proc.exitcode
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        if name == "SIGKILL":  # what the kernel's out-of-memory killer sends
            return {"status": "oom", "error": "worker killed by SIGKILL (likely the out-of-memory killer)"}
        return {"status": "error", "error": f"worker killed by {name}"}
    return {"status": "error", "error": f"worker exited with code {code} without a result"}
