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

import argparse
import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

from mobilenet_compression import results
from mobilenet_compression.errors import ArgumentParser, UserError, cli
from mobilenet_compression.files import atomic_write
from mobilenet_compression.processes import process_start, same_process
from mobilenet_compression.signals import interrupt_unless_critical, uninterrupted

METHODS = ("grid", "random", "bayes")
STATE_FILE = "agent_state.json"
DEFAULT_PROJECT = "mobilenet-compression"  # the project every run of this repo logs to
# wandb agent's default command, used when the yaml has none.
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
POLL_S = 0.2
STOP_GRACE_S = 20  # time a Ctrl-C'd run gets to close its W&B run before it is killed
MAX_INITIAL_FAILURES = 5  # wandb agent's default: stop when the first 5 runs all fail


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def get_args_parser():
    parser = ArgumentParser(
        prog="python sweep.py",
        description="Run a W&B sweep yaml locally and offline, as `wandb agent` would, "
                    "with W&B's own sweep engine; then write the report.")
    parser.add_argument("--sweep", required=True, metavar="YAML",
                        help="the sweep yaml, the same file `wandb sweep` takes "
                             "(e.g. sweeps/bits.yaml)")
    parser.add_argument("--agents", type=_positive_int, default=1, metavar="K",
                        help="runs at a time, like K `wandb agent` processes (default: 1)")
    parser.add_argument("--count", type=_positive_int, default=None, metavar="N",
                        help="at most N finished runs in the sweep; running the command again "
                             "tops it up to N. Needed for random and bayes, which never end by "
                             "themselves (default: the whole grid)")
    parser.add_argument("--results_dir", default=None,
                        help="where runs.csv, agent_state.json and the report go, under "
                             "<results_dir>/<sweep_id>/; passed to every run. A results_dir "
                             "parameter in the yaml wins, as it does for the runs (default: "
                             "$MOBILENET_COMPRESSION_RESULTS_DIR, else results)")
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="CPU threads of each run (OMP_NUM_THREADS); several agents on "
                             "one machine should share its cores (default: $OMP_NUM_THREADS, "
                             "else cores / K)")
    by_index = parser.add_mutually_exclusive_group()
    by_index.add_argument("--list", action="store_true",
                          help="a grid sweep's runs, one line each (index, parameters), also "
                               "recorded in <results_dir>/<sweep_id>/grid.json for --index; "
                               "run nothing")
    by_index.add_argument("--index", type=_non_negative_int, default=None, metavar="N",
                          help="run only the N-th run of the grid (0-based, as --list numbers "
                               "them), as the agent would: one task of a job array, e.g. "
                               "--index $SLURM_ARRAY_TASK_ID; a finished one is not run again")
    parser.add_argument("--sweep_id", default=None,
                        help="use this sweep id instead of the yaml's hash, e.g. one that "
                             "`wandb sweep` printed, so that `wandb sync` can attach the runs "
                             "to that sweep later (default: a hash of the yaml)")
    return parser


# ---------------------------------------------------------------------------------------------
# The sweep yaml


def _import_sweeps():
    # sweeps 0.2.0 still uses pydantic-v1 config names; the warning says nothing to our users.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Valid config keys have changed in V2")
        import sweeps
    return sweeps


