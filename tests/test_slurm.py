"""A grid sweep with no controller: `sweep.py --sweep Y --list` numbers the grid and
`--index N` runs its N-th run as the offline agent would, so that a SLURM job array
(slurm/sweep_array.sbatch) can spread a sweep over a cluster.

The SLURM tests run a real single-node cluster (Debian's slurmctld, slurmd and munge, started
by slurm/local_cluster.sh as root and stopped after): real sbatch job arrays, a real scancel.
Where SLURM cannot be installed or started (no root, no packages) they skip with the reason;
on CI (CI=true, root with apt) they must run. Most runs are the small stand-in program of
test_agent.py (the same contract as the real run, in seconds); one array runs the real
`sweep.py` quantization runs on the small checkpoint."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.test_agent import env, offline_runs, sweep, wandb_summary, write_yaml  # noqa: F401
from tests.test_qat import QUICK, small_checkpoint  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[1]
GRID_2X2 = {"weight_bits": {"values": [8, 4]}, "activation_bits": {"values": [8, 4]}}


def rows(results_dir):
    (csv,) = Path(results_dir).glob("*/runs.csv")
    return pd.read_csv(csv)


def evaluations(tmp_path):
    path = tmp_path / "evaluations.log"
    return path.read_text().splitlines() if path.exists() else []


def one_error_line(out, message):
    assert out.returncode == 2, (out.stdout, out.stderr)
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line, line


# --- --list and --index, no cluster ---------------------------------------------------------


def test_list_numbers_the_grid_and_index_runs_that_run_once(tmp_path, env):
    write_yaml(tmp_path / "grid.yaml", GRID_2X2)
    res = tmp_path / "res"
    out = sweep(["--sweep", "grid.yaml", "--list", "--results_dir", str(res)], tmp_path, env)
    assert out.returncode == 0, out.stderr
    listed = [line.split("\t") for line in out.stdout.strip().splitlines()]
    assert [i for i, _ in listed] == ["0", "1", "2", "3"]
    configs = [dict(kv.split("=") for kv in params.split()) for _, params in listed]
    assert sorted((c["weight_bits"], c["activation_bits"]) for c in configs) == [
        ("4", "4"), ("4", "8"), ("8", "4"), ("8", "8")]
    assert "sbatch --array=0-3 slurm/sweep_array.sbatch grid.yaml" in out.stderr
    (grid,) = res.glob("*/grid.json")
    assert [{k: str(v) for k, v in r.items()} for r in json.loads(grid.read_text())["runs"]] \
        == configs
    assert not list(res.glob("*/runs.csv"))  # listing runs nothing

    out = sweep(["--sweep", "grid.yaml", "--index", "2", "--results_dir", str(res)], tmp_path,
                env)
    assert out.returncode == 0, out.stderr
    table = rows(res)
    assert len(table) == 1 and table.status[0] == "finished"
    assert (str(table.weight_bits[0]), str(table.activation_bits[0])) == (
        configs[2]["weight_bits"], configs[2]["activation_bits"])
    (run_dir,) = offline_runs(tmp_path)  # the run's W&B offline files, as the agent leaves them
    summary = wandb_summary(run_dir)["summary"]
    assert summary["quant_acc"] == table.quant_acc[0]
    state = json.loads(next(res.glob("*/agent_state.json")).read_text())
    assert [(e["run_id"], e["state"]) for e in state["runs"]] == [(table.run_id[0], "finished")]

    # the same index again (a requeued task): nothing is run twice
    out = sweep(["--sweep", "grid.yaml", "--index", "2", "--results_dir", str(res)], tmp_path,
                env)
    assert out.returncode == 0 and "already finished" in out.stdout, out.stderr
    assert len(evaluations(tmp_path)) == 1 and len(rows(res)) == 1
    # and the offline agent, resuming the same sweep, runs only the three left
    out = sweep(["--sweep", "grid.yaml", "--agents", "2", "--results_dir", str(res)], tmp_path,
                env)
    assert out.returncode == 0, out.stderr
    assert len(evaluations(tmp_path)) == 4 and len(rows(res)) == 4


def test_listing_a_grid_checks_its_runs_without_loading_torch(tmp_path, env):
    """A job array's tasks and --list check every parameter by the runs' own rules
    (config.py) before anything starts; that takes plain values only, so no task pays for
    importing torch (about 3 of its 5 seconds before) just to launch its run."""
    write_yaml(tmp_path / "grid.yaml", GRID_2X2)
    out = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "sweep.py"), "--sweep",
                          "grid.yaml", "--list", "--results_dir", str(tmp_path / "res")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines()
                if line.startswith("import time:")}
    assert "mobilenet_compression.config" in imported  # the parameters were checked...
    assert not {"torch", "torchvision"} & imported  # ...without the engine
    # and a bad value is still the runs' own error, before anything is written
    write_yaml(tmp_path / "bad.yaml", {"weight_bits": {"values": [8, 1]}})
    one_error_line(sweep(["--sweep", "bad.yaml", "--list", "--results_dir",
                          str(tmp_path / "r3")], tmp_path, env), "parameter weight_bits")


def test_index_bad_input_is_one_error_line_and_writes_nothing(tmp_path, env):
    write_yaml(tmp_path / "grid.yaml", GRID_2X2)
    write_yaml(tmp_path / "random.yaml", {"weight_bits": {"values": [8, 4]}}, method="random")
    (tmp_path / "broken.yaml").write_text("method: grid\nparameters: [oops\n")
    res = tmp_path / "res"
    cases = [
        (["--sweep", "grid.yaml", "--index", "4"], "--index 4 is out of range: grid.yaml has 4 "
                                                   "runs, 0 to 3"),
        (["--sweep", "random.yaml", "--list"], "only a grid sweep can be listed"),
        (["--sweep", "random.yaml", "--index", "0"], "only a grid sweep can be listed"),
        (["--sweep", "broken.yaml", "--list"], "broken.yaml is not valid YAML at line"),
        (["--sweep", "grid.yaml", "--index", "1", "--agents", "2"], "do not apply"),
        (["--sweep", "grid.yaml", "--index", "-1"], "must be at least 0"),
    ]
    for args, message in cases:
        one_error_line(sweep([*args, "--results_dir", str(res)], tmp_path, env), message)
    # inside a SLURM job, a results directory without the --list the submit node wrote is not
    # shared with this node: the task says so instead of starting a sweep of its own
    out = sweep(["--sweep", "grid.yaml", "--index", "1", "--results_dir", str(res)], tmp_path,
                dict(env, SLURM_JOB_ID="123"))
    one_error_line(out, "is not shared with the node that ran --list")
    assert not res.exists() and not evaluations(tmp_path)


def test_many_index_tasks_at_once_lose_no_row_and_run_nothing_twice(tmp_path, env):
    """Twelve tasks of one grid started at the same moment, as a job array starts them: one
    row and one state entry per configuration, each run evaluated once."""
    write_yaml(tmp_path / "grid.yaml", {"weight_bits": {"values": [8, 6, 4, 3]},
                                        "activation_bits": {"values": [8, 4, 2]}})
    res = tmp_path / "res"
    assert sweep(["--sweep", "grid.yaml", "--list", "--results_dir", str(res)], tmp_path,
                 env).returncode == 0
    procs = [subprocess.Popen([sys.executable, str(REPO / "sweep.py"), "--sweep", "grid.yaml",
                               "--index", str(i), "--results_dir", str(res)], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(12)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    table = rows(res)
    assert len(table) == 12 and set(table.status) == {"finished"}
    assert len({(w, a) for w, a in zip(table.weight_bits, table.activation_bits)}) == 12
    assert len(evaluations(tmp_path)) == 12
    state = json.loads(next(res.glob("*/agent_state.json")).read_text())
    assert sorted(e["run_id"] for e in state["runs"]) == sorted(table.run_id)


def test_rows_written_by_many_processes_at_the_same_moment_are_all_kept(tmp_path):
    """runs.csv's lock, hammered: 8 processes append 25 rows each as fast as they can."""
    script = ("import sys\nfrom mobilenet_compression.sweep import results\n"
              "for i in range(25):\n"
              "    results.append_run(sys.argv[1], 'swp', {'run_id': f'{sys.argv[2]}-{i}', "
              "'quant_acc': i}, params={'worker': sys.argv[2], 'i': i})\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(w)], env=env)
             for w in range(8)]
    assert [p.wait(timeout=300) for p in procs] == [0] * 8
    table = pd.read_csv(tmp_path / "swp" / "runs.csv")
    assert len(table) == 200 and table.run_id.is_unique


