"""runs.csv (mobilenet_compression.sweep.results) and the report drawn from it
(`python sweep.py --report DIR`). Nothing is mocked: real files, real subprocesses."""

import concurrent.futures
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mobilenet_compression.errors import UserError
from mobilenet_compression.sweep import plots, report, results
from mobilenet_compression.sweep import table as runs_table
from tests.conftest import load
from tests.markdown import table_rows

REPO = Path(__file__).resolve().parents[1]
BITS = [8, 6, 4, 3, 2]


def fake_sweep(results_dir, sweep_id="swp00001", failed=((3, 3),)):
    """A bits sweep's runs.csv with plausible numbers, some configurations failed."""
    drop_w = {8: 0.1, 6: 0.5, 4: 2.2, 3: 7.5, 2: 33}
    drop_a = {8: 0.05, 6: 0.4, 4: 3.1, 3: 11, 2: 48}
    size = {8: 2.35, 6: 1.82, 4: 1.27, 3: 0.99, 2: 0.72}
    for i, (w, a) in enumerate((w, a) for w in reversed(BITS) for a in BITS):
        row = {"run_id": f"run{i:05d}", "weight_bits": w, "activation_bits": a,
               "calibration": "minmax", "checkpoint": "checkpoints/best.pt"}
        if (w, a) in failed:
            row.update(status="failed", exit_code=1)
        else:
            acc = max(10.0, 93.71 - drop_w[w] - drop_a[a])
            row.update(dataset="cifar10", baseline_acc=93.71, quant_acc=np.float64(acc),
                       acc_drop=93.71 - acc, orig_mb=8.71, compressed_mb=size[w],
                       compression_ratio=8.71 / size[w], bitops=9.2e8 + 9.31e7 * w * a,
                       bitops_fp32=9.6e10, weight_bitops=2.9e7 + 9.31e7 * w, macs=9.4e7)
        results.append_run(results_dir, sweep_id, row)
    return Path(results_dir) / sweep_id


