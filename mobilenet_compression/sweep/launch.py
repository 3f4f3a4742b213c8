"""Launching one run exactly as `wandb agent` does, and stopping runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mobilenet_compression.sweep import results

STOP_GRACE_S = 20  # time a Ctrl-C'd run gets to close its W&B run before it is killed

DEFAULT_PROJECT = "mobilenet-compression"  # the project every run of this repo logs to


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


def log_tail(path, lines=3):
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def stop_runs(running):
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
