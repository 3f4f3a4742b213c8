"""The spread of a grid over checkpoints (`python -m mobilenet_compression.sweep.spread`), as a
real subprocess on runs.csv files in the format runs write."""

import subprocess
import sys

import pandas as pd

from tests.markdown import table_rows
from tests.test_qat import ROOT


def write_sweep(folder, baseline, accs, **params):
    folder.mkdir(parents=True)
    rows = [{"run_id": f"r{i}", "status": "finished", "weight_bits": wb, "activation_bits": ab,
             "baseline_acc": baseline, "quant_acc": acc, "acc_drop": baseline - acc,
             "calibration": "mse", "bias_correction": True, **params}
            for i, ((wb, ab), acc) in enumerate(accs.items())]
    rows.append({**rows[0], "run_id": "dead", "status": "killed", "quant_acc": 0.0})
    pd.DataFrame(rows).to_csv(folder / "runs.csv", index=False)
    return str(folder)


def spread(*args):
    return subprocess.run([sys.executable, "-m", "mobilenet_compression.sweep.spread", *args],
                          cwd=ROOT, capture_output=True, text=True)


def test_spread_gives_mean_std_and_range_per_cell(tmp_path):
    a = write_sweep(tmp_path / "a", 93.0, {(8, 8): 92.9, (4, 4): 90.0})
    b = write_sweep(tmp_path / "b", 92.0, {(8, 8): 91.9, (4, 4): 86.0})
    c = write_sweep(tmp_path / "c", 92.5, {(8, 8): 92.5, (4, 4): 88.0})
    r = spread(a, b, c, "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(tmp_path / "out" / "spread.csv").set_index(
        ["weight_bits", "activation_bits"])
    cell = table.loc[(4, 4)]
    assert cell["count"] == 3  # the killed row is not a measurement
    assert abs(cell["mean"] - 88.0) < 1e-9 and abs(cell["std"] - 2.0) < 1e-9
    assert (cell["min"], cell["max"]) == (86.0, 90.0)
    assert abs(cell["drop_mean"] - 4.5) < 1e-9  # drops 3.0, 6.0, 4.5
    md = (tmp_path / "out" / "spread.md").read_text()
    assert ["4", "4", "3", "88.00 ± 2.00 [86.00..90.00]", "4.50 ± 1.50 [3.00..6.00]"] in table_rows(md)
    assert (tmp_path / "out" / "spread.png").stat().st_size > 10_000


