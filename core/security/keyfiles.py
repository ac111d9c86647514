"""Secret files (the JWT secret, TLS private keys): refused when group or others may read or write them.

An SSH-style rule: a key another local user can read is a key that has leaked, so the broker does not start with
one and says which file and which `chmod` fixes it.
"""

from __future__ import annotations

import os
import stat


class InsecureKeyFile(Exception):
    """A secret file that is missing, unreadable, or open to group/others; the message names it and the fix."""


def check_private_file(path: str | os.PathLike[str], what: str, *, missing_ok: bool = False) -> None:
    """Raise `InsecureKeyFile` unless `path` is a regular file without group/other permission bits. `missing_ok`:
    a file that does not exist passes (its loader reports that in its own words, e.g. the TLS context)."""
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except FileNotFoundError:
        if missing_ok:
            return
        raise InsecureKeyFile(f"{what} {name}: no such file") from None
    except OSError as exc:
        raise InsecureKeyFile(f"{what} {name}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InsecureKeyFile(f"{what} {name} is not a regular file")
    loose = stat.S_IMODE(st.st_mode) & 0o077
    if loose:
        raise InsecureKeyFile(f"{what} {name} is accessible by group or others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {name}")


def read_private_file(path: str | os.PathLike[str], what: str) -> bytes:
    """The content of a secret file, after `check_private_file`."""
    check_private_file(path, what)
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise InsecureKeyFile(f"{what} {os.fspath(path)}: {exc.strerror}") from None
