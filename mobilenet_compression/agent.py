"""The offline local sweep: `python sweep.py --sweep sweeps/bits.yaml [--agents K] [--count N]`.

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
with its parameters, state (running, finished, failed, killed), exit code, log and, for bayes,
its W&B summary. The sweep id is a hash of the yaml's content, so running the same yaml again
finds that file and resumes: finished configurations are not run again; failed and killed ones
are. The runs themselves write `runs.csv` beside it (mobilenet_compression.results); the agent
adds a row only for a run that failed or was stopped, so the report can list it.
"""

import argparse
import contextlib
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
    parser.add_argument("--results_dir", default=results.default_results_dir(),
                        help="where runs.csv, agent_state.json and the report go, under "
                             "<results_dir>/<sweep_id>/; passed to every run "
                             "(default: %(default)s)")
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
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); delete it to start the sweep afresh "
                        f"(runs.csv keeps the finished results)") from None


def _write_state(path, state):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_plain(state), indent=1, default=str) + "\n")
    os.replace(tmp, path)  # readers never see half a file


def _update_state(path, change):
    """Read, change and write the state under its lock, so that two agents on the same sweep
    (two terminals, or two machines sharing a disk) never hand out the same configuration."""
    from filelock import FileLock

    with FileLock(str(results.lock_path(path))):
        state = _read_state(path)
        result = change(state)
        _write_state(path, state)
    return result


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap_stale(state):
    """Runs left `running` by an agent of this machine that is gone (killed -9, power cut)
    become `killed`, so that they are run again."""
    host = socket.gethostname()
    for entry in state["runs"]:
        if (entry["state"] == "running" and entry.get("host") == host
                and not _pid_alive(entry.get("agent_pid", -1))):
            entry["state"] = "killed"


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


def run_environment(config, sweep_id, results_dir, wandb_dir, agents=1):
    """The environment every run of this sweep gets on top of ours: what `wandb agent` sets
    (sweep id, project and entity, WANDB_DIR), offline mode, and our results directory."""
    env = dict(os.environ)
    if agents > 1 and "OMP_NUM_THREADS" not in env:
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


_critical = {"depth": 0, "pending": False}


def _on_stop_signal(signum, frame):
    if _critical["depth"]:
        _critical["pending"] = True
    else:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _uninterrupted():
    """Ctrl-C and SIGTERM wait until the block is done, so the state never says `running`
    for a run that was not started, and no started run goes unrecorded."""
    _critical["depth"] += 1
    try:
        yield
    finally:
        _critical["depth"] -= 1
    if not _critical["depth"] and _critical["pending"]:
        _critical["pending"] = False
        raise KeyboardInterrupt


def _stop(running):
    """Ctrl-C: give every run SIGINT (so it can close its W&B run as failed, not crashed),
    wait a while, then kill what is left. A second Ctrl-C kills at once."""
    for proc, _ in running.values():
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