def load_sweep_config(path):
    """The sweep yaml as a dict, checked by W&B's schema and by what the local engine can run.
    Every problem is one UserError sentence."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"cannot read the sweep yaml {path} ({e.strerror or e}); "
                        f"pass the path of a sweep yaml such as sweeps/bits.yaml") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path} is not valid YAML{where}: {problem}; fix the file") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} must be a YAML mapping with `method` and `parameters` "
                        f"(see sweeps/bits.yaml), not {type(config).__name__}")
    validate_sweep_config(config, path)
    return config


def validate_sweep_config(config, path):
    sweeps = _import_sweeps()
    try:
        violations = sweeps.schema_violations_from_proposed_config(config)
    except ValueError as e:  # the schema check raises instead of reporting for some shapes
        violations = [str(e)]
    if violations:
        unique = list(dict.fromkeys(v.replace("\n", " ") for v in violations))
        raise UserError(f"{path} breaks W&B's sweep schema: {'; '.join(unique)}; see "
                        f"https://docs.wandb.ai/guides/sweeps/sweep-config-keys")
    method = config["method"]
    if method not in METHODS:
        raise UserError(f"{path}: method {method!r} needs a W&B server; the local agent runs "
                        f"{', '.join(METHODS)}")
    if method == "bayes" and "metric" not in config:
        raise UserError(f"{path}: a bayes sweep needs a `metric` (name and goal) to optimize")
    command = config.get("command") or DEFAULT_COMMAND
    if "${program}" in command and not config.get("program"):
        raise UserError(f"{path} has no `program:`, which its command's ${{program}} needs")


def _listed_values(spec):
    """The concrete values a sweep parameter's spec names: `value`, every one of `values`,
    and the ends of a `min`/`max` range."""
    if not isinstance(spec, dict):
        return []
    if "value" in spec:
        return [spec["value"]]
    if isinstance(spec.get("values"), list):
        return list(spec["values"])
    return [spec[k] for k in ("min", "max") if k in spec]


def check_parameter_values(config, path):
    """Check every value a sweep's parameters name by the run's own rules (RunConfig, the
    same as its flags) before any run starts: a bad value is one UserError naming the
    parameter, not a failed run. Each value is checked beside the first value of every other
    parameter (so `plan: sensitivity` meets its budget); an error about another parameter is
    left to the runs, since the sweep's command may add flags. Parameters that are not a
    run's (a sweep of another program) are that program's to check."""
    from mobilenet_compression.config import RunConfig

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    params = {k: v for k, v in (config.get("parameters") or {}).items() if k in fields}
    values = {name: _listed_values(spec) for name, spec in params.items()}
    first = {name: v[0] for name, v in values.items() if v}
    for name, listed in values.items():
        for value in listed:
            try:
                RunConfig.from_dict({**first, name: value})
            except UserError as e:
                if str(e).startswith(f"--{name} "):  # this value's own error
                    raise UserError(f"{path}: parameter {name}: {e}") from None


def sweep_id_for(config):
    """A W&B-looking sweep id (8 characters, [0-9a-z]) that depends only on the yaml's content,
    so the same sweep resumes where it stopped and a changed one starts afresh."""
    canonical = json.dumps(config, sort_keys=True, default=str).encode()
    number = int.from_bytes(hashlib.sha256(canonical).digest()[:8], "big")
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    for _ in range(8):
        number, rest = divmod(number, 36)
        out += digits[rest]
    return out


def _plain(value):
    """The engine returns numpy scalars for random and bayes; yaml and json want Python ones."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


# ---------------------------------------------------------------------------------------------
# The agent's record of the sweep (agent_state.json), shared safely between agent processes


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
    text = json.dumps(_plain(state), indent=1, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))  # readers never see half a file


def _update_state(path, change):
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


def _row_summary(row):
    """A runs.csv row's numbers, as the W&B summary the bayes engine fits on."""
    summary = {}
    for key, value in row.items():
        try:
            summary[key] = float(value)
        except (TypeError, ValueError):
            pass
    return summary


def _row_params(row, names):
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
            entry.setdefault("summary", _row_summary(row))
    known = set(by_id) & {e["run_id"] for e in state["runs"]}
    names = set(config["parameters"])
    for row in rows:
        if (row.get("run_id") in known or (row.get("status") or results.FINISHED) != "finished"
                or row.get("sweep_id", sweep_id) not in (sweep_id, "")):
            continue
        params = _row_params(row, names)
        if params is not None:
            state["runs"].append({"run_id": row["run_id"], "config": params,
                                  "state": "finished", "exit_code": 0, "source": "runs.csv",
                                  "summary": _row_summary(row)})
    return adopted


