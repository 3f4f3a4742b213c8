"""The offline local sweep: `python sweep.py --sweep sweeps/bits.yaml [--agents K] [--count N]`,
and a grid sweep as a cluster's job array with no controller: `--list` prints (and records)
the grid's runs, `--index N` runs the N-th the way the agent would (slurm/sweep_array.sbatch).

W&B has no offline sweeps (wandb/wandb issues #2008, #6234, #9682): `wandb agent` asks a server
for every run's parameters. Here W&B's own sweep engine (the `sweeps` package the server uses:
grid, random, bayes, and its schema check) proposes the runs, and each run is launched the way
`wandb agent` launches it (wandb/wandb_agent.py, `Agent._command_run`): the parameters are
written to `$WANDB_DIR/wandb/sweep-<id>/config-<run>.yaml`, WANDB_SWEEP_ID, WANDB_RUN_ID and
WANDB_SWEEP_PARAM_PATH are set, and the yaml's `command` is run with its macros expanded by
wandb's own code. So a program that works under `wandb agent` works here unchanged, and its
offline runs can be browsed with `wandb leet` or uploaded with `wandb sync`. (A W&B server
refuses runs of a sweep it does not know, wandb/wandb#8115: to upload them into a sweep, create
it with `wandb sweep` and pass its id with --sweep_id.)

What the agent keeps, in `<results_dir>/<sweep_id>/agent_state.json`: every run it launched,
with its parameters, state (running, finished, failed, killed), exit code, log, its process
(host, pid and start time, and its agent's) and, for bayes, its W&B summary. The sweep id is a
hash of the yaml's content, so running the same yaml again finds that file and resumes:
finished configurations are not run again; failed and killed ones are. An agent that was
killed outright (kill -9, a closed SSH session) leaves its runs going; the next one tells
them apart (`settle`): a run still alive is waited for (adopted), one that finished since is
kept (its runs.csv row says so), one that died with no row is run again.

The runs themselves write `runs.csv` beside it (mobilenet_compression.results), the record of
what each run did; the agent adds a row only for a run that failed or was stopped, so the
report can list it, and a retried configuration's row replaces the earlier one. If the yaml
sets `results_dir` as a parameter, the runs write there, and so the agent keeps its state
and report there too.
"""

import json
import os
import socket
import sys
import time
import uuid

from mobilenet_compression.errors import UserError
from mobilenet_compression.processes import process_start
from mobilenet_compression.signals import uninterrupted
from mobilenet_compression.sweep import results
from mobilenet_compression.sweep.launch import (
    launch,
    log_tail,
    read_wandb_summary,
    run_environment,
    stop_runs,
)
from mobilenet_compression.sweep.state import (
    POLL_S,
    Adopted,
    grid_size_left,
    propose,
    row_params,
    row_summary,
    settle,
    update_state,
)

STATE_FILE = "agent_state.json"
MAX_INITIAL_FAILURES = 5  # wandb agent's default: stop when the first 5 runs all fail


