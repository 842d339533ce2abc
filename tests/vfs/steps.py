"""What semantics.py and acl.py share: each step of theirs is one printed line."""
import errno

out = []


def p(step, value):
    out.append(f"{step}: {value}")


def attempt(step, fn, *args):
    """fn(*args)'s result ("ok" for None), or the name of the errno it failed with."""
    try:
        r = fn(*args)
        p(step, "ok" if r is None else r)
    except OSError as e:
        p(step, errno.errorcode.get(e.errno, e.errno))
