"""Which process is which. A pid alone can be reused after its process ended, so a process
that a record names (an agent, a run) is recorded with its start time, field 22 of
/proc/<pid>/stat; the same field gives a process's own age (a run's `time/startup_s`)."""

import os


def _start_ticks(pid):
    """(state, start time in clock ticks after boot) of a live process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the ")" closing the name
    return fields[0], int(fields[19])


def process_start(pid):
    """The start time of live process `pid` (clock ticks after boot); None when there is no
    such process or only its zombie is left; -1 where /proc is missing (alive, time
    unknown)."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        state, start = _start_ticks(pid)
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return -1
    except (OSError, IndexError, ValueError):
        return None
    if state in ("Z", "X"):  # ended; its parent (or init) has not reaped it yet
        return None
    return start


def same_process(pid, start):
    """Whether the process recorded as (pid, start) is still running."""
    now = process_start(pid)
    if now is None:
        return False
    return start is None or now == -1 or start == -1 or now == start


def process_age_s():
    """Seconds from this process's start (interpreter start, imports) to now; None where
    there is no /proc."""
    try:
        _, start = _start_ticks("self")
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None
