"""Wall-clock timing of a command, for the benchmarks.

subprocess.run(..., timeout=T) must not be used to time anything: with a timeout,
Python waits for the child by polling, sleeping 0.5, 1, 2 ... up to 50 ms between
polls, so every time it measures is rounded up to the next of 63.5, 113.5, 163.5 ...
ms. This waits in waitpid(2) and enforces the timeout from a timer thread instead.
"""
import subprocess
import threading
import time


def timed(cmd, timeout, check=False, **popen_kw):
    """Runs `cmd` (Popen arguments), returns its wall-clock seconds. A command that
    outlives `timeout` seconds is killed and raises TimeoutError; with `check`, a
    nonzero status raises CalledProcessError."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, **popen_kw)
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    try:
        status = p.wait()
    finally:
        timer.cancel()
    elapsed = time.perf_counter() - t0
    if elapsed >= timeout and status < 0:
        raise TimeoutError(f"{cmd!r} took more than {timeout} s")
    if check and status != 0:
        raise subprocess.CalledProcessError(status, cmd)
    return elapsed
