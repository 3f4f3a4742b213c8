"""The results table of a sweep: `<results_dir>/<sweep_id or "runs">/runs.csv`, one row per run.

Several runs of one sweep finish at the same time (`--agents K`, or several `wandb agent`
processes on one machine), so every write happens under a file lock and replaces the file
atomically (written to a temporary file, fsynced, renamed): a reader never sees half a row,
and a crash never leaves half a file where a whole one was.

Which row a write replaces (`append_run`), so that there is one row per run and one per
configuration of a sweep:
1. A row with the same `run_id` (the W&B run id) is updated: new values win, old columns
   stay. A run that writes its row twice (a retried write; a `killed` row the run wrote
   itself, then the agent's exit code) still has one row.
2. Inside a sweep, the row records the parameters the sweep gave the run, exactly as given,
   as JSON in the `sweep_params` column: those the caller passes (the offline agent passes
   its proposal), else those of the config file `wandb agent` writes for the run and names in
   WANDB_SWEEP_PARAM_PATH (when WANDB_SWEEP_ID is this sweep). A row of another run of the
   same sweep with equal sweep parameters is the same configuration run again, a retry: the
   new row replaces it. The sweep's own parameters are the identity, not the row's metric
   columns (a mixed-precision run logs its mean bits as `weight_bits`, not the swept value).
3. One exception keeps results: a row that did not finish (failed, killed) never replaces a
   finished row of another run of the same configuration; it is dropped instead.
A damaged runs.csv (a row cut short by a crash) is never written over: every write and read
stops with one UserError sentence and leaves the file as it is.
"""

import csv
import io
import json
import math
import os
from pathlib import Path

from filelock import FileLock, Timeout

from mobilenet_compression.errors import UserError
from mobilenet_compression.files import atomic_write

# Where runs write their rows when no --results_dir is given. The offline agent sets it for
# the runs it launches so that `--results_dir` reaches them without becoming a sweep parameter.
RESULTS_DIR_ENV = "MOBILENET_COMPRESSION_RESULTS_DIR"
DEFAULT_RESULTS_DIR = "results"
RUNS_CSV = "runs.csv"
NO_SWEEP = "runs"

# Preferred column order (DESIGN.md's metric names); any other key a run logs goes after them.
COLUMNS = [
    "run_id", "sweep_id", "status", "exit_code",
    "weight_bits", "activation_bits", "calibration",
    "baseline_acc", "quant_acc", "acc_drop",
    "orig_mb", "compressed_mb", "compression_ratio",
    "weight_compression_ratio", "activation_compression_ratio",
    "bitops", "bitops_fp32", "weight_bitops", "macs",
    "checkpoint", "dataset", "sweep_params",
]
FINISHED = "finished"
SWEEP_PARAMS = "sweep_params"  # the column holding a run's sweep parameters, as JSON
LOCK_TIMEOUT_S = 120


def default_results_dir():
    """The results directory a run uses when not told: the agent's, else `results`."""
    return os.environ.get(RESULTS_DIR_ENV) or DEFAULT_RESULTS_DIR


def sweep_dir(results_dir, sweep_id):
    """The directory of one sweep's results; runs outside any sweep share `runs/`."""
    return Path(results_dir) / (sweep_id or NO_SWEEP)


def runs_csv_path(results_dir, sweep_id):
    return sweep_dir(results_dir, sweep_id) / RUNS_CSV


def lock_path(path):
    """The lock file beside `path`, hidden: it stays on disk (deleting a lock file races)."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def plain(value):
    """A CSV cell: numpy/torch scalars become Python numbers, None and NaN become empty."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def _ordered(columns):
    known = [c for c in COLUMNS if c in columns]
    return known + [c for c in columns if c not in COLUMNS]


