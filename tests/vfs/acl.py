#!/usr/bin/python3
"""POSIX ACLs, set by root and met by nobody: one line per step, with nothing that
differs between two correct file systems. The test runs it, as root, in a directory of
the native file system and in the same place through a mount, and compares the two
outputs: the mount must enforce and inherit ACLs as ext4 underneath does.

Usage: acl.py DIR
"""
import errno
import os
import stat
import struct
import sys

from steps import attempt, out, p

d = sys.argv[1]
NOBODY, NOGROUP = 65534, 65534
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
ACCESS, DEFAULT = "system.posix_acl_access", "system.posix_acl_default"


def j(*parts):
    return os.path.join(d, *parts)


def acl(*entries):
    """The xattr form of an ACL: (tag, permission bits, id) in the kernel's order."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


def full(user_perm, group_perm, mask, other, owner=6):
    return acl((USER_OBJ, owner, 0xFFFFFFFF), (USER, user_perm, NOBODY), (GROUP_OBJ, group_perm, 0xFFFFFFFF),
               (MASK, mask, 0xFFFFFFFF), (OTHER, other, 0xFFFFFFFF))


def shown(path, name):
    try:
        raw = os.getxattr(path, name)
    except OSError as e:
        return errno.errorcode.get(e.errno, e.errno)
    tags = {USER_OBJ: "u:", USER: "u:", GROUP_OBJ: "g:", GROUP: "g:", MASK: "m:", OTHER: "o:"}
    entries = []
    for at in range(4, len(raw), 8):
        tag, perm, ident = struct.unpack_from("<HHI", raw, at)
        who = str(ident) if tag in (USER, GROUP) else ""
        entries.append(tags.get(tag, "?") + who + ":" + "".join(c if perm & b else "-" for c, b in zip("rwx", (4, 2, 1))))
    return ",".join(entries)


def mode(path):
    return stat.filemode(os.stat(path).st_mode)


def as_nobody(step, fn):
    """Runs fn in a child that is nobody (no groups) and prints what it returned."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([])
            os.setresgid(NOGROUP, NOGROUP, NOGROUP)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            res = fn()
            msg = "ok" if res is None else str(res)
        except OSError as e:
            msg = errno.errorcode.get(e.errno, str(e.errno))
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    msg = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    p(step, msg)


def read(path):
    with open(path) as f:
        return " ".join(f.read().split())


def append(path):
    with open(path, "a") as f:
        f.write("more\n")


def touch(path):
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o666))


os.umask(0o022)
os.chmod(d, 0o755)



def file_with_acl(name, text, file_mode, access_acl):
    """Makes root's file `name` and sets its ACL; prints its mode and ACL after."""
    with open(j(name), "w") as f:
        f.write(text)
    os.chmod(j(name), file_mode)
    attempt(f"set-{name}", os.setxattr, j(name), ACCESS, access_acl)
    p(name, (mode(j(name)), shown(j(name), ACCESS)))
    as_nobody(f"nobody-reads-{name}", lambda: read(j(name)))


# A file whose ACL denies nobody what its mode gives everyone.
file_with_acl("deny", "secret\n", 0o644, full(0, 4, 4, 4))
# A file whose mode gives nobody nothing and whose ACL gives it read and write: the
# mode's group bits become the mask.
file_with_acl("grant", "data\n", 0o600, full(6, 0, 6, 0))
as_nobody("nobody-appends-grant", lambda: append(j("grant")))
as_nobody("nobody-sets-an-acl", lambda: os.setxattr(j("grant"), ACCESS, full(7, 7, 7, 7)))
# chmod sets the mask: nobody may read, no more write.
os.chmod(j("grant"), 0o640)
p("grant-chmod", (mode(j("grant")), shown(j("grant"), ACCESS)))
as_nobody("nobody-appends-after-chmod", lambda: append(j("grant")))
as_nobody("nobody-reads-after-chmod", lambda: read(j("grant")))
# Without its ACL the file is its mode again.
attempt("remove-grant", os.removexattr, j("grant"), ACCESS)
p("grant-removed", (mode(j("grant")), shown(j("grant"), ACCESS)))
as_nobody("nobody-reads-after-removal", lambda: read(j("grant")))
p("listed", sorted(x for x in os.listxattr(j("deny")) if x.startswith("system.posix_acl")))

# Setting an ACL clears the set-group-ID bit of a file whose group the setter is not
# in (and who lacks CAP_FSETID), as chmod would: nobody owns both files, one in group
# root, one in its own group. A FUSE server is root and would keep the bit: the kernel
# tells it when not to.
for name, group in (("sgid-other-group", 0), ("sgid-own-group", NOGROUP)):
    touch(j(name))
    os.chown(j(name), NOBODY, group)
    os.chmod(j(name), 0o2775)
    as_nobody(f"nobody-sets-an-acl-on-{name}", lambda: os.setxattr(j(name), ACCESS, full(4, 7, 7, 5, owner=7)))
    p(name, (mode(j(name)), shown(j(name), ACCESS)))

# A directory whose default ACL lets nobody in: new entries inherit it, and the umask
# does not apply under it (the default ACL does instead).
os.mkdir(j("shared"), 0o755)
attempt("set-shared", os.setxattr, j("shared"), ACCESS, full(7, 5, 7, 5, owner=7))
attempt("set-shared-default", os.setxattr, j("shared"), DEFAULT, full(7, 5, 7, 5, owner=7))
as_nobody("nobody-creates", lambda: touch(j("shared", "by-nobody")))
touch(j("shared", "file"))
os.mkdir(j("shared", "dir"), 0o777)
os.mkfifo(j("shared", "fifo"), 0o666)
for name in ("file", "dir", "fifo"):
    p(f"inherited-{name}", (mode(j("shared", name)), shown(j("shared", name), ACCESS), shown(j("shared", name), DEFAULT)))
as_nobody("nobody-writes-inherited", lambda: append(j("shared", "file")))
# Where no default ACL is, the umask applies.
touch(j("plain"))
os.mkdir(j("plain-dir"), 0o777)
p("umask", (mode(j("plain")), mode(j("plain-dir"))))

print("\n".join(out))
