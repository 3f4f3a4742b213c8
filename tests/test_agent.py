"""The offline local sweep, end to end: real `python sweep.py --sweep` subprocesses, real
wandb in offline mode, W&B's real sweep engine. Nothing is mocked; the only thing missing is
a W&B server, which offline mode stands in for (runs are read back from their local files by
wandb's own reader, `wandb leet inspect --summary --json`).

The run program here is a small stand-in written into tmp_path, not mobilenet_compression.run:
it speaks the same contract (parameters from wandb.config, summary keys, one runs.csv row via
mobilenet_compression.results) in a second instead of a minute.
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

REPO = Path(__file__).resolve().parents[1]

STAND_IN = '''
import argparse, sys, time
import wandb
from mobilenet_compression import results

parser = argparse.ArgumentParser()
parser.add_argument("--weight_bits", type=int, default=32)
parser.add_argument("--activation_bits", type=int, default=32)
parser.add_argument("--calibration", default="minmax")
parser.add_argument("--fail_bits", type=int, default=0)
parser.add_argument("--sleep", type=float, default=0.0)
args = parser.parse_args()
run = wandb.init(project="ignored-inside-a-sweep", job_type="quantize", config=vars(args))
c = run.config  # under an agent the sweep's parameters arrive here, whatever argv said
time.sleep(c.sleep)
if c.weight_bits == c.fail_bits:
    print("stand-in: failing on purpose", file=sys.stderr)
    sys.exit(3)
acc = 90.0 - 40.0 / c.weight_bits - 20.0 / c.activation_bits
metrics = {
    "weight_bits": c.weight_bits, "activation_bits": c.activation_bits,
    "baseline_acc": 90.0, "quant_acc": acc, "acc_drop": 90.0 - acc,
    "orig_mb": 8.0, "compressed_mb": c.weight_bits / 4 + 0.1,
    "compression_ratio": 8.0 / (c.weight_bits / 4 + 0.1),
    "bitops": 9e7 * c.weight_bits * c.activation_bits, "macs": 9e7,
}
run.summary.update(metrics)
results.append_run(results.default_results_dir(), run.sweep_id,
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


@pytest.mark.parametrize("name, runs", [("bits", 25), ("calibration", 18), ("per_tensor", 25)])
def test_repo_sweeps_pass_wandb_schema(name, runs):
    import sweeps

    from mobilenet_compression import agent

    path = REPO / "sweeps" / f"{name}.yaml"
    config = yaml.safe_load(path.read_text())
    assert sweeps.schema_violations_from_proposed_config(config) == []
    agent.validate_sweep_config(config, path)  # and the local agent accepts it
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
    assert len(pd.read_csv(sweep_dir / "runs.csv")) == 4


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
])
def test_broken_sweep_yaml_is_one_clear_error(tmp_path, env, text, extra, message):
    path = tmp_path / "broken.yaml"
    if text is not None:
        path.write_text(text)
    out = sweep(["--sweep", str(path), "--results_dir", "res", *extra], tmp_path, env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert message in lines[0]
    assert not (tmp_path / "res").exists()


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
    import wandb
    from wandb.wandb_agent import Agent

    from mobilenet_compression import agent

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

    ours_env = agent.run_environment(config, "swp00001", tmp_path / "res", str(tmp_path))
    proc, _ = agent.launch(config, "swp00001", "ourrun01", params, ours_env, str(tmp_path))
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