# --- a real SLURM cluster -------------------------------------------------------------------


def _cannot_run_slurm():
    if os.geteuid() != 0:
        return "the local SLURM cluster starts its daemons as root"
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(t)]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} missing): apt-get install "
                f"slurmctld slurmd slurm-client munge")
    if not (Path(sys.prefix) / "bin" / "activate").exists():
        return f"{sys.prefix} is not a virtualenv the job script can activate"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """SLURM_CONF of a single-node cluster on this machine, up for this module's tests."""
    reason = _cannot_run_slurm()
    if reason and os.environ.get("CI"):
        pytest.fail(f"CI must run the SLURM tests, but {reason}")
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    script = REPO / "slurm" / "local_cluster.sh"
    start = subprocess.run(["bash", str(script), "start", str(state)], capture_output=True,
                           text=True, timeout=120)
    if start.returncode != 0:
        logs = "".join(p.read_text()[-2000:] for p in state.glob("*.log"))
        subprocess.run(["bash", str(script), "stop", str(state)], timeout=120)
        message = f"the local SLURM cluster did not start: {start.stderr.strip()}\n{logs}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield str(state / "slurm.conf")
    finally:
        subprocess.run(["bash", str(script), "stop", str(state)], timeout=120)


def slurm_env(env, conf):
    return dict(env, SLURM_CONF=conf, VENV=sys.prefix)