def sweep_py(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "sweep.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


# --- runs.csv -------------------------------------------------------------------------------


def test_append_run_keys_rows_by_run_id(tmp_path):
    path = results.append_run(tmp_path, "swp1", {"run_id": "a", "quant_acc": np.float32(91.5),
                                                  "weight_bits": np.int64(4)})
    assert path == tmp_path / "swp1" / "runs.csv"
    results.append_run(tmp_path, "swp1", {"run_id": "b", "quant_acc": 80.0, "extra": "x"})
    # The same run again (a retried write, or the agent marking it failed) updates its row.
    results.append_run(tmp_path, "swp1", {"run_id": "a", "status": "failed", "exit_code": 1})
    table = results.read_runs(tmp_path / "swp1")
    assert table["run_id"].tolist() == ["a", "b"]
    a = table.iloc[0]
    assert (a["status"], a["exit_code"], a["quant_acc"], a["weight_bits"]) == (
        "failed", 1, 91.5, 4)
    assert table.iloc[1]["status"] == "finished" and table.iloc[1]["extra"] == "x"
    assert list(table.columns[:4]) == ["run_id", "sweep_id", "status", "exit_code"]
    assert results.runs_csv_path(tmp_path, None) == tmp_path / "runs" / "runs.csv"


def _append_many(args):
    results_dir, writer = args
    for i in range(10):
        results.append_run(results_dir, "swp", {"run_id": f"w{writer}-{i}", "quant_acc": i})
        results.append_run(results_dir, "swp", {"run_id": f"w{writer}-{i}", "quant_acc": i})
    return writer


def test_concurrent_writers_lose_and_duplicate_nothing(tmp_path):
    with concurrent.futures.ProcessPoolExecutor(4) as pool:
        list(pool.map(_append_many, [(tmp_path, w) for w in range(4)]))
    table = pd.read_csv(tmp_path / "swp" / "runs.csv")
    assert len(table) == 40 and table["run_id"].is_unique


def test_append_run_to_an_unwritable_place_is_a_user_error(tmp_path):
    (tmp_path / "taken").write_text("a file, not a directory")
    with pytest.raises(UserError, match="cannot write the results table"):
        results.append_run(tmp_path / "taken", "swp", {"run_id": "a"})
    with pytest.raises(ValueError, match="run_id"):
        results.append_run(tmp_path, "swp", {"quant_acc": 1.0})


def test_a_retried_configuration_replaces_its_row_and_never_a_finished_one(tmp_path):
    w4 = {"weight_bits": 4, "activation_bits": 8}
    results.append_run(tmp_path, "swp1", {"run_id": "a1", "status": "failed", "exit_code": 1},
                       params=w4)
    results.append_run(tmp_path, "swp1", {"run_id": "b1", "quant_acc": 80.0},
                       params={"weight_bits": 8, "activation_bits": 8})
    # The retry of W4A8 finishes: its row takes the failed one's place.
    results.append_run(tmp_path, "swp1", {"run_id": "a2", "quant_acc": 75.0, **w4}, params=w4)
    table = results.read_runs(tmp_path / "swp1")
    assert table["run_id"].tolist() == ["a2", "b1"]
    assert table.iloc[0]["status"] == "finished" and "exit_code" not in table.dropna(
        axis=1).columns  # nothing of the failed run's row is left in it
    # A later run of W4A8 that is killed does not replace the finished result.
    results.append_run(tmp_path, "swp1", {"run_id": "a3", "status": "killed"}, params=w4)
    assert results.read_runs(tmp_path / "swp1")["run_id"].tolist() == ["a2", "b1"]
    # The same run id updates its own row, and the parameters are kept as given, as JSON.
    results.append_run(tmp_path, "swp1", {"run_id": "b1", "exit_code": 0})
    rows = results.read_rows(tmp_path / "swp1" / "runs.csv")
    assert [r["run_id"] for r in rows] == ["a2", "b1"]
    assert json.loads(rows[0]["sweep_params"]) == w4


def test_inside_a_sweep_the_parameters_come_from_the_agents_config_file(tmp_path,
                                                                          monkeypatch):
    # What `wandb agent` gives a run: WANDB_SWEEP_ID and the config file it names.
    for run_id, bits, status in (("r1", 4, "killed"), ("r2", 2, "finished"),
                                 ("r3", 4, "finished")):
        param_file = tmp_path / f"config-{run_id}.yaml"
        param_file.write_text(f"weight_bits:\n  value: {bits}\ncalibration:\n  value: mse\n")
        monkeypatch.setenv("WANDB_SWEEP_ID", "swp2")
        monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(param_file))
        results.append_run(tmp_path, "swp2", {"run_id": run_id, "status": status,
                                              "weight_bits": bits})
    rows = results.read_rows(tmp_path / "swp2" / "runs.csv")
    assert [(r["run_id"], r["status"]) for r in rows] == [("r3", "finished"),
                                                           ("r2", "finished")]
    assert json.loads(rows[0]["sweep_params"]) == {"weight_bits": 4, "calibration": "mse"}
    # Another sweep's id in the environment: its file says nothing about this table.
    monkeypatch.setenv("WANDB_SWEEP_ID", "other")
    results.append_run(tmp_path, "swp2", {"run_id": "r4", "weight_bits": 4})
    assert [r["run_id"] for r in results.read_rows(tmp_path / "swp2" / "runs.csv")] == [
        "r3", "r2", "r4"]


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[:-7], "last line (3) is cut off"),
    (lambda text: text.replace("\n", ",9,9\n", 2).replace(",9,9\n", "\n", 1),
     "line 2 has more cells"),
    (lambda text: text[:text.rindex("\n", 0, -1) + 1] + "c\n", "line 3 has fewer cells"),
])
def test_a_damaged_runs_csv_is_one_error_and_never_written_over(tmp_path, damage, message):
    for run_id, acc in (("a", 70.0), ("b", 80.0)):
        results.append_run(tmp_path, "swp", {"run_id": run_id, "quant_acc": acc,
                                             "weight_bits": 8})
    path = tmp_path / "swp" / "runs.csv"
    path.write_text(damage(path.read_text()))
    before = path.read_bytes()
    with pytest.raises(UserError, match=re.escape(message)):
        results.append_run(tmp_path, "swp", {"run_id": "c", "quant_acc": 90.0})
    with pytest.raises(UserError, match="is damaged"):
        results.read_runs(path)
    out = sweep_py(["--report", str(path.parent)], tmp_path)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"error: {path} is damaged: ") and message in line
    assert path.read_bytes() == before
    assert not (path.parent / "summary.md").exists()