def _engine_runs(state, invocation):
    """The runs W&B's engine must know about, as `sweeps.SweepRun`s: finished ones (with their
    summary, which bayes fits), ones running now, and this invocation's failures (so that one
    invocation does not retry a failing configuration forever). Failures of earlier
    invocations are left out, so resuming retries them."""
    sweeps = _import_sweeps()
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


def _propose(config, state, invocation, path):
    sweeps = _import_sweeps()
    try:
        run = sweeps.next_run(config, _engine_runs(state, invocation))
    except ValueError as e:  # e.g. a continuous parameter in a grid sweep
        raise UserError(f"W&B's sweep engine cannot run {path}: {e}") from None
    if run is None:
        return None
    return {k: _plain(v["value"]) for k, v in run.config.items()}


def _grid_size_left(config, state, invocation):
    sweeps = _import_sweeps()
    # The grid engine stops at the first exhausted slot, so a large n costs nothing more.
    proposals = sweeps.next_runs(config, _engine_runs(state, invocation), n=100_000)
    return sum(run is not None for run in proposals)


# ---------------------------------------------------------------------------------------------
# Launching one run exactly as `wandb agent` does


def _expand_command(config, sweep_id, run_id, params, wandb_dir):
    """The run's argv and its parameter file, built by the code `wandb agent` uses
    (wandb/wandb_agent.py, Agent._command_run): wandb's config file writer, its ${envvar:...}
    and ${args...} macro builders, and the same substitution loop. One deliberate difference:
    ${interpreter} is the Python running this agent, not whatever `python` is first on PATH,
    which is what `python` means inside the activated virtualenv anyway."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils
    from wandb.sdk.lib import config_util

    sweep_command = sweep_utils.create_sweep_command(list(config.get("command") or []))
    sweep_dir = os.path.join(wandb_dir, "wandb", f"sweep-{sweep_id}")
    param_path = os.path.join(sweep_dir, f"config-{run_id}.yaml")
    json_path = os.path.join(sweep_dir, f"config-{run_id}.json")
    args = {name: {"value": value} for name, value in params.items()}
    config_util.save_config_file_from_dict(param_path, args)

    sweep_vars = sweep_utils.create_sweep_command_args({"args": args})
    if "${args_json_file}" in sweep_command:
        with open(json_path, "w") as f:
            f.write(sweep_vars["args_json"][0])
    sweep_vars["interpreter"] = [sys.executable]
    sweep_vars["program"] = [config.get("program")]
    sweep_vars["args_json_file"] = [json_path]
    sweep_vars["env"] = ["/usr/bin/env"]
    command = []
    for chunk in map(str, sweep_command):
        if chunk.startswith("${") and chunk.endswith("}"):
            command += sweep_vars.get(chunk[2:-1]) or []
        else:
            command.append(chunk)
    return command, param_path


def run_environment(config, sweep_id, results_dir, wandb_dir, agents=1, threads=None):
    """The environment every run of this sweep gets on top of ours: what `wandb agent` sets
    (sweep id, project and entity, WANDB_DIR), offline mode, our results directory, and the
    runs' share of the cores (OMP_NUM_THREADS: `threads`, else ours, else cores / agents)."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    elif agents > 1 and "OMP_NUM_THREADS" not in env:
        # K runs that each take every core (torch's default) fight over them; share instead.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // agents))
    env.pop("WANDB_SERVICE", None)  # as wandb agent does: each run starts its own service
    env.update({
        "WANDB_SWEEP_ID": sweep_id,
        "WANDB_MODE": "offline",
        "WANDB_DIR": wandb_dir,
        results.RESULTS_DIR_ENV: str(Path(results_dir).resolve()),
    })
    # Inside a sweep wandb.init ignores its project= argument and takes WANDB_PROJECT, which
    # `wandb agent ENTITY/PROJECT/ID` sets; here it comes from the yaml, as on the server.
    env["WANDB_PROJECT"] = config.get("project") or env.get("WANDB_PROJECT") or DEFAULT_PROJECT
    if config.get("entity"):
        env["WANDB_ENTITY"] = config["entity"]
    return env


