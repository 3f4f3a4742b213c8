"""train.py as a user runs it: real subprocesses, real Fashion-MNIST, real wandb offline."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small enough for two CPU cores: width 0.25, a subset of the training set, three epochs.
TINY = ["--dataset", "fashion-mnist", "--width_multiplier", "0.25", "--batch_size", "64",
        "--lr", "0.05", "--max_eval_samples", "500"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def train_env(cwd, env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    full_env.update(WANDB_SILENT="true", WANDB_DIR=str(cwd), **(env or {}))
    return full_env


def train(args, cwd, env=None, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd,
                          env=train_env(cwd, env), capture_output=True, text=True, **kw)


def train_in_process(args, cwd, env=None):
    """What train() runs, in this process (conftest.run_main): train.py's `run_cli(argv)`,
    whose return value (best.pt's content) train.py does not make its exit status."""
    from mobilenet_compression.train import run_cli

    def main(argv):
        run_cli(argv)

    return run_main(main, args, cwd, train_env(cwd, env))


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_trains_on_real_fashion_mnist_well_above_chance(tmp_path, data_dir):
    r = train([*TINY, "--data_dir", data_dir, "--epochs", "3", "--max_train_samples", "3000",
               "--checkpoint_dir", str(tmp_path / "ck"), "--wandb_mode", "disabled"], tmp_path)
    assert r.returncode == 0, r.stderr
    best = torch.load(tmp_path / "ck" / "best.pt", weights_only=True)
    assert best["dataset"] == "fashion-mnist" and best["in_channels"] == 1
    assert best["num_classes"] == 10 and best["width_multiplier"] == 0.25
    assert best["val_acc"] > 50, best["val_acc"]  # chance is 10%
    assert best["test_acc"] > 50, best["test_acc"]
    log = (tmp_path / "ck" / "training_log.txt").read_text().splitlines()
    assert len(log) == 3 and log[0].startswith("epoch 1/3 train_loss")


def test_per_step_cosine_schedule_anneals_within_each_epoch(tmp_path, data_dir):
    # 320 images in batches of 64: 5 steps an epoch, 10 in all; the log's lr is the one the
    # epoch's last step used, i.e. lr * (1 + cos(pi * t / 10)) / 2 at t = 4 and t = 9.
    r = train([*TINY, "--data_dir", data_dir, "--epochs", "2", "--max_train_samples", "320",
               "--lr_schedule", "step", "--checkpoint_dir", str(tmp_path / "ck"),
               "--wandb_mode", "disabled"], tmp_path)
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "ck" / "training_log.txt").read_text().splitlines()
    logged = [float(line.split(" lr ")[1].split()[0]) for line in log]
    expected = [0.05 * (1 + math.cos(math.pi * t / 10)) / 2 for t in (4, 9)]
    assert logged == pytest.approx(expected, abs=1e-5), (logged, expected)
    last = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert last["args"]["lr_schedule"] == "step"