# --- report ---------------------------------------------------------------------------------


def test_pareto_front():
    cost = [1, 2, 3, 4, 2, 5]
    acc = [10, 50, 40, 80, 50, 80]
    # (3, 40) is beaten by (2, 50); (5, 80) by (4, 80); the two (2, 50) keep one.
    assert runs_table.pareto_front(cost, acc).tolist() == [True, True, False, True, False, False]


def test_report_cli_writes_table_plots_and_lists_failures(tmp_path):
    sweep_dir = fake_sweep(tmp_path / "results")
    out = sweep_py(["--report", str(sweep_dir)], tmp_path)
    assert out.returncode == 0, out.stderr

    summary = (sweep_dir / "summary.md").read_text()
    assert "checkpoint `checkpoints/best.pt`" in summary and "dataset `cifar10`" in summary
    assert "sweep `swp00001`" in summary and "24 finished runs, 1 failed" in summary
    rows = table_rows(summary)
    header = ["W_bits", "A_bits", "Accuracy", "Drop", "Orig_MB", "Comp_MB", "Ratio", "BitOps (G)"]
    assert rows[0] == header
    table = rows[1:25]
    order = [(int(r[0]), int(r[1])) for r in table]
    assert order == sorted(order, reverse=True)  # W then A, highest first
    assert table[0] == ["8", "8", "93.56", "0.15", "8.71", "2.350", "3.71", "6.88"]
    assert "## Runs that did not finish" in summary
    assert ["`run00008`", "3", "3", "minmax", "checkpoints/best.pt", "failed", "1",
            "no"] in rows

    import matplotlib.image

    for name, size in (("parallel_coordinates.png", (720, 1440)), ("pareto.png", (660, 1680))):
        image = matplotlib.image.imread(sweep_dir / name)
        assert image.shape[:2] == size, name
        assert image.std() > 0.05, name  # something is drawn
    html = (sweep_dir / "parallel_coordinates.html").read_text()
    assert '"type":"parcoords"' in html.replace(" ", "")
    for label in plots.AXIS_LABELS.values():
        assert label in html
    assert "Plotly.newPlot" in html
    # plotly.js is not inside the page but one shared copy beside the sweep's folder, loaded
    # by a relative path (nothing from a CDN: the page opens offline)
    (src,) = re.findall(r'<script[^>]*\bsrc="([^"]+)"', html)
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    assert src == f"../plotly-{get_plotlyjs_version()}.min.js"
    assert (sweep_dir / src).read_text() == get_plotlyjs()
    assert (sweep_dir / "parallel_coordinates.html").stat().st_size < plots.HTML_LIMIT_BYTES
    assert f"Redraw it with `python sweep.py --report {sweep_dir}`" in summary
    assert "[docs/metrics.md](" in summary


