"""The offline local sweep, end to end: real `python sweep.py --sweep` subprocesses, real
wandb in offline mode, W&B's real sweep engine. Nothing is mocked; the only thing missing is
a W&B server, which offline mode stands in for (runs are read back from their local files by
wandb's own reader, `wandb leet inspect --summary --json`).

The run program here is a small stand-in written into tmp_path, not mobilenet_compression.run:
it speaks the same contract (parameters from wandb.config, summary keys, one runs.csv row via
mobilenet_compression.sweep.results) in a second instead of a minute.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import run_main, sweep_main

REPO = Path(__file__).resolve().parents[1]

STAND_IN = '''
import argparse, os, sys, time
import wandb
from mobilenet_compression.sweep import results

parser = argparse.ArgumentParser()
parser.add_argument("--weight_bits", type=int, default=32)
parser.add_argument("--activation_bits", type=int, default=32)
parser.add_argument("--calibration", default="minmax")
parser.add_argument("--fail_bits", type=int, default=0)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--hold_dir", default="")  # a run waits while HOLD_DIR/<weight_bits> exists
parser.add_argument("--results_dir", default=None)
args = parser.parse_args()
run = wandb.init(project="ignored-inside-a-sweep", job_type="quantize", config=vars(args))
c = run.config  # under an agent the sweep's parameters arrive here, whatever argv said
time.sleep(c.sleep)
held_until = time.monotonic() + 120
while (c.hold_dir and os.path.exists(os.path.join(c.hold_dir, str(c.weight_bits)))
       and time.monotonic() < held_until):
    time.sleep(0.05)
if c.weight_bits == c.fail_bits:
    print("stand-in: failing on purpose", file=sys.stderr)
    sys.exit(3)
with open("evaluations.log", "a") as log:  # one line per evaluation, however the run ends
    log.write(f"{c.weight_bits},{c.activation_bits},{run.id}\\n")
acc = 90.0 - 40.0 / c.weight_bits - 20.0 / c.activation_bits
metrics = {
    "weight_bits": c.weight_bits, "activation_bits": c.activation_bits,
    "baseline_acc": 90.0, "quant_acc": acc, "acc_drop": 90.0 - acc,
    "orig_mb": 8.0, "compressed_mb": c.weight_bits / 4 + 0.1,
    "compression_ratio": 8.0 / (c.weight_bits / 4 + 0.1),
    "bitops": 9e7 * c.weight_bits * c.activation_bits, "macs": 9e7,
}
run.summary.update(metrics)
results.append_run(c.results_dir or results.default_results_dir(), run.sweep_id,
                   {"run_id": run.id, "calibration": c.calibration, **metrics})
run.finish()
'''


@pytest.fixture
def env(tmp_path):
    """The environment of a user in tmp_path: offline W&B files, configs and caches there."""
    e = dict(os.environ)
    for key in [k for k in e if k.startswith("WANDB_")]:
        del e[key]
    e.update(PYTHONPATH=str(REPO), WANDB_SILENT="true", WANDB_DIR=str(tmp_path),
             WANDB_CONFIG_DIR=str(tmp_path / ".wandb-config"),
             WANDB_CACHE_DIR=str(tmp_path / ".wandb-cache"))
    (tmp_path / "standin.py").write_text(STAND_IN)
    return e


def write_yaml(path, parameters, method="grid", command=("${env}", "${interpreter}",
                                                          "${program}", "${args}")):
    path.write_text(yaml.safe_dump({
        "program": "standin.py", "method": method, "project": "test-project",
        "metric": {"name": "quant_acc", "goal": "maximize"},
        "parameters": parameters, "command": list(command)}))
    return path


def sweep(args, cwd, env, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "sweep.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def sweep_in_process(args, cwd, env):
    """What sweep() runs, as sweep.py's `main` in this process (conftest.run_main), with the
    same cwd and environment; only for a sweep that fails before its first run starts."""
    return run_main(sweep_main, args, cwd, env)


def offline_runs(wandb_dir):
    return sorted(Path(wandb_dir, "wandb").glob("offline-run-*"))


def wandb_summary(run_dir):
    """What W&B recorded for a run, read by wandb's own reader of the .wandb log."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary",
                          "--json", str(run_dir)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def only_sweep_dir(results_dir):
    (path,) = [p for p in Path(results_dir).iterdir() if p.is_dir()]
    return path


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, runs", [("bits", 25), ("calibration", 24), ("per_tensor", 25), ("qat", 18), ("bias_correction", 27), ("mixed", 14)])
def test_repo_sweeps_pass_wandb_schema(name, runs):
    import sweeps
    from mobilenet_compression.sweep import sweep_file

    path = REPO / "sweeps" / f"{name}.yaml"
    config = yaml.safe_load(path.read_text())
    assert sweeps.schema_violations_from_proposed_config(config) == []
    sweep_file.validate_sweep_config(config, path)  # and the local agent accepts it
    assert config["program"] == "sweep.py" and config["method"] == "grid"
    assert config["metric"] == {"name": "quant_acc", "goal": "maximize"}
    assert config["command"] == ["${env}", "${interpreter}", "${program}", "${args}"]
    # Only flags of the single run, so the run program accepts every proposal.
    from mobilenet_compression.run import get_args_parser

    flags = {a.dest for a in get_args_parser()._actions} - {"help"}
    assert set(config["parameters"]) <= flags
    proposals = sweeps.next_runs(config, [], n=1000)
    configs = {tuple(sorted((k, v["value"]) for k, v in run.config.items()))
               for run in proposals if run is not None}
    assert len(configs) == runs
    if name == "bits":
        for key in ("weight_bits", "activation_bits"):
            assert config["parameters"][key]["values"] == [8, 6, 4, 3, 2]