def launch(config, sweep_id, run_id, params, env, wandb_dir):
    """Start one run; returns (Popen, log path). Its output goes to a log file, because K runs
    writing to one terminal under a progress bar would be unreadable."""
    command, param_path = _expand_command(config, sweep_id, run_id, params, wandb_dir)
    log_path = os.path.join(wandb_dir, "wandb", f"sweep-{sweep_id}", f"{run_id}.log")
    env = dict(env, WANDB_RUN_ID=run_id, WANDB_SWEEP_PARAM_PATH=param_path)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        # Own process group, as wandb agent does: Ctrl-C reaches only the agent, which then
        # stops each run itself (and every process that run started).
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, process_group=0)
    return proc, log_path


def read_wandb_summary(wandb_dir, run_id):
    """A finished offline run's W&B summary, read back by wandb's own reader
    (`wandb leet inspect --summary --json`); {} when the run wrote none."""
    run_dirs = sorted(Path(wandb_dir, "wandb").glob(f"*run-*-{run_id}"))
    if not run_dirs:
        return {}
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json",
         str(run_dirs[-1])], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    try:
        summary = json.loads(out.stdout).get("summary") or {}
    except ValueError:
        return {}
    return {k: v for k, v in summary.items() if not k.startswith("_")}


def _tail(path, lines=3):
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def _stop(running):
    """Ctrl-C (or an error that ends the sweep): give every run SIGINT (so it can close its
    W&B run as failed, not crashed), wait a while, then kill what is left. A second Ctrl-C
    kills at once. Each run leads its own process group, adopted ones too."""
    for proc, _ in running.values():
        if proc.poll() is not None:  # ended and reaped: its pid may be another's by now
            continue
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_GRACE_S
    try:
        for proc, _ in running.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:
        pass
    for proc, _ in running.values():
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


# ---------------------------------------------------------------------------------------------
# The sweep


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
                left = _grid_size_left(self.config, state, self.invocation)
                todo = left if todo is None else min(todo, left)
            return finished, todo, [dict(e) for e in adopted]

        return _update_state(self.state_path, change)

    def claim(self, given=None):
        """The next configuration (or the `given` one), marked running under this agent; None
        when none is left."""
        from wandb.sdk.lib.runid import generate_id

        def change(state):
            params = given or _propose(self.config, state, self.invocation, self.sweep_path)
            if params is None:
                return None
            run_id = generate_id()
            state["runs"].append({
                "run_id": run_id, "config": params, "state": "running", "exit_code": None,
                "host": self.host, "agent_pid": self.me["pid"], "agent_start": self.me["start"],
                "invocation": self.invocation, "started_at": time.time(),
            })
            return run_id, params

        return _update_state(self.state_path, change)

    def launch(self, run_id, params):
        proc, log_path = launch(self.config, self.sweep_id, run_id, params, self.env,
                                self.wandb_dir)
        self.running[run_id] = (proc, log_path)
        pid_start = process_start(proc.pid)

        def change(state):  # so that an agent resuming after us finds the run by its pid
            self._entry(state, run_id).update(pid=proc.pid, pid_start=pid_start, log=log_path)

        _update_state(self.state_path, change)

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
                summary = _row_summary(row) if row else {}

        def change(state):
            entry = self._entry(state, run_id)
            started = entry.get("started_at") or time.time()
            entry.update(state=final_state, exit_code=exit_code, log=log_path,
                         duration_s=round(time.time() - started, 2), summary=summary)
            return entry["config"]

        params = _update_state(self.state_path, change)
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
        _update_state(self.state_path, change)

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
                                  f"{exit_code}: {what}\n{_tail(log_path)}\n    full log: "
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
                    and _row_params(row, names) == wanted):
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
                  f"{_tail(log_path)}\n    full log: {log_path}", file=sys.stderr, flush=True)
        return final_state

    def stop_all(self, reason):
        """Stop every run (Ctrl-C, SIGTERM, or an error such as an unwritable results
        directory) and record what is known; finished results are never touched."""
        going = sum(proc.poll() is None for proc, _ in self.running.values())
        if going:
            print(f"\nstopping {going} running run(s); finished results are kept",
                  file=sys.stderr, flush=True)
        _stop(self.running)
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