def test_report_with_calibration_column_and_only_failures(tmp_path):
    sweep_dir = fake_sweep(tmp_path, "calib", failed=())
    table = pd.read_csv(sweep_dir / "runs.csv")
    table.loc[table["activation_bits"] == 2, "calibration"] = "mse"
    table.to_csv(sweep_dir / "runs.csv", index=False)
    report.write_report(sweep_dir)
    assert table_rows((sweep_dir / "summary.md").read_text())[0][:4] == [
        "W_bits", "A_bits", "Calib", "Accuracy"]
    # A calibration sweep gets a calibration axis, its methods as the tick labels.
    html = (sweep_dir / "parallel_coordinates.html").read_text()
    assert '"label":"calibration"' in html.replace(" ", "")
    assert '"ticktext":["minmax","mse"]' in html.replace(" ", "")

    only_failed = fake_sweep(tmp_path, "dead", failed=[(w, a) for w in BITS for a in BITS])
    written = report.write_report(only_failed)
    assert [p.name for p in written] == ["summary.md"]
    summary = (only_failed / "summary.md").read_text()
    assert "0 finished runs, 25 failed" in summary and "No run finished" in summary


def test_report_of_a_directory_without_runs_csv_is_one_clear_error(tmp_path):
    out = sweep_py(["--report", str(tmp_path / "nowhere")], tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: no runs.csv in {tmp_path / 'nowhere'}; pass the directory a sweep wrote its "
        f"results to, e.g. results/<sweep_id>"]


def test_report_of_a_method_sweep_has_a_method_column_axis_and_labels(tmp_path):
    sweep_dir = fake_sweep(tmp_path, "qat", failed=())
    table = pd.read_csv(sweep_dir / "runs.csv")
    table["method"] = np.where(table.index % 2, "qat", "ptq")
    table.loc[table["method"] == "qat", "quant_acc"] = 99.0
    table.to_csv(sweep_dir / "runs.csv", index=False)
    report.write_report(sweep_dir)
    summary = (sweep_dir / "summary.md").read_text()
    assert table_rows(summary)[0][:4] == ["W_bits", "A_bits", "Method", "Accuracy"]
    assert re.search(r"Best accuracy: W\d+A\d+ qat at 99\.00%", summary), summary
    html = (sweep_dir / "parallel_coordinates.html").read_text().replace(" ", "")
    assert '"label":"method"' in html and '"ticktext":["ptq","qat"]' in html


def test_report_of_a_distillation_sweep_tells_its_runs_apart(tmp_path):
    # Two runs per cell, with and without --distill: the summary must say which is which.
    sweep_dir = fake_sweep(tmp_path, "kd", failed=())
    table = pd.read_csv(sweep_dir / "runs.csv")
    table["distill"] = table.index % 2 == 1
    table.loc[table["distill"], "quant_acc"] = 99.0
    table.to_csv(sweep_dir / "runs.csv", index=False)
    report.write_report(sweep_dir)
    summary = (sweep_dir / "summary.md").read_text()
    header, *rows = table_rows(summary)
    assert header[:4] == ["W_bits", "A_bits", "Distill", "Accuracy"]
    assert {r[2] for r in rows} == {"True", "False"}
    assert re.search(r"Best accuracy: W\d+A\d+ \+KD at 99\.00%", summary), summary
    html = (sweep_dir / "parallel_coordinates.html").read_text().replace(" ", "")
    assert '"label":"distill"' in html


def fake_mixed_sweep(results_dir, uniform_dir):
    """A mixed-precision sweep's runs.csv: for each of three budgets (a uniform plan's
    BitOps), a run with fractional mean bits at that budget, 1 point above the uniform run."""
    uniform = pd.read_csv(uniform_dir / "runs.csv").dropna(subset=["quant_acc"])
    for i, (w, a) in enumerate(((4, 4), (3, 3), (2, 4))):
        u = uniform[(uniform.weight_bits == w) & (uniform.activation_bits == a)].iloc[0]
        results.append_run(results_dir, "mixed001", {
            "run_id": f"mix{i:05d}", "plan": "sensitivity", "weight_bits": w - 0.37,
            "activation_bits": a + 0.21, "checkpoint": "checkpoints/best.pt",
            "dataset": "cifar10", "baseline_acc": 93.71, "quant_acc": u.quant_acc + 1,
            "acc_drop": u.acc_drop - 1, "orig_mb": 8.71, "compressed_mb": u.compressed_mb,
            "compression_ratio": u.compression_ratio, "bitops": u.bitops * 0.99,
            "bitops_budget": u.bitops, "bitops_fp32": 9.6e10, "macs": 9.4e7})
    return Path(results_dir) / "mixed001"