def test_grid_with_two_agents_runs_every_config_once_and_resumes(tmp_path, env):
    yaml_path = write_yaml(tmp_path / "grid.yaml", {
        "weight_bits": {"values": [8, 4]}, "activation_bits": {"values": [8, 2]},
        "calibration": {"value": "percentile"}})
    out = sweep(["--sweep", str(yaml_path), "--agents", "2", "--results_dir", "res"],
                tmp_path, env)
    assert out.returncode == 0, out.stderr
    sweep_dir = only_sweep_dir(tmp_path / "res")
    sweep_id = sweep_dir.name

    # Four finished offline W&B runs of that sweep, each with the parameters it was given
    # through the config file and the metrics it logged.
    runs = offline_runs(tmp_path)
    assert len(runs) == 4
    seen = set()
    for run_dir in runs:
        record = wandb_summary(run_dir)
        assert record["state"] == "finished" and record["exit_code"] == 0
        assert record["project"] == "test-project"  # the yaml's project, as on a W&B server
        config, summary = record["config"], record["summary"]
        assert config["calibration"] == "percentile"
        assert summary["weight_bits"] == config["weight_bits"]
        assert summary["quant_acc"] == pytest.approx(
            90 - 40 / config["weight_bits"] - 20 / config["activation_bits"])
        seen.add((config["weight_bits"], config["activation_bits"]))
        run_id = record["run_id"]
        param_file = tmp_path / "wandb" / f"sweep-{sweep_id}" / f"config-{run_id}.yaml"
        assert yaml.safe_load(param_file.read_text())["weight_bits"] == {
            "value": config["weight_bits"]}
    assert seen == {(8, 8), (8, 2), (4, 8), (4, 2)}

    table = pd.read_csv(sweep_dir / "runs.csv")
    assert len(table) == 4 and set(table["status"]) == {"finished"}
    assert set(table["sweep_id"]) == {sweep_id}
    assert set(table["run_id"]) == {wandb_summary(r)["run_id"] for r in runs}
    for name in ("summary.md", "parallel_coordinates.png", "parallel_coordinates.html",
                 "pareto.png"):
        assert (sweep_dir / name).stat().st_size > 0, name

    # Two agents: the first two runs overlapped in time.
    state = json.loads((sweep_dir / "agent_state.json").read_text())
    entries = sorted(state["runs"], key=lambda e: e["started_at"])
    assert [e["state"] for e in entries] == ["finished"] * 4
    assert entries[1]["started_at"] < entries[0]["started_at"] + entries[0]["duration_s"]

    # The same command again: the sweep id is the same, nothing runs, nothing is added.
    before = (sweep_dir / "runs.csv").read_text()
    again = sweep(["--sweep", str(yaml_path), "--agents", "2", "--results_dir", "res"],
                  tmp_path, env)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert len(offline_runs(tmp_path)) == 4
    assert (sweep_dir / "runs.csv").read_text() == before


