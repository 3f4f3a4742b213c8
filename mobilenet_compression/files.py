"""The one atomic write: every file this project writes (checkpoints, exported models,
runs.csv, the agent's state, caches, the staged dataset) goes through `atomic_write`, so a
crash, Ctrl-C or SIGTERM mid-write never leaves a truncated file where a good one was."""

import os
import tempfile


def _default_mode():
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _default_mode()  # what open() would give: mkstemp's files are private (0600)


def atomic_write(path, write):
    """Call write(f) on a binary temporary file in the same folder, fsync it, give it the
    mode open() would, then rename it to `path` (atomic on POSIX). On any error, or an
    interrupt, the temporary file is removed and `path` is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # a crash after the rename must not leave an empty file
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