def sbatch(args, cwd, env, timeout=600):
    out = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1",
                          f"--output={cwd}/slurm-%A_%a.out", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=timeout)
    return out


def job_array(tmp_path, yaml_name, res, env, indices):
    """The repository's job script as a user submits it; waits for the array to end."""
    return sbatch(["--wait", f"--array={indices}", str(REPO / "slurm" / "sweep_array.sbatch"),
                   yaml_name, str(res)], tmp_path, env)


def task_logs(tmp_path):
    return "\n".join(p.read_text() for p in sorted(tmp_path.glob("slurm-*.out")))


def test_a_job_array_of_real_runs_fills_the_grid_once(tmp_path, env, cluster, small_checkpoint):
    """A 2x2 grid of real quantization runs as a job array of 4 tasks: one row per
    configuration, each run's W&B offline files readable, then the report."""
    yaml_path = tmp_path / "grid.yaml"
    yaml_path.write_text(yaml.safe_dump({
        "program": "sweep.py", "method": "grid", "project": "test-project",
        "parameters": {**GRID_2X2, "checkpoint": {"value": str(small_checkpoint)},
                       "data_dir": {"value": str(tmp_path / "data")},
                       "max_eval_samples": {"value": int(QUICK[1])},
                       "calib_batches": {"value": int(QUICK[3])}}}))
    res = tmp_path / "res"
    senv = slurm_env(env, cluster)
    (tmp_path / "sweep.py").symlink_to(REPO / "sweep.py")  # the yaml's program, as in the repo
    assert sweep(["--sweep", "grid.yaml", "--list", "--results_dir", str(res)], tmp_path,
                 senv).returncode == 0
    out = job_array(tmp_path, "grid.yaml", res, senv, "0-3")
    assert out.returncode == 0, (out.stderr, task_logs(tmp_path))
    table = rows(res)
    assert len(table) == 4 and set(table.status) == {"finished"}
    assert sorted(zip(table.weight_bits, table.activation_bits)) == [(4, 4), (4, 8), (8, 4),
                                                                     (8, 8)]
    assert set(table.eval_images) == {int(QUICK[1])}
    # each task's run used one thread: the share SLURM gave it (--cpus-per-task=1)
    assert set(table["onnx_threads"]) == {1}
    runs = offline_runs(tmp_path)
    assert len(runs) == 4
    logged = {wandb_summary(r)["summary"]["quant_acc"] for r in runs}
    assert logged == set(table.quant_acc)
    (sweep_dir,) = [p.parent for p in res.glob("*/runs.csv")]
    report = sweep(["--report", str(sweep_dir)], tmp_path, senv)
    assert report.returncode == 0, report.stderr
    summary = (sweep_dir / "summary.md").read_text()
    assert "4 finished runs" in summary and "Made by `python sweep.py --sweep grid.yaml" in summary