def test_emulated_agent_run_takes_parameters_from_the_config_file(tmp_path, env):
    """What `wandb agent` does for one run, by hand: a config file, three variables, and a
    command line with no arguments at all. The run must use the file's values."""
    param_path = tmp_path / "wandb" / "sweep-emul0001" / "config-emulrun1.yaml"
    param_path.parent.mkdir(parents=True)
    param_path.write_text(yaml.safe_dump({"weight_bits": {"value": 3},
                                          "activation_bits": {"value": 6},
                                          "calibration": {"value": "mse"}}))
    run_env = dict(env, WANDB_MODE="offline", WANDB_SWEEP_ID="emul0001",
                   WANDB_RUN_ID="emulrun1", WANDB_SWEEP_PARAM_PATH=str(param_path),
                   MOBILENET_COMPRESSION_RESULTS_DIR=str(tmp_path / "res"))
    out = subprocess.run([sys.executable, "standin.py"], cwd=tmp_path, env=run_env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (run_dir,) = offline_runs(tmp_path)
    record = wandb_summary(run_dir)
    assert record["run_id"] == "emulrun1"
    assert (record["config"]["weight_bits"], record["config"]["activation_bits"]) == (3, 6)
    assert record["summary"]["quant_acc"] == pytest.approx(90 - 40 / 3 - 20 / 6)
    table = pd.read_csv(tmp_path / "res" / "emul0001" / "runs.csv")
    expected = {"run_id": "emulrun1", "weight_bits": 3, "activation_bits": 6,
                "calibration": "mse", "status": "finished"}
    assert expected.items() <= table.to_dict("records")[0].items()


def test_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path, env):
    # No ${args}: this sweep's runs get their parameters only through wandb.config.
    yaml_path = write_yaml(tmp_path / "fail.yaml", {
        "weight_bits": {"values": [8, 2, 4]}, "activation_bits": {"value": 8},
        "fail_bits": {"value": 2}}, command=["${env}", "${interpreter}", "${program}"])
    out = sweep(["--sweep", str(yaml_path), "--agents", "2", "--results_dir", "res"],
                tmp_path, env)
    assert out.returncode == 1  # the sweep finished, but says a run failed
    assert "FAILED with exit code 3" in out.stderr and "failing on purpose" in out.stderr
    sweep_dir = only_sweep_dir(tmp_path / "res")
    table = pd.read_csv(sweep_dir / "runs.csv")
    assert sorted(zip(table["weight_bits"], table["status"])) == [
        (2, "failed"), (4, "finished"), (8, "finished")]
    assert table.loc[table["status"] == "failed", "exit_code"].tolist() == [3]
    state = json.loads((sweep_dir / "agent_state.json").read_text())
    failed = [e for e in state["runs"] if e["state"] == "failed"]
    assert [(e["config"]["weight_bits"], e["exit_code"]) for e in failed] == [(2, 3)]
    assert "failing on purpose" in Path(failed[0]["log"]).read_text()
    summary = (sweep_dir / "summary.md").read_text()
    assert "Runs that did not finish" in summary and failed[0]["run_id"] in summary
    assert (sweep_dir / "pareto.png").exists()  # the plots show the two that finished

    # Resuming retries only the failed configuration (it fails again; the others stay done).
    again = sweep(["--sweep", str(yaml_path), "--results_dir", "res"], tmp_path, env)
    assert again.returncode == 1
    state = json.loads((sweep_dir / "agent_state.json").read_text())
    assert sorted(e["config"]["weight_bits"] for e in state["runs"]) == [2, 2, 4, 8]
    # One row per configuration: the retry's row replaced the first failure's.
    table = pd.read_csv(sweep_dir / "runs.csv")
    assert sorted(zip(table["weight_bits"], table["status"])) == [
        (2, "failed"), (4, "finished"), (8, "finished")]
    retry = max((e for e in state["runs"] if e["config"]["weight_bits"] == 2),
                key=lambda e: e["started_at"])
    assert retry["run_id"] in set(table["run_id"])


