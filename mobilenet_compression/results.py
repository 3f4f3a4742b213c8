"""The results table of a sweep: `<results_dir>/<sweep_id or "runs">/runs.csv`, one row per run.

Several runs of one sweep finish at the same time (`--agents K`, or several `wandb agent`
processes on one machine), so every write happens under a file lock and replaces the file
atomically: a reader never sees half a row, and a row is keyed by its W&B run id, so writing
the same run twice updates it instead of duplicating it.
"""

import csv
import math
import os
import tempfile
from pathlib import Path

from filelock import FileLock, Timeout

from mobilenet_compression.errors import UserError

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
    "checkpoint", "dataset",
]
FINISHED = "finished"
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


def _plain(value):
    """A CSV cell: numpy/torch scalars become Python numbers, None and NaN become empty."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def _ordered(columns):
    known = [c for c in COLUMNS if c in columns]
    return known + [c for c in columns if c not in COLUMNS]


def _read_rows(path):
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _file_mode():
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def _write_rows(path, rows):
    columns = _ordered(list(dict.fromkeys(k for row in rows for k in row)))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".runs-", suffix=".csv")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes it private; a results table is not
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def append_run(results_dir, sweep_id, row):
    """Add one run's row to `<results_dir>/<sweep_id or "runs">/runs.csv` and return its path.

    `row` must hold `run_id` (the W&B run id). A row whose run id is already in the file
    updates that row (new values win, old columns stay), so a retried write never duplicates
    a run. `sweep_id` and `status` ("finished" unless given) are filled in when missing.
    """
    if not row.get("run_id"):
        raise ValueError("a results row needs the W&B run id under 'run_id'")
    row = {key: _plain(value) for key, value in row.items()}
    row.setdefault("sweep_id", sweep_id or "")
    path = runs_csv_path(results_dir, sweep_id)
    lock = lock_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock), timeout=LOCK_TIMEOUT_S):
            rows = _read_rows(path)
            for old in rows:
                if old.get("run_id") == str(row["run_id"]):
                    old.update(row)
                    break
            else:
                row.setdefault("status", FINISHED)
                rows.append(row)
            _write_rows(path, rows)
    except Timeout:
        raise UserError(f"{path} stayed locked for {LOCK_TIMEOUT_S} s; if no other run is "
                        f"writing it, delete {lock} and run again") from None
    except OSError as e:
        raise UserError(f"cannot write the results table {path} ({e.strerror or e}); pass "
                        f"--results_dir a directory you can write to") from None
    return path


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