def run_sweep(config, sweep_path, sweep_id, agents, count, results_dir):
    """Propose, launch and record runs until the grid or the count is done; returns how many
    runs this invocation launched and how many of them failed."""
    from tqdm import tqdm
    from wandb.sdk.lib.runid import generate_id

    out_dir = results.sweep_dir(results_dir, sweep_id)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to the results directory {out_dir} "
                        f"({e.strerror or e}); pass --results_dir a writable directory") from None
    state_path = out_dir / STATE_FILE
    wandb_dir = os.path.abspath(os.environ.get("WANDB_DIR") or os.getcwd())
    env = run_environment(config, sweep_id, results_dir, wandb_dir, agents)
    invocation = uuid.uuid4().hex
    host, agent_pid = socket.gethostname(), os.getpid()

    def start(state):
        _reap_stale(state)
        state.update(sweep_id=sweep_id, sweep_file=str(sweep_path), config=config)
        finished = sum(e["state"] == "finished" for e in state["runs"])
        todo = None if count is None else max(0, count - finished)
        if config["method"] == "grid":
            left = _grid_size_left(config, state, invocation)
            todo = left if todo is None else min(todo, left)
        return finished, todo

    finished_before, todo = _update_state(state_path, start)
    print(f"sweep {sweep_id} ({sweep_path}, {config['method']}): {finished_before} runs "
          f"finished before, {todo} to run, {agents} at a time; offline W&B runs in "
          f"{os.path.join(wandb_dir, 'wandb')}, results in {out_dir}", flush=True)

    def claim(state):
        params = _propose(config, state, invocation, sweep_path)
        if params is None:
            return None
        run_id = generate_id()
        state["runs"].append({
            "run_id": run_id, "config": params, "state": "running", "exit_code": None,
            "host": host, "agent_pid": agent_pid, "invocation": invocation,
            "started_at": time.time(),
        })
        return run_id, params

    def record(run_id, exit_code, log_path, final_state=None):
        summary = {}
        if final_state is None:
            final_state = "finished" if exit_code == 0 else "failed"
        if final_state == "finished" and config["method"] == "bayes":
            summary = read_wandb_summary(wandb_dir, run_id)

        def change(state):
            for entry in state["runs"]:
                if entry["run_id"] == run_id:
                    entry.update(state=final_state, exit_code=exit_code, log=log_path,
                                 duration_s=round(time.time() - entry["started_at"], 2),
                                 summary=summary)
                    return entry["config"]
        params = _update_state(state_path, change)
        if final_state != "finished":
            # The run could not write its own row; this one lets the report list it.
            results.append_run(results_dir, sweep_id, {
                "run_id": run_id, "status": final_state, "exit_code": exit_code, **params})
        return params

    running = {}  # run_id -> (Popen, log path)
    launched = ended = failed = 0
    bar = tqdm(total=todo, unit="run", desc=f"sweep {sweep_id}", dynamic_ncols=True)
    try:
        while True:
            giving_up = failed >= MAX_INITIAL_FAILURES and failed >= ended
            while not giving_up and len(running) < agents and (todo is None or launched < todo):
                with _uninterrupted():  # a claimed run is always launched and tracked
                    claimed = _update_state(state_path, claim)
                    if claimed is None:
                        todo = bar.total = launched  # the grid is done, or another agent has it
                        bar.refresh()
                        break
                    run_id, params = claimed
                    launched += 1
                    try:
                        running[run_id] = launch(config, sweep_id, run_id, params, env,
                                                 wandb_dir)
                    except OSError as e:  # e.g. the command's executable does not exist
                        bar.write(f"run {run_id} could not start: {e}", file=sys.stderr)
                        record(run_id, None, None, "failed")
                        ended += 1
                        failed += 1
                        bar.update()
            if not running:
                break
            time.sleep(POLL_S)
            for run_id, (proc, log_path) in list(running.items()):
                if proc.poll() is None:
                    continue
                with _uninterrupted():  # an ended run is always recorded
                    del running[run_id]
                    params = record(run_id, proc.returncode, log_path)
                ended += 1
                what = " ".join(f"{k}={v}" for k, v in params.items())
                if proc.returncode == 0:
                    bar.write(f"run {run_id} finished: {what}")
                else:
                    failed += 1
                    bar.write(f"run {run_id} FAILED with exit code {proc.returncode}: {what}\n"
                              f"{_tail(log_path)}\n    full log: {log_path}", file=sys.stderr)
                bar.set_postfix(failed=failed)
                bar.update()
    except KeyboardInterrupt:
        bar.close()
        print(f"\nstopping {len(running)} running run(s); finished results are kept",
              file=sys.stderr, flush=True)
        _stop(running)
        for run_id, (proc, log_path) in running.items():
            if proc.returncode == 0:
                record(run_id, 0, log_path)
            else:
                record(run_id, proc.returncode, log_path, "killed")

        def forget_claims(state):  # none should be left; if one is, it must be run again
            for entry in state["runs"]:
                if entry.get("invocation") == invocation and entry["state"] == "running":
                    entry["state"] = "killed"
        _update_state(state_path, forget_claims)
        raise
    bar.close()
    if failed >= MAX_INITIAL_FAILURES and failed >= ended:
        raise UserError(f"the first {failed} runs of sweep {sweep_id} all failed, so the "
                        f"sweep stopped; see their logs in "
                        f"{os.path.join(wandb_dir, 'wandb', f'sweep-{sweep_id}')}")
    return launched, failed


@cli
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    config = load_sweep_config(args.sweep)
    if config["method"] != "grid" and args.count is None:
        raise UserError(f"a {config['method']} sweep never ends by itself; "
                        f"pass --count N for the number of runs")
    command = config.get("command") or DEFAULT_COMMAND
    if "${program}" in command and not Path(config["program"]).is_file():
        # wandb agent would start every run and watch each fail; one sentence is kinder.
        raise UserError(f"the sweep's program {config['program']} is not in {os.getcwd()}; run "
                        f"the sweep from the directory its `program:` is relative to (the "
                        f"repository root for sweeps/*.yaml)")
    sweep_id = args.sweep_id or sweep_id_for(config)
    # The runs live in their own process groups, so a SIGTERM (a cluster's time limit, `kill`)
    # would orphan them; it is handled like Ctrl-C: stop them and keep what finished.
    previous = {s: signal.signal(s, _on_stop_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        launched, failed = run_sweep(config, args.sweep, sweep_id, args.agents, args.count,
                                     args.results_dir)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    out_dir = results.sweep_dir(args.results_dir, sweep_id)
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