def test_sweeps_of_different_configurations_are_refused(tmp_path):
    a = write_sweep(tmp_path / "a", 93.0, {(8, 8): 92.9})
    b = write_sweep(tmp_path / "b", 93.0, {(8, 8): 92.0}, bias_correction=False)
    r = spread(a, b, "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "bias_correction" in r.stderr
    assert not (tmp_path / "out").exists()
    r = spread(a, str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "runs.csv does not exist" in r.stderr


def test_qat_sweeps_must_share_their_training_settings(tmp_path):
    qat = {"method": "qat", "qat_lr": 0.01, "distill": True}
    a = write_sweep(tmp_path / "a", 93.0, {(4, 4): 92.0}, qat_epochs=0.3, **qat)
    b = write_sweep(tmp_path / "b", 93.0, {(4, 4): 92.5}, qat_epochs=2.0, **qat)
    r = spread(a, b, "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "qat_epochs" in r.stderr
    assert not (tmp_path / "out").exists()
    c = write_sweep(tmp_path / "c", 92.0, {(4, 4): 91.0}, qat_epochs=0.3, **qat)
    r = spread(a, c, "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "out" / "spread.md").read_text()
    assert "method qat" in md and "qat_epochs 0.3" in md and "distill True" in md


def write_rounding_sweep(folder, baseline, nearest, gptq):
    """A sweep that varies weight_rounding beside the bits, as rounding.yaml does."""
    folder.mkdir(parents=True)
    rows = [{"run_id": f"{r}{i}", "status": "finished", "weight_bits": wb,
             "activation_bits": ab, "baseline_acc": baseline, "quant_acc": acc,
             "calibration": "mse", "bias_correction": True, "weight_rounding": r}
            for r, accs in (("nearest", nearest), ("gptq", gptq))
            for i, ((wb, ab), acc) in enumerate(accs.items())]
    pd.DataFrame(rows).to_csv(folder / "runs.csv", index=False)
    return str(folder)


def test_where_picks_one_setting_of_a_sweep_that_varies_it(tmp_path):
    a = write_rounding_sweep(tmp_path / "a", 93.0, {(4, 8): 92.0}, {(4, 8): 92.8})
    b = write_rounding_sweep(tmp_path / "b", 92.0, {(4, 8): 91.0}, {(4, 8): 91.6})
    out = tmp_path / "out"
    r = spread(a, b, "--out", str(out))  # both settings in one cell would be no spread
    assert r.returncode == 2 and "several weight_rounding values" in r.stderr
    assert "--where weight_rounding=VALUE" in r.stderr and not out.exists()
    for rounding, mean in (("gptq", 92.2), ("nearest", 91.5)):
        r = spread(a, b, "--out", str(out), "--where", f"weight_rounding={rounding}")
        assert r.returncode == 0, r.stderr
        cell = pd.read_csv(out / "spread.csv").iloc[0]
        assert cell["count"] == 2 and abs(cell["mean"] - mean) < 1e-9, rounding
        assert f"runs with weight_rounding = {rounding}" in (out / "spread.md").read_text()
    # A sweep from before the column existed ran nearest rounding.
    old = write_sweep(tmp_path / "old", 92.5, {(4, 8): 91.9})
    r = spread(a, old, "--out", str(out), "--where", "weight_rounding=nearest")
    assert r.returncode == 0, r.stderr
    assert abs(pd.read_csv(out / "spread.csv").iloc[0]["mean"] - 91.95) < 1e-9
    for bad, message in (("weight_rounding", "COLUMN=VALUE"), ("no_col=1", "no column"),
                         ("weight_rounding=adaround", "no finished run matches")):
        r = spread(a, b, "--out", str(tmp_path / "bad"), "--where", bad)
        assert r.returncode == 2 and r.stderr.startswith("error:") and message in r.stderr, bad
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def write_auto_sweep(folder, baseline, accs, low="loss"):
    """A grid with --calibration auto: each run records the calibration its cell got (loss at
    3-bit activations and fewer, mse above)."""
    folder.mkdir(parents=True)
    rows = [{"run_id": f"r{i}", "status": "finished", "weight_bits": wb, "activation_bits": ab,
             "baseline_acc": baseline, "quant_acc": acc, "bias_correction": "auto",
             "calibration": low if ab <= 3 else "mse"}
            for i, ((wb, ab), acc) in enumerate(accs.items())]
    pd.DataFrame(rows).to_csv(folder / "runs.csv", index=False)
    return str(folder)


def test_a_setting_that_follows_the_cell_is_the_same_configuration(tmp_path):
    cells = {(8, 8): 93.0, (8, 3): 85.0}
    a = write_auto_sweep(tmp_path / "a", 93.5, cells)
    b = write_auto_sweep(tmp_path / "b", 93.4, {k: v - 0.5 for k, v in cells.items()})
    out = tmp_path / "out"
    r = spread(a, b, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "calibration loss at A3, mse at A8" in (out / "spread.md").read_text()
    assert pd.read_csv(out / "spread.csv")["count"].tolist() == [2, 2]
    # The same cell calibrated two ways in two sweeps is not one configuration.
    c = write_auto_sweep(tmp_path / "c", 93.4, cells, low="mse")
    r = spread(a, c, "--out", str(tmp_path / "out2"))
    assert r.returncode == 2 and "differ in calibration" in r.stderr
    assert not (tmp_path / "out2").exists()
