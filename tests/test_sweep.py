"""sweep.py end to end: real subprocesses, a checkpoint trained by train.py on real
Fashion-MNIST, real wandb in offline mode. Nothing is mocked; the only stand-in is offline
mode for the W&B server that cannot exist here."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import run_main, sweep_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WANDB_CLI = os.path.join(os.path.dirname(sys.executable), "wandb")
QUICK = ["--max_eval_samples", "300", "--calib_batches", "2"]


def env_for(tmp, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    # One thread per process: on 2 shared cores, two spinning OpenMP threads made training
    # ~20x slower (13 against 253 images/s), and one thread is bit-reproducible on a machine.
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp),
               OMP_NUM_THREADS="1", **extra)
    return env


def sweep_py(args, tmp, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sweep.py"), *args], cwd=cwd,
                          env=env or env_for(tmp), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)


def sweep_in_process(args, tmp, env=None, cwd=ROOT):
    """What sweep_py runs, as sweep.py's `main` in this process (conftest.run_main)."""
    return run_main(sweep_main, args, cwd, env or env_for(tmp))


def summary_of(run_dir):
    out = subprocess.run([WANDB_CLI, "leet", "inspect", "--summary", "--json", str(run_dir)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


# The fixture's model must be well clear of chance on any machine, or no quantization changes
# its accuracy and the tests below prove nothing: 1 epoch on 1,000 images ended at val_acc 8.00
# on one CPU and 11.67 on another. 2 epochs on 4,000 images gave 70-75% for seeds 1, 7, 42, 123
# (about 30 s on one thread).
TRAIN_RECIPE = ["--width_multiplier", "0.25", "--epochs", "2", "--max_train_samples", "4000",
                "--max_eval_samples", "500", "--batch_size", "64", "--lr", "0.05"]
MIN_VAL_ACC = 50.0  # chance is 10%


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "fashion-mnist",
         "--data_dir", str(tmp / "data"), *TRAIN_RECIPE, "--checkpoint_dir", str(tmp / "ck"),
         "--wandb_mode", "disabled"],
        cwd=tmp, env=env_for(tmp), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    path = tmp / "ck" / "best.pt"
    val_acc = torch.load(path, weights_only=True)["val_acc"]
    assert val_acc >= MIN_VAL_ACC, f"the fixture trained to val_acc {val_acc:.2f} only"
    return path


DESIGN_KEYS = ("weight_bits", "activation_bits", "baseline_acc", "quant_acc", "acc_drop",
               "orig_mb", "compressed_mb", "compression_ratio", "weight_compression_ratio",
               "activation_compression_ratio", "bitops", "bitops_fp32", "weight_bitops", "macs")


def test_one_run_logs_design_metrics_and_a_real_file(tmp_path, checkpoint):
    r = sweep_py(["--checkpoint", str(checkpoint), "--weight_bits", "4", "--activation_bits",
                  "8", "--results_dir", str(tmp_path / "res"), *QUICK], tmp_path)
    assert r.returncode == 0, r.stderr
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    s = summary_of(run_dir)
    assert s["state"] == "finished"
    for key in DESIGN_KEYS:
        assert key in s["summary"], key
    rows = pd.read_csv(tmp_path / "res" / "runs" / "runs.csv")
    assert len(rows) == 1 and rows.run_id[0] == s["run_id"]
    row = rows.iloc[0]
    assert row.weight_rounding == "gptq" and s["config"]["weight_rounding"] == "gptq"
    (model_file,) = (tmp_path / "res" / "runs" / "models").glob("*.safetensors")
    assert row.compressed_mb == pytest.approx(os.path.getsize(model_file) / 2**20)
    assert row.compression_ratio == pytest.approx(row.orig_mb / row.compressed_mb)
    assert row.acc_drop == pytest.approx(row.baseline_acc - row.quant_acc)
    assert row.roundtrip_max_abs_diff == 0.0
    assert s["summary"]["bitops"] == row.bitops


def test_agent_style_run_without_arguments_reads_the_config_file(tmp_path, checkpoint):
    # What wandb agent does for a run (wandb_agent.py, _command_run): a config file of
    # {param: {value: v}} and three environment variables; the command passes no arguments.
    config = {"weight_bits": {"value": 3}, "activation_bits": {"value": 6},
              "checkpoint": {"value": str(checkpoint)}, "max_eval_samples": {"value": 300},
              "calib_batches": {"value": 2}, "results_dir": {"value": str(tmp_path / "res")},
              "weight_rounding": {"value": "gptq"}}
    path = tmp_path / "config-abc123.yaml"
    path.write_text(yaml.safe_dump(config))
    env = env_for(tmp_path, WANDB_SWEEP_ID="sw1", WANDB_RUN_ID="abc123",
                  WANDB_SWEEP_PARAM_PATH=str(path))
    r = sweep_py([], tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    rows = pd.read_csv(tmp_path / "res" / "sw1" / "runs.csv")
    assert rows.run_id.tolist() == ["abc123"]
    assert (rows.weight_bits[0], rows.activation_bits[0]) == (3, 6)
    assert rows.weight_rounding[0] == "gptq"

    config["no_such_param"] = {"value": 1}
    path.write_text(yaml.safe_dump(config))
    r = sweep_py([], tmp_path, env=dict(env, WANDB_RUN_ID="abc124"))
    assert r.returncode == 2 and "no_such_param" in r.stderr
    assert "Traceback" not in r.stderr
    assert len(pd.read_csv(tmp_path / "res" / "sw1" / "runs.csv")) == 1


def test_offline_sweep_2x2_with_two_agents_then_resume_adds_nothing(tmp_path, checkpoint):
    sweep = {
        "program": "sweep.py", "method": "grid",
        "metric": {"name": "quant_acc", "goal": "maximize"},
        "parameters": {"weight_bits": {"values": [8, 2]}, "activation_bits": {"values": [8, 2]},
                       "checkpoint": {"value": str(checkpoint)},
                       "max_eval_samples": {"value": 300}, "calib_batches": {"value": 2},
                       # The runs write here; the agent must find them here for the report.
                       "results_dir": {"value": str(tmp_path / "res")}},
        "command": ["${env}", "${interpreter}", "${program}", "${args}"],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(sweep))
    args = ["--sweep", str(path), "--agents", "2"]
    r = sweep_py(args, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (out,) = [p for p in (tmp_path / "res").iterdir() if p.is_dir()]
    rows = pd.read_csv(out / "runs.csv")
    assert len(rows) == 4 and set(rows.status) == {"finished"}
    # Each row knows the configuration the sweep gave it (what a retry's row replaces).
    params = [json.loads(p) for p in rows.sweep_params]
    assert sorted((p["weight_bits"], p["activation_bits"]) for p in params) == sorted(
        zip(rows.weight_bits, rows.activation_bits))
    assert set(zip(rows.weight_bits, rows.activation_bits)) == {(8, 8), (8, 2), (2, 8), (2, 2)}
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 4
    for run_dir in runs:
        s = summary_of(run_dir)
        assert s["state"] == "finished" and "quant_acc" in s["summary"]
    # Activation bits take effect: W8A2 is not W8A8.
    by = rows.set_index(["weight_bits", "activation_bits"]).quant_acc
    assert by[(8, 2)] != by[(8, 8)]
    for name in ("summary.md", "parallel_coordinates.png", "parallel_coordinates.html",
                 "pareto.png"):
        assert (out / name).stat().st_size > 0, name

    r = sweep_py(args, tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(pd.read_csv(out / "runs.csv")) == 4
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 4


def _corrupt(tmp):
    p = tmp / "corrupt.pt"
    p.write_bytes(os.urandom(4096))
    return p


def _other_arch(tmp, checkpoint):
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["width_multiplier"] = 1.0  # metadata says width 1.0, the weights are width 0.25
    p = tmp / "other.pt"
    torch.save(ckpt, p)
    return p


def check_bad_input(run, tmp_path, checkpoint, case, message):
    """`run` (sweep_py or sweep_in_process) with the flags of `case`: exit status 2, one line
    on stderr that says `message`, nothing written."""
    flags = case(tmp_path, checkpoint)
    if "--checkpoint" not in flags:
        flags = ["--checkpoint", str(checkpoint), *flags]
    r = run([*QUICK, *flags, "--results_dir", str(tmp_path / "res")], tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("wandb:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("case, message", [
    (lambda t, c: ["--weight_bits", "1"], "--weight_bits"),
    (lambda t, c: ["--activation_bits", "4.5"], "invalid int value"),
    (lambda t, c: ["--weight_bits", "12"], "--weight_bits"),
    (lambda t, c: ["--calibration", "entropy"], "invalid choice"),
    (lambda t, c: ["--weight_rounding", "adaround"], "invalid choice"),
    (lambda t, c: ["--calib_batches", "0"], "--calib_batches"),
    (lambda t, c: ["--checkpoint", str(t / "missing.pt")], "does not exist"),
    (lambda t, c: ["--checkpoint", str(_corrupt(t))], "corrupt"),
    (lambda t, c: ["--checkpoint", str(_other_arch(t, c))], "another architecture"),
    (lambda t, c: ["--no_such_flag", "1"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, checkpoint, case, message):
    check_bad_input(sweep_in_process, tmp_path, checkpoint, case, message)


def test_bad_input_in_a_real_process_is_one_line_exit_2_and_writes_nothing(tmp_path,
                                                                           checkpoint):
    """A case of the test above again as a real `python sweep.py` (that test calls its main
    in this process): the entry point, and a real process's exit status and stderr."""
    check_bad_input(sweep_py, tmp_path, checkpoint,
                    lambda t, c: ["--checkpoint", str(_corrupt(t))], "corrupt")


INIT_IN_SWEEP = """
from mobilenet_compression import tracking
run = tracking.init_run("offline", "quantize", {"weight_bits": 4})
print("project:", run.project)
run.finish()
"""


def test_a_run_inside_a_sweep_passes_no_project_to_wandb(tmp_path):
    # wandb ignores wandb.init(project=...) inside a sweep and warned on every run; the sweep's
    # project (WANDB_PROJECT, which `wandb agent` and the offline agent set) is used instead.
    env = {k: v for k, v in env_for(tmp_path).items() if k != "WANDB_SILENT"}
    env.update(WANDB_SWEEP_ID="swp00001", WANDB_PROJECT="sweep-project",
               PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", INIT_IN_SWEEP], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "project: sweep-project" in r.stdout
    assert "Ignoring project" not in r.stdout + r.stderr


@pytest.mark.parametrize("script, args", [
    ("sweep.py", ["--checkpoint", "checkpoints/best.pt", "--weight_bits", "4"]),
    ("sweep.py", ["--sweep", "sweeps/bits.yaml"]),
    ("train.py", ["--epochs", "1"]),
])
def test_python_without_the_requirements_names_the_virtualenv(tmp_path, script, args):
    # `wandb agent` runs `python` from PATH; one without the requirements (here: this one with
    # -S, which hides its site-packages) must say which environment to activate, in one line.
    r = subprocess.run([sys.executable, "-S", os.path.join(ROOT, script), *args], cwd=ROOT,
                       env=env_for(tmp_path), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: ") and "no module named" in line
    venv = subprocess.run(["make", "-s", "venv-path"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert f"source {venv}/bin/activate" in line and "make setup" in line


def test_set_threads_takes_the_flag_then_omp_num_threads(monkeypatch):
    import argparse

    from mobilenet_compression import threads
    from mobilenet_compression.errors import UserError

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert threads.set_threads() == 1 == torch.get_num_threads()
        assert threads.set_threads(2) == 2 == torch.get_num_threads()  # --threads wins
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert threads.set_threads() == 2  # neither: torch's count is left as it is
        for bad in (0, -1, 1.5, True):
            with pytest.raises(UserError, match="--threads must be a positive integer"):
                threads.set_threads(bad)
        monkeypatch.setenv("OMP_NUM_THREADS", "many")
        with pytest.raises(UserError, match="OMP_NUM_THREADS must be a positive integer"):
            threads.set_threads()
    finally:
        torch.set_num_threads(before)
    parser = threads.add_argument(argparse.ArgumentParser())
    assert parser.parse_args(["--threads", "3"]).threads == 3
    assert parser.parse_args([]).threads is None
