"""`python sweep.py --sweep Y`: the offline agent's command line (and --list / --index)."""

import argparse
import os
import signal
import sys
from pathlib import Path

from mobilenet_compression.errors import ArgumentParser, UserError, cli
from mobilenet_compression.signals import interrupt_unless_critical
from mobilenet_compression.sweep import results
from mobilenet_compression.sweep.agent import run_sweep
from mobilenet_compression.sweep.array import GRID_FILE, list_grid, run_index
from mobilenet_compression.sweep.sweep_file import (
    DEFAULT_COMMAND,
    check_parameter_values,
    load_sweep_config,
    results_dir_of,
    sweep_id_for,
)


def _int_at_least(minimum):
    """An argparse type: an integer of at least `minimum`."""
    def parse(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def get_args_parser():
    parser = ArgumentParser(
        prog="python sweep.py",
        description="Run a W&B sweep yaml locally and offline, as `wandb agent` would, "
                    "with W&B's own sweep engine; then write the report.")
    parser.add_argument("--sweep", required=True, metavar="YAML",
                        help="the sweep yaml, the same file `wandb sweep` takes "
                             "(e.g. sweeps/bits.yaml)")
    parser.add_argument("--agents", type=_int_at_least(1), default=1, metavar="K",
                        help="runs at a time, like K `wandb agent` processes (default: 1)")
    parser.add_argument("--count", type=_int_at_least(1), default=None, metavar="N",
                        help="at most N finished runs in the sweep; running the command again "
                             "tops it up to N. Needed for random and bayes, which never end by "
                             "themselves (default: the whole grid)")
    parser.add_argument("--results_dir", default=None,
                        help="where runs.csv, agent_state.json and the report go, under "
                             "<results_dir>/<sweep_id>/; passed to every run. A results_dir "
                             "parameter in the yaml wins, as it does for the runs (default: "
                             "$MOBILENET_COMPRESSION_RESULTS_DIR, else results)")
    parser.add_argument("--threads", type=_int_at_least(1), default=None, metavar="N",
                        help="CPU threads of each run (OMP_NUM_THREADS); several agents on "
                             "one machine should share its cores (default: $OMP_NUM_THREADS, "
                             "else cores / K)")
    by_index = parser.add_mutually_exclusive_group()
    by_index.add_argument("--list", action="store_true",
                          help="a grid sweep's runs, one line each (index, parameters), also "
                               "recorded in <results_dir>/<sweep_id>/grid.json for --index; "
                               "run nothing")
    by_index.add_argument("--index", type=_int_at_least(0), default=None, metavar="N",
                          help="run only the N-th run of the grid (0-based, as --list numbers "
                               "them), as the agent would: one task of a job array, e.g. "
                               "--index $SLURM_ARRAY_TASK_ID; a finished one is not run again")
    parser.add_argument("--sweep_id", default=None,
                        help="use this sweep id instead of the yaml's hash, e.g. one that "
                             "`wandb sweep` printed, so that `wandb sync` can attach the runs "
                             "to that sweep later (default: a hash of the yaml)")
    return parser


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
            from mobilenet_compression.sweep import report

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
