"""The cleanup process: removes a parent's shared-memory segments once the parent is gone.

Run as a script by file path (``python -S -I janitor.py PID PREFIX DIR...``),
so it imports nothing but the standard library and starts in milliseconds.
It detaches itself (a second fork), so it is no child of the parent's and no
one has to wait for it, then blocks on its stdin: the parent holds the only
write end, and the kernel closes it when the parent exits however it exits
(SIGKILL included).  It also polls the parent's pid, in case a forked child of
the parent inherited the write end.  Then it deletes ``DIR/PREFIX*`` in every
directory, a few times over a couple of seconds, because workers that were
still writing a result may take a moment to die.

Standalone on purpose: this file must never import procession.
"""

from __future__ import annotations

import glob
import os
import select
import sys
import time

POLL_SECONDS = 1.0
SWEEPS = (0.0, 0.5, 1.0, 2.0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(prefix: str, directories: list[str]) -> int:
    """Delete every ``directory/prefix*`` file; return how many were removed."""
    removed = 0
    for directory in directories:
        for path in glob.glob(os.path.join(glob.escape(directory), glob.escape(prefix) + "*")):
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def main(argv: list[str]) -> None:
    parent = int(argv[0])
    prefix = argv[1]
    directories = argv[2:]
    if os.fork():
        os._exit(0)  # the first process exits at once: the parent reaps it
    os.setsid()
    stdin = sys.stdin.fileno()
    while True:
        readable, _, _ = select.select([stdin], [], [], POLL_SECONDS)
        if readable and not os.read(stdin, 4096):
            break  # EOF: the parent closed its end or died
        if not _alive(parent):
            break
    for delay in SWEEPS:
        time.sleep(delay)
        sweep(prefix, directories)


if __name__ == "__main__":
    main(sys.argv[1:])
