"""The kernel's switch for FUSE over io_uring (the fuse module's enable_uring
parameter), for benchmarks that measure ulsp with and without it. Debian's kernels
and this machine's ship it off; a benchmark turns it on for its io_uring rows and
puts back what it found, even when it fails."""
import contextlib

PARAM = "/sys/module/fuse/parameters/enable_uring"


def available():
    try:
        with open(PARAM):
            return True
    except OSError:
        return False


def _read():
    with open(PARAM) as f:
        return f.read().strip()


def _write(value):
    with open(PARAM, "w") as f:
        f.write(value)


@contextlib.contextmanager
def enabled(on=True):
    """Within the block, new mounts are offered io_uring iff `on`."""
    before = _read()
    _write("Y" if on else "N")
    try:
        yield
    finally:
        _write(before)