def read_rows(path):
    """The rows of a runs.csv as dicts of strings ([] when there is no file yet). A damaged
    file (a row cut short or with cells too many, as a crash mid-write leaves it) is one
    UserError sentence; nothing is written to it."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    except UnicodeDecodeError:
        raise UserError(_damaged(path, "it is not text")) from None
    except OSError as e:
        raise UserError(f"cannot read the results table {path} ({e.strerror or e})") from None
    if not text:
        return []
    reader = csv.DictReader(io.StringIO(text))
    try:
        rows = list(reader)
    except csv.Error as e:
        raise UserError(_damaged(path, f"line {reader.line_num}: {e}")) from None
    if not reader.fieldnames or "run_id" not in reader.fieldnames:
        raise UserError(_damaged(path, "its first line is not a header with run_id"))
    if not text.endswith("\n"):
        raise UserError(_damaged(path, f"its last line ({len(rows) + 1}) is cut off",
                                 len(rows) - 1))
    for number, row in enumerate(rows, start=2):
        if None in row or None in row.values():
            raise UserError(_damaged(path, f"line {number} has "
                                           f"{'more' if None in row else 'fewer'} cells than "
                                           f"the header", len(rows) - 1))
    return rows


def _damaged(path, problem, whole=None):
    rest = f" ({whole} other row{' is' if whole == 1 else 's are'} whole)" if whole else ""
    return (f"{path} is damaged: {problem}, as when a crash cuts a write short; it was left "
            f"as it is: delete the broken line{rest} or restore the file, then run again")


def sweep_params_from_env(sweep_id):
    """The parameters `wandb agent` (or the offline agent) gave this run: its config file
    (WANDB_SWEEP_PARAM_PATH, {name: {value: v}}), when WANDB_SWEEP_ID is `sweep_id`; else
    None."""
    path = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not sweep_id or os.environ.get("WANDB_SWEEP_ID") != sweep_id or not path:
        return None
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict):
        return None
    return {name: spec["value"] for name, spec in config.items()
            if isinstance(spec, dict) and "value" in spec}


def _params_json(params):
    return json.dumps({k: plain(v) for k, v in params.items()}, sort_keys=True, default=str)


def _same_config(row, params, sweep_id):
    if params is None or row.get("sweep_id", "") != (sweep_id or ""):
        return False
    try:
        return json.loads(row.get(SWEEP_PARAMS) or "null") == params
    except ValueError:
        return False


def _finished(row):
    return (row.get("status") or FINISHED) == FINISHED


def _write_rows(path, rows):
    columns = _ordered(list(dict.fromkeys(k for row in rows for k in row)))
    def write(f):
        text = io.TextIOWrapper(f, newline="", encoding="utf-8", write_through=True)
        writer = csv.DictWriter(text, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        text.detach()  # leave f open for atomic_write's fsync

    atomic_write(path, write)


def merge_row(rows, row, sweep_id, params=None):
    """The table `rows` with `row` written in by the rules of this module's docstring (1: same
    run_id updates, 2: same sweep parameters replaces, 3: a row that did not finish never
    replaces a finished one). `rows` is not changed."""
    run_id = str(row["run_id"])
    others, mine, position = [], None, None
    for old in rows:
        if old.get("run_id") == run_id:
            mine = {**old, **row}
            position = len(others)
        else:
            others.append(old)
    if mine is None:
        mine = dict(row)
        mine.setdefault("status", FINISHED)
    twins = [i for i, old in enumerate(others) if _same_config(old, params, sweep_id)]
    if twins and not _finished(mine) and any(_finished(others[i]) for i in twins):
        return others  # keep the configuration's finished result
    if position is None:
        position = twins[0] if twins else len(others)
    kept = [old for i, old in enumerate(others) if i not in twins]
    position -= sum(i < position for i in twins)
    return kept[:position] + [mine] + kept[position:]


def append_run(results_dir, sweep_id, row, params=None):
    """Write one run's row into `<results_dir>/<sweep_id or "runs">/runs.csv`; return its path.

    `row` must hold `run_id` (the W&B run id). `params` are the parameters the sweep gave the
    run (default: read from WANDB_SWEEP_PARAM_PATH inside a sweep, see
    `sweep_params_from_env`); they are stored as JSON in `sweep_params` and decide which
    earlier row of the same configuration this one replaces (see the module docstring).
    `sweep_id` and `status` ("finished" unless given) are filled in when missing.
    """
    if not row.get("run_id"):
        raise ValueError("a results row needs the W&B run id under 'run_id'")
    row = {key: plain(value) for key, value in row.items()}
    row.setdefault("sweep_id", sweep_id or "")
    if params is None:
        params = sweep_params_from_env(sweep_id)
    if params is not None:
        params = json.loads(_params_json(params))  # the form it is compared in, once read back
        row[SWEEP_PARAMS] = _params_json(params)
    path = runs_csv_path(results_dir, sweep_id)
    lock = lock_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock), timeout=LOCK_TIMEOUT_S):
            rows = merge_row(read_rows(path), row, sweep_id, params)
            _write_rows(path, rows)
    except Timeout:
        raise UserError(f"{path} stayed locked for {LOCK_TIMEOUT_S} s; if no other run is "
                        f"writing it, delete {lock} and run again") from None
    except OSError as e:
        raise UserError(f"cannot write the results table {path} ({e.strerror or e}); pass "
                        f"--results_dir a directory you can write to") from None
    return path


def find_row(results_dir, sweep_id, run_id):
    """The row run `run_id` wrote in its sweep's runs.csv, or None."""
    for row in read_rows(runs_csv_path(results_dir, sweep_id)):
        if row.get("run_id") == str(run_id):
            return row
    return None


def find_runs_csv(path):
    """The runs.csv that `path` names: the file itself or a directory holding it."""
    path = Path(path)
    csv_path = path if path.suffix == ".csv" else path / RUNS_CSV
    if not csv_path.is_file():
        raise UserError(f"no {RUNS_CSV} in {path}; pass the directory a sweep wrote its "
                        f"results to, e.g. results/<sweep_id>")
    return csv_path


def read_runs(path):
    """All rows of a runs.csv (a file or the directory holding it) as a pandas DataFrame,
    with a `status` column ("finished" where a run did not say)."""
    import pandas as pd

    csv_path = find_runs_csv(path)
    read_rows(csv_path)  # a damaged file is one sentence, not a half table
    try:
        # Ids stay text even when a random id happens to be all digits.
        df = pd.read_csv(csv_path, dtype={"run_id": str, "sweep_id": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{csv_path} is not a readable CSV table ({e}); "
                        f"restore it or delete it and run the sweep again") from None
    if "status" not in df.columns:
        df["status"] = FINISHED
    df["status"] = df["status"].fillna(FINISHED).astype(str)
    return df