# ---------------------------------------------------------------------------------------------
# A grid sweep as a job array: every task runs one configuration, with no controller. The grid
# is finite and known in advance, so --list numbers it and --index N runs the N-th. Rows from
# many nodes meet in one runs.csv under its file lock (filelock's FileLock: flock(2), which
# Linux's NFS client carries out as an NFS byte-range lock, so it holds between nodes of an
# NFS share with locking on, as well as on a local disk); the agent state takes the same lock.

GRID_FILE = "grid.json"  # the --list of a sweep, beside its runs.csv: --index checks it


def grid_runs(config, path):
    """Every configuration of a grid sweep, in the order W&B's grid engine proposes them."""
    if config["method"] != "grid":
        raise UserError(f"{path} is a {config['method']} sweep, which chooses each run from "
                        f"the runs before it: only a grid sweep can be listed and run by "
                        f"index; run it with `python sweep.py --sweep {path} --count N`")
    sweeps = _import_sweeps()
    try:
        proposals = sweeps.next_runs(config, [], n=100_000)
    except ValueError as e:
        raise UserError(f"W&B's sweep engine cannot run {path}: {e}") from None
    return [{k: _plain(v["value"]) for k, v in run.config.items()}
            for run in proposals if run is not None]


def list_grid(config, path, sweep_id, results_dir):
    """Record the grid's runs in <results_dir>/<sweep_id>/grid.json and return them."""
    runs = grid_runs(config, path)
    out_dir = results.sweep_dir(results_dir, sweep_id)
    text = json.dumps({"sweep_id": sweep_id, "sweep_file": str(path), "runs": runs},
                      indent=1) + "\n"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / GRID_FILE, lambda f: f.write(text.encode()))
    except OSError as e:
        raise UserError(f"cannot write {out_dir / GRID_FILE} ({e.strerror or e}); pass "
                        f"--results_dir a writable directory") from None
    return runs


def run_index(config, path, sweep_id, index, results_dir, threads=None):
    """Run the grid's `index`-th configuration as the agent would; returns its final state.
    Inside a SLURM job the sweep's grid.json (written by --list where the job was submitted)
    must be in the results directory, or that directory is not shared with this node."""
    runs = grid_runs(config, path)
    if index >= len(runs):
        raise UserError(f"--index {index} is out of range: {path} has {len(runs)} runs, "
                        f"0 to {len(runs) - 1} (`--list` prints them)")
    params = runs[index]
    listed = results.sweep_dir(results_dir, sweep_id) / GRID_FILE
    if listed.exists():
        try:
            recorded = json.loads(listed.read_text())["runs"][index]
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            recorded = None
        if recorded != json.loads(json.dumps(params)):
            raise UserError(f"{listed} lists another run {index} than {path} gives now (the "
                            f"yaml or the sweeps package changed); run --list again, then "
                            f"submit again")
    elif os.environ.get("SLURM_JOB_ID"):
        raise UserError(f"{listed} is not on this node ({socket.gethostname()}): the results "
                        f"directory {Path(results_dir).resolve()} is not shared with the node "
                        f"that ran --list; give --results_dir a folder every node mounts")
    threads = threads or os.environ.get("SLURM_CPUS_PER_TASK") or None
    agent = LocalAgent(config, path, sweep_id, 1, None, results_dir,
                       int(threads) if threads else None)
    return agent.run_one(params, f"sweep {sweep_id} run {index} of {len(runs)}")


