"""A grid sweep as a job array: every task runs one configuration, with no controller. The grid
is finite and known in advance, so --list numbers it and --index N runs the N-th. Rows from
many nodes meet in one runs.csv under its file lock (filelock's FileLock: flock(2), which
Linux's NFS client carries out as an NFS byte-range lock, so it holds between nodes of an
NFS share with locking on, as well as on a local disk); the agent state takes the same lock."""

import json
import os
import socket
from pathlib import Path

from mobilenet_compression.errors import UserError
from mobilenet_compression.files import atomic_write
from mobilenet_compression.sweep import results
from mobilenet_compression.sweep.agent import LocalAgent
from mobilenet_compression.sweep.sweep_file import import_sweeps, plain

GRID_FILE = "grid.json"  # the --list of a sweep, beside its runs.csv: --index checks it


def grid_runs(config, path):
    """Every configuration of a grid sweep, in the order W&B's grid engine proposes them."""
    if config["method"] != "grid":
        raise UserError(f"{path} is a {config['method']} sweep, which chooses each run from "
                        f"the runs before it: only a grid sweep can be listed and run by "
                        f"index; run it with `python sweep.py --sweep {path} --count N`")
    sweeps = import_sweeps()
    try:
        proposals = sweeps.next_runs(config, [], n=100_000)
    except ValueError as e:
        raise UserError(f"W&B's sweep engine cannot run {path}: {e}") from None
    return [{k: plain(v["value"]) for k, v in run.config.items()}
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
    # Without --threads the run takes its share itself: SLURM_CPUS_PER_TASK (threads.py).
    agent = LocalAgent(config, path, sweep_id, 1, None, results_dir, threads)
    return agent.run_one(params, f"sweep {sweep_id} run {index} of {len(runs)}")