# The per-step schedule: resuming mid-epoch must also restore where the cosine stands.
RESUME_ARGS = [*TINY, "--epochs", "4", "--max_train_samples", "1600", "--lr_schedule", "step",
               "--wandb_mode", "disabled"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("whole")
    r = train([*RESUME_ARGS, "--data_dir", data_dir, "--checkpoint_dir", str(out / "ck")], out)
    assert r.returncode == 0, r.stderr
    return out / "ck"


def test_same_command_twice_gives_identical_weights(tmp_path, data_dir, uninterrupted):
    r = train([*RESUME_ARGS, "--data_dir", data_dir, "--checkpoint_dir", str(tmp_path / "ck")],
              tmp_path)
    assert r.returncode == 0, r.stderr
    assert_same_weights(weights(uninterrupted / "best.pt"), weights(tmp_path / "ck" / "best.pt"))
    assert_same_weights(weights(uninterrupted / "last.pt"), weights(tmp_path / "ck" / "last.pt"))


def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path, data_dir, uninterrupted):
    ck = tmp_path / "ck"
    args = [*RESUME_ARGS, "--data_dir", data_dir, "--checkpoint_dir", str(ck)]
    env = dict(os.environ, WANDB_SILENT="true")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (ck / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # land inside epoch 2 (of 4), mid-epoch
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "--resume" in out
    stopped = torch.load(ck / "last.pt", weights_only=True)
    assert stopped["epoch"] < 4
    r = train([*args, "--resume"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert_same_weights(weights(uninterrupted / "last.pt"), weights(ck / "last.pt"))
    assert_same_weights(weights(uninterrupted / "best.pt"), weights(ck / "best.pt"))
    assert ((uninterrupted / "training_log.txt").read_text().splitlines()[-1].split(" time ")[0]
            == (ck / "training_log.txt").read_text().splitlines()[-1].split(" time ")[0])


def test_offline_wandb_run_logs_epochs_summary_and_model_artifact(tmp_path, data_dir):
    r = train([*TINY, "--data_dir", data_dir, "--epochs", "1", "--max_train_samples", "300",
               "--checkpoint_dir", str(tmp_path / "ck")], tmp_path,
              env={"NETRC": str(tmp_path / "none")})  # no WANDB_MODE, no key, no netrc
    assert r.returncode == 0, r.stderr
    assert "logging offline" in r.stdout  # no credentials: offline by itself, said once
    (run_dir,) = [p for p in (tmp_path / "wandb").iterdir() if p.name.startswith("offline-run")]
    wandb_cli = os.path.join(os.path.dirname(sys.executable), "wandb")
    s = subprocess.run([wandb_cli, "leet", "inspect", "--summary", "--json", str(run_dir)],
                       capture_output=True, text=True, check=True)
    summary = json.loads(s.stdout)
    assert summary["state"] == "finished" and summary["project"] == "mobilenet-compression"
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s",
                "images_per_s", "test_acc"):
        assert key in summary["summary"], key
    best = torch.load(tmp_path / "ck" / "best.pt", weights_only=True)
    assert summary["summary"]["test_acc"] == pytest.approx(best["test_acc"])
    assert summary["config"]["width_multiplier"] == 0.25
    records = subprocess.run([wandb_cli, "leet", "inspect", "--json", str(run_dir)],
                             capture_output=True, text=True, check=True).stdout
    artifacts = [json.loads(line)["artifact"] for line in records.splitlines()
                 if '"type":"artifact"' in line.replace(" ", "")]
    assert len(artifacts) == 1 and artifacts[0]["type"] == "model"


def check_bad_input(run, tmp_path, flags, message):
    """`run` (train or train_in_process) with `flags`: exit status 2, one line on stderr that
    says `message`."""
    r = run(["--data_dir", str(tmp_path / "nodata"), "--checkpoint_dir", str(tmp_path / "ck"),
             "--wandb_mode", "disabled", *flags], tmp_path)
    assert r.returncode == 2
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be positive"),
    (["--batch_size", "-8"], "--batch_size must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--width_multiplier", "0"], "--width_multiplier must be positive"),
    (["--dataset", "imagenet"], "invalid choice"),
    (["--epochs", "two"], "invalid int value"),
    (["--dataset", "cifar10"], "could not be downloaded"),
    (["--resume"], "--resume needs"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, flags, message):
    check_bad_input(train_in_process, tmp_path, flags, message)


def test_bad_input_in_a_real_process_is_one_line_and_exit_2(tmp_path):
    """A case of the test above again as a real `python train.py` (that test calls its main
    in this process): the entry point, and a real process's exit status and stderr."""
    check_bad_input(train, tmp_path, ["--resume"], "--resume needs")


def test_unwritable_checkpoint_dir(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    r = train(["--checkpoint_dir", str(tmp_path / "a_file" / "ck"), "--wandb_mode", "disabled"],
              tmp_path)
    assert r.returncode == 2 and "cannot write checkpoints" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_never_overwrites_an_earlier_run_and_nan_keeps_last_good(tmp_path, data_dir):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "best.pt").write_bytes(b"earlier result")
    r = train(["--data_dir", data_dir, "--checkpoint_dir", str(ck), "--wandb_mode", "disabled"],
              tmp_path)
    assert r.returncode == 2 and "already holds a training run" in r.stderr
    assert (ck / "best.pt").read_bytes() == b"earlier result"

    r = train([*TINY, "--lr", "1e12", "--epochs", "1", "--max_train_samples", "640",
               "--data_dir", data_dir, "--checkpoint_dir", str(tmp_path / "nan"),
               "--wandb_mode", "disabled"], tmp_path)
    assert r.returncode == 2 and "NaN" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "nan" / "last.pt").exists()