def test_bayes_sweep_learns_from_finished_runs(tmp_path, env):
    yaml_path = write_yaml(tmp_path / "bayes.yaml", {
        "weight_bits": {"values": [8, 6, 4, 2]}, "activation_bits": {"values": [8, 2]}},
        method="bayes")
    out = sweep(["--sweep", str(yaml_path), "--count", "3", "--agents", "2",
                 "--results_dir", "res"], tmp_path, env)
    assert out.returncode == 0, out.stderr
    state = json.loads((only_sweep_dir(tmp_path / "res") / "agent_state.json").read_text())
    assert len(state["runs"]) == 3
    for entry in state["runs"]:
        # The summary bayes fits on, read back from the W&B run, as the server would.
        wb, ab = entry["config"]["weight_bits"], entry["config"]["activation_bits"]
        assert entry["summary"]["quant_acc"] == pytest.approx(90 - 40 / wb - 20 / ab)
    # --count is the sweep's total: the same command again has nothing left to do.
    again = sweep(["--sweep", str(yaml_path), "--count", "3", "--results_dir", "res"],
                  tmp_path, env)
    assert again.returncode == 0 and "nothing to do" in again.stdout


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_the_runs_and_keeps_finished_results(tmp_path, env, signum):
    yaml_path = write_yaml(tmp_path / "slow.yaml", {
        "weight_bits": {"values": [8, 4]}, "activation_bits": {"value": 8},
        # The first run ends at once, the second would take a minute.
        "sleep": {"values": [0, 60]}})
    agent = subprocess.Popen([sys.executable, str(REPO / "sweep.py"), "--sweep",
                              str(yaml_path), "--results_dir", "res"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    state_path = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until a run is finished and the next one running
        time.sleep(0.3)
        found = list((tmp_path / "res").glob("*/agent_state.json"))
        if found:
            state_path = found[0]
            states = [e["state"] for e in json.loads(state_path.read_text())["runs"]]
            if "finished" in states and "running" in states:
                break
    else:
        agent.kill()
        pytest.fail("the sweep never reached its slow run")
    running = [e for e in json.loads(state_path.read_text())["runs"] if e["state"] == "running"]
    agent.send_signal(signum)
    _, stderr = agent.communicate(timeout=40)
    assert agent.returncode == 130, stderr
    assert "Traceback" not in stderr
    state = json.loads(state_path.read_text())
    by_id = {e["run_id"]: e for e in state["runs"]}
    assert by_id[running[0]["run_id"]]["state"] == "killed"
    assert sum(e["state"] == "finished" for e in state["runs"]) == 1
    table = pd.read_csv(state_path.parent / "runs.csv")
    assert sorted(table["status"]) == ["finished", "killed"]
    # No run is left behind.
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"--sleep=60" in cmdline.read_bytes():
                left.append(cmdline.parent.name)
        except OSError:  # the process ended while we looked
            pass
    assert left == []


def check_broken_yaml(run, tmp_path, env, text, extra, message):
    """`run` (sweep or sweep_in_process) of the yaml `text` (None: no file): exit status 2,
    one `error:` line that says `message`, no results folder."""
    path = tmp_path / "broken.yaml"
    if text is not None:
        path.write_text(text)
    out = run(["--sweep", str(path), "--results_dir", "res", *extra], tmp_path, env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert message in lines[0]
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("text, extra, message", [
    ("method: grid\nparameters: [weight_bits\n", [], "is not valid YAML at line"),
    ("method: grid\nparameters:\n  weight_bits:\n    valuez: [8]\n", [],
     "breaks W&B's sweep schema"),
    ("method: grid\n", [], "'parameters' is a required property"),
    ("method: hyperband\nparameters: {weight_bits: {values: [8]}}\n", [],
     "'hyperband' is not one of"),
    ("method: custom\nparameters: {weight_bits: {values: [8]}}\n", [], "needs a W&B server"),
    ("method: random\nprogram: standin.py\nparameters: {weight_bits: {values: [8]}}\n", [],
     "pass --count N"),
    ("method: grid\nprogram: missing.py\nparameters: {weight_bits: {values: [8]}}\n", [],
     "missing.py is not in"),
    ("- just\n- a list\n", [], "must be a YAML mapping"),
    (None, [], "cannot read the sweep yaml"),
    ("method: grid\nprogram: standin.py\nparameters: {weight_bits: {values: [8]}}\n",
     ["--threads", "0"], "--threads: must be at least 1"),
    ("method: grid\nprogram: standin.py\nparameters: {results_dir: {values: [a, b]}}\n", [],
     "the results_dir parameter must be one directory"),
    # every value is checked by the run's own rules before the first run starts
    ("method: grid\nprogram: standin.py\nparameters: {weight_bits: {values: [8, 9]}}\n", [],
     "parameter weight_bits: --weight_bits must be an integer in 2..8"),
    ("method: grid\nprogram: standin.py\nparameters: {plan: {value: sensitivity}, "
     "bitops_budget: {values: [w4a4, lots]}}\n", [], "parameter bitops_budget: --bitops_budget"),
    ("method: random\nprogram: standin.py\nparameters: {calibration: {values: [mse, best]}}\n",
     ["--count", "2"], "parameter calibration: --calibration"),
])
def test_broken_sweep_yaml_is_one_clear_error(tmp_path, env, text, extra, message):
    check_broken_yaml(sweep_in_process, tmp_path, env, text, extra, message)


def test_broken_sweep_yaml_in_a_real_process_is_one_clear_error(tmp_path, env):
    """A case of the test above again as a real `python sweep.py --sweep` (that test calls
    its main in this process): the entry point, a real process's exit status and stderr, and
    W&B's sweeps package imported there without a warning."""
    check_broken_yaml(sweep, tmp_path, env,
                      "method: grid\nparameters:\n  weight_bits:\n    valuez: [8]\n", [],
                      "breaks W&B's sweep schema")


def test_unwritable_results_dir_is_one_clear_error(tmp_path, env):
    yaml_path = write_yaml(tmp_path / "grid.yaml", {"weight_bits": {"values": [8]}})
    (tmp_path / "res").write_text("a file where the results directory should be")
    out = sweep(["--sweep", str(yaml_path), "--results_dir", "res"], tmp_path, env)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: cannot write to the results directory")
    assert offline_runs(tmp_path) == []


def test_launch_matches_wandb_agent(tmp_path, monkeypatch):
    """The argv, environment and parameter file of a run are those wandb's own Agent builds
    (wandb_agent.Agent._command_run, driven directly: it needs no server to launch a run)."""
    from wandb.wandb_agent import Agent

    import wandb
    from mobilenet_compression.sweep import launch

    dump = tmp_path / "dump.py"
    dump.write_text(
        "import json, os, sys\n"
        "keys = ['WANDB_SWEEP_ID', 'WANDB_RUN_ID', 'WANDB_SWEEP_PARAM_PATH']\n"
        "out = {'argv': sys.argv[1:], 'env': {k: os.environ.get(k) for k in keys},\n"
        "       'params': open(os.environ['WANDB_SWEEP_PARAM_PATH']).read()}\n"
        "json.dump(out, open(os.environ['WANDB_RUN_ID'] + '.json', 'w'))\n")
    config = {"program": str(dump), "method": "grid",
              "parameters": {"weight_bits": {"value": 4}, "calibration": {"value": "mse"}},
              "command": ["${env}", "${interpreter}", "${program}", "--fixed", "${args}",
                          "${args_no_equals}", "${args_no_hyphens}", "${args_json}",
                          "${args_json_file}", "tag-${envvar:DUMP_TAG}"]}
    params = {"weight_bits": 4, "calibration": "mse"}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DUMP_TAG", "t1")
    # wandb agent runs `python` from PATH: make that this interpreter, as an activated venv does.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")

    ours_env = launch.run_environment(config, "swp00001", tmp_path / "res", str(tmp_path))
    proc, _ = launch.launch(config, "swp00001", "ourrun01", params, ours_env, str(tmp_path))
    assert proc.wait(timeout=30) == 0

    for key in ("WANDB_DIR", "WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):
        monkeypatch.setenv(key, "")  # so that monkeypatch restores what _command_run sets
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SWEEP_ID", "swp00001")
    theirs = Agent(api=None, queue=None, sweep_id="swp00001")
    theirs._sweep_command = list(config["command"])
    theirs._command_run({"run_id": "wbrun001", "program": str(dump),
                         "args": {k: {"value": v} for k, v in params.items()}})
    assert theirs._run_processes["wbrun001"].wait(timeout=30) == 0

    ours = json.loads((tmp_path / "ourrun01.json").read_text())
    wb = json.loads((tmp_path / "wbrun001.json").read_text())
    assert json.loads(json.dumps(ours).replace("ourrun01", "wbrun001")) == wb
    assert wb["env"]["WANDB_SWEEP_PARAM_PATH"] == str(
        tmp_path / "wandb" / "sweep-swp00001" / "config-wbrun001.yaml")
    assert "--weight_bits=4" in wb["argv"] and wb["argv"][-1] == "tag-t1"
    assert wandb.env.SWEEP_PARAM_PATH == "WANDB_SWEEP_PARAM_PATH"


# --- resuming after the agent itself was killed ----------------------------------------------


def start_agent(args, cwd, env):
    return subprocess.Popen([sys.executable, str(REPO / "sweep.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_state(results_dir, ready, timeout=60):
    """agent_state.json's runs once `ready(runs)` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in Path(results_dir).glob("*/agent_state.json"):
            try:
                runs = json.loads(path.read_text())["runs"]
            except ValueError:  # never half a file, but be safe
                continue
            if ready(runs):
                return path, runs
        time.sleep(0.1)
    pytest.fail(f"the sweep's state never got there: {list(Path(results_dir).rglob('*'))}")


def alive(pid):
    """Whether process `pid` is running (its zombie, waiting for init to reap it, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def wait_until_gone(pids, timeout=60):
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"runs {pids} never ended"
        time.sleep(0.1)


def evaluations(tmp_path):
    lines = (tmp_path / "evaluations.log").read_text().split()
    return sorted((int(w), int(a)) for w, a, _ in (line.split(",") for line in lines))


GRID4 = [(8, 8), (6, 8), (4, 8), (2, 8)]


def kill_agent_with_two_runs_going(tmp_path, env, yaml_path):
    """Start a 2-agent sweep, kill -9 its agent while two runs are going (their pids in the
    state); the runs, in their own process groups, go on. Returns those two state entries."""
    agent = start_agent(["--sweep", str(yaml_path), "--agents", "2", "--results_dir", "res"],
                        tmp_path, env)
    _, runs = wait_for_state(tmp_path / "res", lambda runs: sum(
        e["state"] == "running" and "pid" in e for e in runs) == 2)
    agent.kill()  # SIGKILL: the agent records nothing more
    agent.communicate(timeout=30)
    orphans = [e for e in runs if e["state"] == "running"]
    assert all(alive(e["pid"]) for e in orphans)
    return {e["config"]["weight_bits"]: e for e in orphans}


def test_kill_9_of_the_agent_then_the_same_command_runs_nothing_twice(tmp_path, env):
    # W8 ends before the agent is run again: its row is kept. W6 is still running then (held
    # by a file): the new agent waits for it. W4 and W2 are run by the new agent.
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "8").touch()
    (hold / "6").touch()
    yaml_path = write_yaml(tmp_path / "grid.yaml", {
        "weight_bits": {"values": [8, 6, 4, 2]}, "activation_bits": {"value": 8},
        "hold_dir": {"value": str(hold)}})
    by_bits = kill_agent_with_two_runs_going(tmp_path, env, yaml_path)
    assert set(by_bits) == {8, 6}
    (hold / "8").unlink()
    wait_until_gone([by_bits[8]["pid"]])
    assert alive(by_bits[6]["pid"])

    args = ["--sweep", str(yaml_path), "--agents", "2", "--results_dir", "res"]
    again = start_agent(args, tmp_path, env)
    wait_for_state(tmp_path / "res", lambda runs: any(
        e["run_id"] == by_bits[6]["run_id"] and e.get("adopted") for e in runs))
    (hold / "6").unlink()  # now W6 may end
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert "1 runs finished before, 1 still running from an agent that is gone" in out
    assert f"run {by_bits[6]['run_id']} (adopted) finished" in out
    # Every configuration evaluated once, one row each, and that row is the one run's.
    assert evaluations(tmp_path) == sorted(GRID4)
    sweep_dir = only_sweep_dir(tmp_path / "res")
    table = pd.read_csv(sweep_dir / "runs.csv")
    assert sorted(zip(table["weight_bits"], table["activation_bits"])) == sorted(GRID4)
    assert set(table["status"]) == {"finished"} and table["run_id"].is_unique
    assert {by_bits[8]["run_id"], by_bits[6]["run_id"]} <= set(table["run_id"])
    state = json.loads((sweep_dir / "agent_state.json").read_text())
    assert sorted(e["state"] for e in state["runs"]) == ["finished"] * 4
    assert len(offline_runs(tmp_path)) == 4


def test_runs_that_died_with_their_agent_are_run_again_once(tmp_path, env):
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "8").touch()
    (hold / "6").touch()
    yaml_path = write_yaml(tmp_path / "grid.yaml", {
        "weight_bits": {"values": [8, 6, 4, 2]}, "activation_bits": {"value": 8},
        "hold_dir": {"value": str(hold)}})
    orphans = list(kill_agent_with_two_runs_going(tmp_path, env, yaml_path).values())
    for entry in orphans:  # the runs die too (an OOM killer, a reboot)
        os.killpg(entry["pid"], signal.SIGKILL)
    wait_until_gone([e["pid"] for e in orphans])
    for path in hold.iterdir():
        path.unlink()

    again = sweep(["--sweep", str(yaml_path), "--agents", "2", "--results_dir", "res"],
                  tmp_path, env)
    assert again.returncode == 0, again.stderr
    assert evaluations(tmp_path) == sorted(GRID4)
    sweep_dir = only_sweep_dir(tmp_path / "res")
    table = pd.read_csv(sweep_dir / "runs.csv")
    assert sorted(zip(table["weight_bits"], table["activation_bits"])) == sorted(GRID4)
    assert set(table["status"]) == {"finished"}
    state = json.loads((sweep_dir / "agent_state.json").read_text())
    killed = [e for e in state["runs"] if e["state"] == "killed"]
    assert {e["run_id"] for e in killed} == {e["run_id"] for e in orphans}
    assert sorted(e["state"] for e in state["runs"]) == ["finished"] * 4 + ["killed"] * 2


# --- where the results go, and faults --------------------------------------------------------


def test_results_dir_set_in_the_sweep_yaml_gets_the_state_and_the_report(tmp_path, env):
    yaml_path = write_yaml(tmp_path / "grid.yaml", {
        "weight_bits": {"values": [8, 4]}, "activation_bits": {"value": 8},
        "results_dir": {"value": "res_yaml"}})
    out = sweep(["--sweep", str(yaml_path)], tmp_path, env)
    assert out.returncode == 0, out.stderr
    sweep_dir = only_sweep_dir(tmp_path / "res_yaml")
    assert len(pd.read_csv(sweep_dir / "runs.csv")) == 2
    for name in ("agent_state.json", "summary.md", "pareto.png"):
        assert (sweep_dir / name).exists(), name
    assert "2 finished runs" in (sweep_dir / "summary.md").read_text()
    assert not (tmp_path / "results").exists()
    # --results_dir cannot move runs the yaml sends elsewhere: the agent follows the yaml.
    again = sweep(["--sweep", str(yaml_path), "--results_dir", "elsewhere"], tmp_path, env)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout and "using it instead of --results_dir" in again.stderr
    assert not (tmp_path / "elsewhere").exists()


def one_finished_row(tmp_path, yaml_path):
    """The results of a 2-run sweep whose W8 run finished: (sweep dir, runs.csv path)."""
    from mobilenet_compression.sweep import results, sweep_file

    sweep_id = sweep_file.sweep_id_for(yaml.safe_load(yaml_path.read_text()))
    results.append_run(tmp_path / "res", sweep_id, {
        "run_id": "done0001", "weight_bits": 8, "activation_bits": 8, "quant_acc": 85.0},
        params={"weight_bits": 8, "activation_bits": 8})
    sweep_dir = tmp_path / "res" / sweep_id
    return sweep_dir, sweep_dir / "runs.csv"


def assert_one_error_line(out, message):
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], out.stderr
    assert "Traceback" not in out.stderr
    return errors[0]


def test_agent_state_that_is_not_json_is_one_error_and_runs_csv_brings_the_sweep_back(
        tmp_path, env):
    yaml_path = write_yaml(tmp_path / "grid.yaml", {
        "weight_bits": {"values": [8, 4]}, "activation_bits": {"value": 8}})
    sweep_dir, csv_path = one_finished_row(tmp_path, yaml_path)
    state = sweep_dir / "agent_state.json"
    state.write_text('{"runs": [{"run_id": "done0001", "sta')  # cut short
    before = {p: p.read_bytes() for p in (state, csv_path)}
    out = sweep(["--sweep", str(yaml_path), "--results_dir", "res"], tmp_path, env)
    assert_one_error_line(out, "agent_state.json is not valid JSON")
    assert len(out.stderr.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in before} == before
    assert offline_runs(tmp_path) == []

    # As the message says: move it away and run again. W8 finished (runs.csv says so): only
    # W4 runs.
    state.rename(tmp_path / "agent_state.json.bad")
    again = sweep(["--sweep", str(yaml_path), "--results_dir", "res"], tmp_path, env)
    assert again.returncode == 0, again.stderr
    assert evaluations(tmp_path) == [(4, 8)]
    table = pd.read_csv(csv_path)
    assert sorted(table["weight_bits"]) == [4, 8] and "done0001" in set(table["run_id"])


def test_truncated_runs_csv_is_one_error_and_left_as_it_is(tmp_path, env):
    yaml_path = write_yaml(tmp_path / "grid.yaml", {
        "weight_bits": {"values": [8, 4]}, "activation_bits": {"value": 8}})
    sweep_dir, csv_path = one_finished_row(tmp_path, yaml_path)
    csv_path.write_bytes(csv_path.read_bytes()[:-9])  # a crash in the middle of the last row
    before = csv_path.read_bytes()
    out = sweep(["--sweep", str(yaml_path), "--results_dir", "res"], tmp_path, env)
    assert_one_error_line(out, "runs.csv is damaged: its last line (2) is cut off")
    assert len(out.stderr.strip().splitlines()) == 1
    assert csv_path.read_bytes() == before
    assert not (sweep_dir / "agent_state.json").exists() and offline_runs(tmp_path) == []


def _can_create(directory):
    try:
        (directory / "probe").touch()
    except OSError:
        return False
    (directory / "probe").unlink()
    return True


def make_unwritable(directory):
    """Make `directory` refuse new files, root included (chmod does not bind root; the ext4
    immutable flag does). Returns how to undo it, or None where neither works here."""
    os.chmod(directory, 0o555)
    if not _can_create(directory):
        return lambda: os.chmod(directory, 0o755)
    chattr = subprocess.run(["chattr", "+i", str(directory)], capture_output=True)
    if chattr.returncode == 0 and not _can_create(directory):
        def undo():
            subprocess.run(["chattr", "-i", str(directory)], check=True)
            os.chmod(directory, 0o755)
        return undo
    os.chmod(directory, 0o755)
    return None


def test_results_dir_that_becomes_unwritable_mid_sweep_is_one_error_and_loses_nothing(
        tmp_path, env):
    probe = tmp_path / "probe-dir"
    probe.mkdir()
    undo = make_unwritable(probe)
    if undo is None:
        pytest.skip("cannot make a directory unwritable here (root, and no chattr +i)")
    undo()

    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "6").touch()
    yaml_path = write_yaml(tmp_path / "grid.yaml", {
        "weight_bits": {"values": [8, 6, 4]}, "activation_bits": {"value": 8},
        "hold_dir": {"value": str(hold)}})
    args = ["--sweep", str(yaml_path), "--results_dir", "res"]
    agent = start_agent(args, tmp_path, env)
    state_path, runs = wait_for_state(tmp_path / "res", lambda runs: [
        (e["config"]["weight_bits"], e["state"]) for e in runs] == [(8, "finished"),
                                                                     (6, "running")])
    sweep_dir = state_path.parent
    before = (sweep_dir / "runs.csv").read_bytes()
    undo = make_unwritable(sweep_dir)
    try:
        (hold / "6").unlink()  # W6 ends now, and nothing can be written where results go
        out, err = agent.communicate(timeout=60)
    finally:
        undo()
    result = subprocess.CompletedProcess(agent.args, agent.returncode, out, err)
    assert_one_error_line(result, "cannot write the sweep's state")
    assert "run the same command again to resume" in err
    assert (sweep_dir / "runs.csv").read_bytes() == before  # W8's row, untouched

    # Writable again: the same command resumes, W6 is run again, W8 is not.
    again = sweep(args, tmp_path, env)
    assert again.returncode == 0, again.stderr
    table = pd.read_csv(sweep_dir / "runs.csv")
    assert sorted(table["weight_bits"]) == [4, 6, 8] and set(table["status"]) == {"finished"}
    assert evaluations(tmp_path).count((8, 8)) == 1


def test_runs_share_the_cores(tmp_path, monkeypatch):
    from mobilenet_compression.sweep import launch

    config = {"program": "standin.py", "method": "grid", "parameters": {}}
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = launch.run_environment(config, "swp", tmp_path, str(tmp_path), agents=2)
    assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert "OMP_NUM_THREADS" not in launch.run_environment(config, "swp", tmp_path,
                                                          str(tmp_path), agents=1)
    env = launch.run_environment(config, "swp", tmp_path, str(tmp_path), agents=2, threads=3)
    assert env["OMP_NUM_THREADS"] == "3"  # --threads wins
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # so does the user's own setting
    assert launch.run_environment(config, "swp", tmp_path, str(tmp_path),
                                 agents=2)["OMP_NUM_THREADS"] == "1"