def test_mixed_report_sets_each_run_beside_the_best_uniform_run_under_its_budget(tmp_path):
    uniform = fake_sweep(tmp_path / "uniform", failed=())
    mixed = fake_mixed_sweep(tmp_path / "mixed", uniform)
    out = sweep_py(["--report", str(mixed), "--uniform", str(uniform)], tmp_path)
    assert out.returncode == 0, out.stderr
    summary = (mixed / "summary.md").read_text()
    assert ["3.63", "4.21"] in [r[:2] for r in table_rows(summary)]  # mean bits keep decimals
    assert "## Mixed precision against uniform bits at the same BitOps" in summary
    section = summary.split("## Mixed precision against uniform")[1]
    rows = [r for r in table_rows(section) if r[0] != "Budget (G)"]
    assert len(rows) == 3
    rows = {r[1]: r for r in rows}
    # At the W4A4 budget the best uniform run within it is W4A4 itself (W8A2 and W2A8 cost
    # as much but lose more in fake_sweep's numbers), and the mixed run is 1 point above it.
    assert rows["W3.63 A4.21"][4] == "W4A4" and rows["W3.63 A4.21"][6] == "+1.00"
    assert rows["W2.63 A3.21"][4] == "W3A3" and rows["W2.63 A3.21"][6] == "+1.00"
    import matplotlib.image

    image = matplotlib.image.imread(mixed / "pareto.png")
    assert image.std() > 0.05
    # Another checkpoint's uniform runs are refused, and so is a folder of none.
    table = pd.read_csv(uniform / "runs.csv")
    table["checkpoint"] = "elsewhere/best.pt"
    table.to_csv(uniform / "runs.csv", index=False)
    bad = sweep_py(["--report", str(mixed), "--uniform", str(uniform)], tmp_path)
    assert bad.returncode == 2 and "another checkpoint" in bad.stderr
    assert bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def test_pages_of_many_sweeps_share_one_plotly_js_and_draw_every_run_offline(tmp_path, browser):
    """Two sweeps in one results folder: one copy of plotly.js between them, found again (not
    written twice) for the second; each page, opened from file:// in a real headless Chromium,
    draws one line per finished run. Without the shared file the page draws nothing."""
    first = fake_sweep(tmp_path / "results", "swp00001")
    second = fake_sweep(tmp_path / "results", "swp00002", failed=())
    for sweep_dir in (first, second):
        assert sweep_py(["--report", str(sweep_dir)], tmp_path).returncode == 0
    (js,) = (tmp_path / "results").glob("plotly-*.min.js")
    assert list(tmp_path.rglob("plotly-*.js")) == [js]
    for sweep_dir, runs in ((first, 24), (second, 25)):
        assert drawn_runs(browser, sweep_dir / "parallel_coordinates.html") == runs
    js.rename(js.with_suffix(".moved"))
    assert drawn_runs(browser, second / "parallel_coordinates.html", errors_allowed=True) is None


def drawn_runs(driver, page, errors_allowed=False):
    """How many runs the plotly panel on `page` holds once drawn, read from the live page
    (None where plotly.js did not load: no Plotly, no panel)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    if errors_allowed:
        driver.get(page.as_uri())
    else:
        load(driver, page)
    if not driver.execute_script("return !!window.Plotly"):
        return None
    try:  # plotly draws after the page's load event
        WebDriverWait(driver, 20).until(lambda d: d.execute_script(
            "return document.querySelectorAll('.js-plotly-plot .y-axis').length > 0"))
    except TimeoutException:
        return None
    axes, runs = driver.execute_script(
        "const plot = document.querySelector('.js-plotly-plot');"
        "return [plot.querySelectorAll('.y-axis').length, plot._fullData[0]._length]")
    assert axes == len(plots.AXES)  # one drawn axis per panel column
    return runs
