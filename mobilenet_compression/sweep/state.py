"""The agent's record of a sweep (agent_state.json), shared safely between agent processes
(under a file lock), settled against runs.csv and the processes still alive, and what W&B's
sweep engine is told of it to propose the next run."""

import json
import socket
import subprocess
import time

from mobilenet_compression.errors import UserError
from mobilenet_compression.files import atomic_write
from mobilenet_compression.processes import same_process
from mobilenet_compression.sweep import results
from mobilenet_compression.sweep.sweep_file import import_sweeps, plain

POLL_S = 0.2


def _read_state(path):
    if not path.exists():
        return {"runs": []}
    try:
        state = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read the sweep's state {path} ({e.strerror or e})") from None
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}); it was left as it is: move it away "
                        f"and run the same command again (the finished runs are read back "
                        f"from runs.csv and not run again)") from None
    if not (isinstance(state, dict) and isinstance(state.get("runs"), list)
            and all(isinstance(e, dict) and "run_id" in e for e in state["runs"])):
        raise UserError(f"{path} is not an agent state (a JSON object with a list of runs); "
                        f"it was left as it is: move it away and run the same command again "
                        f"(the finished runs are read back from runs.csv)")
    return state


def _write_state(path, state):
    text = json.dumps(plain(state), indent=1, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))  # readers never see half a file


def update_state(path, change):
    """Read, change and write the state under its lock, so that two agents on the same sweep
    (two terminals, or two machines sharing a disk) never hand out the same configuration.
    A directory that became unwritable is one UserError sentence; the file is left as it
    was."""
    from filelock import FileLock

    try:
        with FileLock(str(results.lock_path(path))):
            state = _read_state(path)
            result = change(state)
            _write_state(path, state)
    except OSError as e:
        raise UserError(f"cannot write the sweep's state {path} ({e.strerror or e}); every "
                        f"finished run is kept in runs.csv: make {path.parent} writable and "
                        f"run the same command again to resume") from None
    return result


class Adopted:
    """A run still going whose agent is gone (kill -9, a closed SSH session): the agent that
    resumes the sweep watches it by pid, since only a parent can wait for its child, and reads
    how it ended from its runs.csv row. Popen's poll/wait/pid, enough for the sweep loop."""

    def __init__(self, pid, start):
        self.pid, self.start, self.returncode = pid, start, None

    def poll(self):
        if self.returncode is None and not same_process(self.pid, self.start):
            self.returncode = -1  # unknown to anyone but its dead parent: the row tells
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"run pid {self.pid}", timeout)
            time.sleep(POLL_S)
        return self.returncode


def row_summary(row):
    """A runs.csv row's numbers, as the W&B summary the bayes engine fits on."""
    summary = {}
    for key, value in row.items():
        try:
            summary[key] = float(value)
        except (TypeError, ValueError):
            pass
    return summary


def row_params(row, names):
    """The sweep parameters a runs.csv row was run with: its sweep_params column; for rows
    written before that column existed, its cells of the parameters' names."""
    if row.get(results.SWEEP_PARAMS):
        try:
            params = json.loads(row[results.SWEEP_PARAMS])
        except ValueError:
            return None
        return params if isinstance(params, dict) and set(params) == names else None
    if not names <= set(row) or any(row[n] == "" for n in names):
        return None
    params = {}
    for name in names:
        text = row[name]
        for kind in (int, float):
            try:
                params[name] = kind(text)
                break
            except ValueError:
                pass
        else:
            params[name] = text
    return params


def settle(state, rows, config, sweep_id, me):
    """Bring the state up to date with the processes of this machine and with runs.csv, the
    record of what each run really did, before this agent hands out any run:
    - a run marked running whose agent is gone (killed -9, a closed terminal) but which is
      itself still running is adopted: this agent waits for it instead of running its
      configuration again;
    - one that ended since is what its runs.csv row says (finished: kept, never run again),
      or killed when it wrote no row (run again);
    - a finished row that the state does not know (the state file was moved away) is a
      finished run of its configuration, so that is not run again either.
    Runs of agents still alive, or of other machines, are left to them. Returns the adopted
    entries."""
    host = socket.gethostname()
    by_id = {row.get("run_id"): row for row in rows}
    adopted = []
    for entry in state["runs"]:
        row = by_id.get(entry["run_id"])
        status = (row.get("status") or results.FINISHED) if row else None
        if entry["state"] == "running":
            if entry.get("host") != host or same_process(entry.get("agent_pid"),
                                                         entry.get("agent_start")):
                continue
            if entry.get("pid") and same_process(entry["pid"], entry.get("pid_start")):
                entry.update(agent_pid=me["pid"], agent_start=me["start"], adopted=True)
                adopted.append(entry)
                continue
            entry["state"] = status if status in ("finished", "failed", "killed") else "killed"
        elif status == results.FINISHED and entry["state"] != "finished":
            entry["state"] = "finished"  # it finished after it was given up on
        if entry["state"] == "finished" and row and config["method"] == "bayes":
            entry.setdefault("summary", row_summary(row))
    known = set(by_id) & {e["run_id"] for e in state["runs"]}
    names = set(config["parameters"])
    for row in rows:
        if (row.get("run_id") in known or (row.get("status") or results.FINISHED) != "finished"
                or row.get("sweep_id", sweep_id) not in (sweep_id, "")):
            continue
        params = row_params(row, names)
        if params is not None:
            state["runs"].append({"run_id": row["run_id"], "config": params,
                                  "state": "finished", "exit_code": 0, "source": "runs.csv",
                                  "summary": row_summary(row)})
    return adopted


def _engine_runs(state, invocation):
    """The runs W&B's engine must know about, as `sweeps.SweepRun`s: finished ones (with their
    summary, which bayes fits), ones running now, and this invocation's failures (so that one
    invocation does not retry a failing configuration forever). Failures of earlier
    invocations are left out, so resuming retries them."""
    sweeps = import_sweeps()
    runs = []
    for entry in state["runs"]:
        if entry["state"] in ("finished", "running") or entry.get("invocation") == invocation:
            runs.append(sweeps.SweepRun(
                name=entry["run_id"],
                state=entry["state"],
                config={k: {"value": v} for k, v in entry["config"].items()},
                summary_metrics=entry.get("summary") or {},
            ))
    return runs


def propose(config, state, invocation, path):
    sweeps = import_sweeps()
    try:
        run = sweeps.next_run(config, _engine_runs(state, invocation))
    except ValueError as e:  # e.g. a continuous parameter in a grid sweep
        raise UserError(f"W&B's sweep engine cannot run {path}: {e}") from None
    if run is None:
        return None
    return {k: plain(v["value"]) for k, v in run.config.items()}


def grid_size_left(config, state, invocation):
    sweeps = import_sweeps()
    # The grid engine stops at the first exhausted slot, so a large n costs nothing more.
    proposals = sweeps.next_runs(config, _engine_runs(state, invocation), n=100_000)
    return sum(run is not None for run in proposals)