def test_scancel_of_a_task_records_killed_and_its_index_again_replaces_the_row(
        tmp_path, env, cluster):
    """Two tasks; the second one's run is held until it is cancelled with scancel. Its row
    says killed, the first is untouched; submitting that index again replaces the row."""
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "4").touch()  # the stand-in waits while hold/<weight_bits> exists
    write_yaml(tmp_path / "grid.yaml", {"weight_bits": {"values": [8, 4]},
                                        "activation_bits": {"value": 8},
                                        "hold_dir": {"value": str(hold)}})
    res = tmp_path / "res"
    senv = slurm_env(env, cluster)
    listed = sweep(["--sweep", "grid.yaml", "--list", "--results_dir", str(res)], tmp_path,
                   senv)
    held_index = next(line.split("\t")[0] for line in listed.stdout.splitlines()
                      if "weight_bits=4" in line)
    (tmp_path / "sweep.py").symlink_to(REPO / "sweep.py")  # the job script runs sweep.py
    job = sbatch(["--array=0-1", str(REPO / "slurm" / "sweep_array.sbatch"), "grid.yaml",
                  str(res)], tmp_path, senv)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip().split(";")[0]

    def state_runs():
        path = next(res.glob("*/agent_state.json"), None)
        return json.loads(path.read_text())["runs"] if path else []

    deadline = time.monotonic() + 180
    while not (any(e["config"]["weight_bits"] == 4 and e.get("pid") for e in state_runs())
               and any(e["state"] == "finished" for e in state_runs())):
        assert time.monotonic() < deadline, task_logs(tmp_path)
        time.sleep(0.5)
    before = rows(res).set_index("weight_bits").loc[8]

    def first_row_untouched():  # its cells as they were (a later row may add columns)
        now = rows(res).set_index("weight_bits").loc[8]
        return now[before.index].equals(before)

    subprocess.run(["scancel", f"{job_id}_{held_index}"], env=senv, check=True)
    deadline = time.monotonic() + 120
    while subprocess.run(["squeue", "-h", "-j", job_id], env=senv, capture_output=True,
                         text=True).stdout.strip():
        assert time.monotonic() < deadline, task_logs(tmp_path)
        time.sleep(0.5)
    table = rows(res).set_index("weight_bits")
    assert table.loc[4, "status"] == "killed", task_logs(tmp_path)
    assert first_row_untouched()
    assert [e["state"] for e in state_runs() if e["config"]["weight_bits"] == 4] == ["killed"]

    (hold / "4").unlink()
    again = job_array(tmp_path, "grid.yaml", res, senv, held_index)
    assert again.returncode == 0, (again.stderr, task_logs(tmp_path))
    table = rows(res).set_index("weight_bits")
    assert len(table) == 2 and table.loc[4, "status"] == "finished"
    assert first_row_untouched()