def results_dir_of(config, path, given):
    """Where the sweep's runs write runs.csv: a `results_dir` parameter of the yaml (the
    runs take their parameters from it, over any flag), else --results_dir, else
    $MOBILENET_COMPRESSION_RESULTS_DIR or `results`."""
    spec = config["parameters"].get("results_dir")
    if spec is None:
        return given or results.default_results_dir()
    values = [spec["value"]] if "value" in spec else spec.get("values") or []
    if len(values) != 1 or not isinstance(values[0], str) or not values[0]:
        raise UserError(f"{path}: the results_dir parameter must be one directory (where the "
                        f"sweep's runs.csv goes), not {spec}")
    if given and Path(given).resolve() != Path(values[0]).resolve():
        print(f"note: the sweep's results_dir parameter ({values[0]}) is where its runs write; "
              f"using it instead of --results_dir {given}", file=sys.stderr)
    return values[0]


@cli
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    config = load_sweep_config(args.sweep)
    check_parameter_values(config, args.sweep)
    by_index = args.list or args.index is not None
    if by_index and (args.count is not None or args.agents != 1):
        raise UserError(f"--{'list' if args.list else 'index'} takes the grid's runs one by "
                        f"one: --count and --agents do not apply")
    if config["method"] != "grid" and args.count is None and not by_index:
        raise UserError(f"a {config['method']} sweep never ends by itself; "
                        f"pass --count N for the number of runs")
    command = config.get("command") or DEFAULT_COMMAND
    if "${program}" in command and not Path(config["program"]).is_file():
        # wandb agent would start every run and watch each fail; one sentence is kinder.
        raise UserError(f"the sweep's program {config['program']} is not in {os.getcwd()}; run "
                        f"the sweep from the directory its `program:` is relative to (the "
                        f"repository root for sweeps/*.yaml)")
    results_dir = results_dir_of(config, args.sweep, args.results_dir)
    sweep_id = args.sweep_id or sweep_id_for(config)
    if args.list:
        runs = list_grid(config, args.sweep, sweep_id, results_dir)
        for i, params in enumerate(runs):
            print(f"{i}\t" + " ".join(f"{k}={v}" for k, v in params.items()))
        print(f"sweep {sweep_id}: {len(runs)} runs, recorded in "
              f"{results.sweep_dir(results_dir, sweep_id) / GRID_FILE}; as a SLURM job array: "
              f"sbatch --array=0-{len(runs) - 1} slurm/sweep_array.sbatch {args.sweep}",
              file=sys.stderr)
        return 0
    # The runs live in their own process groups, so a SIGTERM (a cluster's time limit, `kill`)
    # would orphan them; it is handled like Ctrl-C: stop them and keep what finished.
    previous = {s: signal.signal(s, interrupt_unless_critical)
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if args.index is not None:
            state = run_index(config, args.sweep, sweep_id, args.index, results_dir,
                              args.threads)
            return 0 if state == "finished" else 1
        launched, failed = run_sweep(config, args.sweep, sweep_id, args.agents, args.count,
                                     results_dir, args.threads)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    out_dir = results.sweep_dir(results_dir, sweep_id)
    if launched or not (out_dir / "summary.md").exists():
        if (out_dir / results.RUNS_CSV).exists():
            from mobilenet_compression import report

            written = report.write_report(out_dir)
            print("report: " + ", ".join(str(p) for p in written))
        else:
            print(f"no run wrote {out_dir / results.RUNS_CSV}, so there is nothing to report")
    else:
        print(f"nothing to do: every run of sweep {sweep_id} is done; report in {out_dir}")
    if failed:
        print(f"{failed} of {launched} runs failed; running the same command again retries "
              f"them", file=sys.stderr)
        return 1
    return 0
