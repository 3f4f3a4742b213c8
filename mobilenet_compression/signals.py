"""The one signal guard: how Ctrl-C (SIGINT) and SIGTERM (what `wandb agent`, a scheduler or
`kill` sends) stop a command without losing what it has done. Training and a run use
`StopFlag`; the sweep agent, which must never leave a started run unrecorded, handles both
signals with `interrupt_unless_critical` and marks its critical steps `uninterrupted()`."""

import contextlib
import signal


class Stopped(KeyboardInterrupt):
    """Raised by a StopFlag that does not defer: the command was asked to stop by `signum`."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopFlag:
    """Context manager that catches SIGINT and SIGTERM.

    defer=True (training): the first signal only sets `requested`, and the loop stops at its
    next step boundary, so the saved state is never half an optimizer step; a second signal
    raises KeyboardInterrupt at once.
    defer=False (a quantization run): the first signal raises `Stopped` where the code is, so
    the run can record itself as killed; further signals are ignored while it does so.
    The previous handlers come back on exit.
    """

    def __init__(self, defer=True):
        self.defer = defer
        self.requested = False
        self.signum = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested:
            if self.defer:
                raise KeyboardInterrupt
            return  # already stopping: let the cleanup finish
        self.requested = True
        self.signum = signum
        if not self.defer:
            raise Stopped(signum)

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


_critical = {"depth": 0, "pending": False}


def interrupt_unless_critical(signum, frame):
    """A signal handler: KeyboardInterrupt now, or at the end of the `uninterrupted()` block
    running now."""
    if _critical["depth"]:
        _critical["pending"] = True
    else:
        raise KeyboardInterrupt


@contextlib.contextmanager
def uninterrupted():
    """Ctrl-C and SIGTERM (handled by `interrupt_unless_critical`) wait until the block is
    done: the agent's state never says `running` for a run that was not started, and no
    started run goes unrecorded."""
    _critical["depth"] += 1
    try:
        yield
    finally:
        _critical["depth"] -= 1
    if not _critical["depth"] and _critical["pending"]:
        _critical["pending"] = False
        raise KeyboardInterrupt