class LocalAgent:
    """One `python sweep.py --sweep` process: proposes, launches and records runs until the
    grid or the count is done. Its record is agent_state.json (shared with other agents of the
    same sweep, under a lock); the runs' own record is runs.csv."""

    def __init__(self, config, sweep_path, sweep_id, agents, count, results_dir, threads=None):
        self.config, self.sweep_path, self.sweep_id = config, sweep_path, sweep_id
        self.agents, self.count, self.results_dir = agents, count, results_dir
        self.out_dir = results.sweep_dir(results_dir, sweep_id)
        self.state_path = self.out_dir / STATE_FILE
        self.wandb_dir = os.path.abspath(os.environ.get("WANDB_DIR") or os.getcwd())
        self.env = run_environment(config, sweep_id, results_dir, self.wandb_dir, agents,
                                   threads)
        self.invocation = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.me = {"pid": os.getpid(), "start": process_start(os.getpid())}
        self.running = {}  # run_id -> (Popen or Adopted, log path)

    # -- the state ------------------------------------------------------------------------

    def _entry(self, state, run_id):
        return next(e for e in state["runs"] if e["run_id"] == run_id)

    def start(self):
        """Settle what earlier agents left (see `settle`); returns (runs finished before,
        runs to launch or None for "until the engine stops", adopted entries)."""
        rows = results.read_rows(results.runs_csv_path(self.results_dir, self.sweep_id))

        def change(state):
            adopted = settle(state, rows, self.config, self.sweep_id, self.me)
            state.update(sweep_id=self.sweep_id, sweep_file=str(self.sweep_path),
                         config=self.config)
            finished = sum(e["state"] == "finished" for e in state["runs"])
            todo = None if self.count is None else max(0, self.count - finished - len(adopted))
            if self.config["method"] == "grid":
                left = grid_size_left(self.config, state, self.invocation)
                todo = left if todo is None else min(todo, left)
            return finished, todo, [dict(e) for e in adopted]

        return update_state(self.state_path, change)

    def claim(self, given=None):
        """The next configuration (or the `given` one), marked running under this agent; None
        when none is left."""
        from wandb.sdk.lib.runid import generate_id

        def change(state):
            params = given or propose(self.config, state, self.invocation, self.sweep_path)
            if params is None:
                return None
            run_id = generate_id()
            state["runs"].append({
                "run_id": run_id, "config": params, "state": "running", "exit_code": None,
                "host": self.host, "agent_pid": self.me["pid"], "agent_start": self.me["start"],
                "invocation": self.invocation, "started_at": time.time(),
            })
            return run_id, params

        return update_state(self.state_path, change)

    def launch(self, run_id, params):
        proc, log_path = launch(self.config, self.sweep_id, run_id, params, self.env,
                                self.wandb_dir)
        self.running[run_id] = (proc, log_path)
        pid_start = process_start(proc.pid)

        def change(state):  # so that an agent resuming after us finds the run by its pid
            self._entry(state, run_id).update(pid=proc.pid, pid_start=pid_start, log=log_path)

        update_state(self.state_path, change)

    def adopt(self, entry):
        log_path = entry.get("log") or os.path.join(
            self.wandb_dir, "wandb", f"sweep-{self.sweep_id}", f"{entry['run_id']}.log")
        self.running[entry["run_id"]] = (Adopted(entry["pid"], entry.get("pid_start")),
                                         log_path)

    def outcome(self, run_id, proc):
        """(state, exit code) of an ended run: its exit code, and for an adopted run (whose
        exit code died with its agent) or one that says it was killed, its runs.csv row."""
        adopted = isinstance(proc, Adopted)
        if proc.returncode == 0 and not adopted:
            return "finished", 0
        row = results.find_row(self.results_dir, self.sweep_id, run_id)
        status = (row.get("status") or results.FINISHED) if row else None
        if adopted:
            if status == results.FINISHED:
                return "finished", 0
            try:
                code = int(float(row["exit_code"]))
            except (TypeError, KeyError, ValueError):
                code = None  # it wrote no row, or one without its exit code
            return (status if status in ("failed", "killed") else "failed"), code
        return ("killed" if status == "killed" else "failed"), proc.returncode

    def record(self, run_id, final_state, exit_code, log_path):
        """Write how a run ended into the state and, when it did not finish, into runs.csv (it
        could not write its own row, or wrote one saying `killed`): one row per
        configuration, a retry's row replacing the earlier one (results.append_run)."""
        summary = {}
        if final_state == "finished" and self.config["method"] == "bayes":
            summary = read_wandb_summary(self.wandb_dir, run_id)
            if not summary:  # an adopted run: its W&B files may be elsewhere, its row is here
                row = results.find_row(self.results_dir, self.sweep_id, run_id)
                summary = row_summary(row) if row else {}

        def change(state):
            entry = self._entry(state, run_id)
            started = entry.get("started_at") or time.time()
            entry.update(state=final_state, exit_code=exit_code, log=log_path,
                         duration_s=round(time.time() - started, 2), summary=summary)
            return entry["config"]

        params = update_state(self.state_path, change)
        if final_state != "finished":
            results.append_run(self.results_dir, self.sweep_id, {
                "run_id": run_id, "status": final_state, "exit_code": exit_code, **params},
                params=params)
        return params

    def forget_claims(self):
        """None should be left; if one is, it must be run again."""
        def change(state):
            for entry in state["runs"]:
                if entry.get("invocation") == self.invocation and entry["state"] == "running":
                    entry["state"] = "killed"
        update_state(self.state_path, change)

    # -- the loop -------------------------------------------------------------------------

    def check_results_dir(self):
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            probe = self.out_dir / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write to the results directory {self.out_dir} "
                            f"({e.strerror or e}); pass --results_dir a writable directory"
                            ) from None

    def run(self):
        """Returns (runs launched, runs that failed) of this invocation."""
        from tqdm import tqdm

        self.check_results_dir()
        finished_before, todo, adopted = self.start()
        for entry in adopted:
            self.adopt(entry)
        note = (f", {len(adopted)} still running from an agent that is gone (waiting for "
                f"them)" if adopted else "")
        print(f"sweep {self.sweep_id} ({self.sweep_path}, {self.config['method']}): "
              f"{finished_before} runs finished before{note}, {todo} to run, {self.agents} at "
              f"a time; offline W&B runs in {os.path.join(self.wandb_dir, 'wandb')}, results "
              f"in {self.out_dir}", flush=True)
        total = None if todo is None else todo + len(adopted)
        bar = tqdm(total=total, unit="run", desc=f"sweep {self.sweep_id}", dynamic_ncols=True)
        launched = ended = failed = 0
        try:
            while True:
                giving_up = failed >= MAX_INITIAL_FAILURES and failed >= ended
                while (not giving_up and len(self.running) < self.agents
                       and (todo is None or launched < todo)):
                    with uninterrupted():  # a claimed run is always launched and tracked
                        claimed = self.claim()
                        if claimed is None:
                            todo = launched  # the grid is done, or another agent has it
                            bar.total = launched + len(adopted)
                            bar.refresh()
                            break
                        run_id, params = claimed
                        launched += 1
                        try:
                            self.launch(run_id, params)
                        except OSError as e:  # e.g. the command's executable does not exist
                            bar.write(f"run {run_id} could not start: {e}", file=sys.stderr)
                            self.record(run_id, "failed", None, None)
                            ended += 1
                            failed += 1
                            bar.update()
                if not self.running:
                    break
                time.sleep(POLL_S)
                for run_id, (proc, log_path) in list(self.running.items()):
                    if proc.poll() is None:
                        continue
                    with uninterrupted():  # an ended run is always recorded
                        final_state, exit_code = self.outcome(run_id, proc)
                        params = self.record(run_id, final_state, exit_code, log_path)
                        del self.running[run_id]
                    ended += 1
                    what = " ".join(f"{k}={v}" for k, v in params.items())
                    whose = " (adopted)" if isinstance(proc, Adopted) else ""
                    if final_state == "finished":
                        bar.write(f"run {run_id}{whose} finished: {what}")
                    else:
                        failed += 1
                        if isinstance(proc, Adopted) and todo is not None:
                            todo += 1  # its configuration is free again: run it here
                            bar.total += 1
                        bar.write(f"run {run_id}{whose} {final_state.upper()} with exit code "
                                  f"{exit_code}: {what}\n{log_tail(log_path)}\n    full log: "
                                  f"{log_path}", file=sys.stderr)
                    bar.set_postfix(failed=failed)
                    bar.update()
        except (KeyboardInterrupt, UserError) as stopped:
            bar.close()
            self.stop_all(stopped)
            raise
        bar.close()
        if failed >= MAX_INITIAL_FAILURES and failed >= ended:
            raise UserError(f"the first {failed} runs of sweep {self.sweep_id} all failed, so "
                            f"the sweep stopped; see their logs in "
                            f"{os.path.join(self.wandb_dir, 'wandb', f'sweep-{self.sweep_id}')}")
        return launched, failed

    def finished_run(self, params):
        """The run id of a finished run of configuration `params` in runs.csv, or None."""
        names = set(self.config["parameters"])
        wanted = json.loads(json.dumps(params))
        for row in results.read_rows(results.runs_csv_path(self.results_dir, self.sweep_id)):
            if ((row.get("status") or results.FINISHED) == results.FINISHED
                    and row_params(row, names) == wanted):
                return row["run_id"]
        return None

    def run_one(self, params, label):
        """Run configuration `params` (a job array's task), recorded as the agent records its
        runs; returns the run's final state. One already finished is not run again."""
        self.check_results_dir()
        what = " ".join(f"{k}={v}" for k, v in params.items())
        done = self.finished_run(params)
        if done:
            print(f"{label}: run {done} already finished it: {what}", flush=True)
            return "finished"
        update_state(self.state_path, lambda state: state.update(  # as start() records it
            sweep_id=self.sweep_id, sweep_file=str(self.sweep_path), config=self.config))
        try:
            with uninterrupted():  # a claimed run is always launched and tracked
                run_id, _ = self.claim(params)
                self.launch(run_id, params)
            print(f"{label}: run {run_id} started: {what}; log {self.running[run_id][1]}",
                  flush=True)
            proc, log_path = self.running[run_id]
            while proc.poll() is None:
                time.sleep(POLL_S)
            with uninterrupted():  # an ended run is always recorded
                final_state, exit_code = self.outcome(run_id, proc)
                self.record(run_id, final_state, exit_code, log_path)
                del self.running[run_id]
        except (KeyboardInterrupt, UserError) as stopped:
            self.stop_all(stopped)
            raise
        if final_state == "finished":
            print(f"{label}: run {run_id} finished", flush=True)
        else:
            print(f"{label}: run {run_id} {final_state.upper()} with exit code {exit_code}\n"
                  f"{log_tail(log_path)}\n    full log: {log_path}", file=sys.stderr, flush=True)
        return final_state

    def stop_all(self, reason):
        """Stop every run (Ctrl-C, SIGTERM, or an error such as an unwritable results
        directory) and record what is known; finished results are never touched."""
        going = sum(proc.poll() is None for proc, _ in self.running.values())
        if going:
            print(f"\nstopping {going} running run(s); finished results are kept",
                  file=sys.stderr, flush=True)
        stop_runs(self.running)
        try:
            for run_id, (proc, log_path) in self.running.items():
                final_state, exit_code = self.outcome(run_id, proc)
                if final_state != "finished":
                    final_state = "killed"
                self.record(run_id, final_state, exit_code, log_path)
            self.forget_claims()
        except UserError:
            if isinstance(reason, UserError):
                return  # the first error is the one to report; the next run retries these
            raise


def run_sweep(config, sweep_path, sweep_id, agents, count, results_dir, threads=None):
    """Propose, launch and record runs until the grid or the count is done; returns how many
    runs this invocation launched and how many of them failed."""
    return LocalAgent(config, sweep_path, sweep_id, agents, count, results_dir,
                      threads).run()
