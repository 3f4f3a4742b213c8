"""The plan explorer (explorer.py), driven in a real headless Chromium: the page's BitOps are
bitops.py's to the unit, its predicted size is within the stated 0.1% of real exported files,
one control moved down moves every number the right way; and bad inputs are one error line.

The page is written by the real command for the small checkpoint (conftest), which measures
its sensitivities for real on 32 training images; the sweep it reads is a runs.csv written by
results.append_run from real PTQ runs of that checkpoint (quantize, calibrate, bias correction,
evaluate, export as a run does), five uniform cells and one mixed-precision plan."""

import json
import os
import re
import subprocess
import sys

import pytest

from mobilenet_compression.mixed import sensitivity as sens
from mobilenet_compression.quant.bitops import adaptive_plan, bitops_report, block_of
from mobilenet_compression.checkpoint import file_digest
from mobilenet_compression.sources import export_metadata, load_model
from mobilenet_compression.data import BatchLoader
from mobilenet_compression.deploy.export import export_quantized, load_quantized
from mobilenet_compression.evaluation import eval_loader, evaluate, largest_difference
from mobilenet_compression.mixed.explorer import main as explorer_main, predict_drop, summed_kl
from mobilenet_compression.quant.bias_correction import bias_correct
from mobilenet_compression.quant.calibrate import calibrate
from mobilenet_compression.quant.convert import convert
from mobilenet_compression.quant.precision import (
    mean_bits,
    quantized_layer_names,
    uniform_plan,
)
from mobilenet_compression.quant.prepare import quantize_model
from mobilenet_compression.sweep import results
from tests.conftest import load, run_main, torch_threads
from tests.test_qat import ROOT, small_checkpoint  # noqa: F401  (a fixture)

SIZE = 28
UNIFORM = [(8, 8), (6, 6), (4, 8), (4, 4), (3, 4)]
SWEEP = "explorer-test"
EVAL_IMAGES = 500
SIZE_TOLERANCE = 0.001  # what the page states: within 0.1% of the real file
SENSITIVITY = ["--batches", "1", "--batch_size", "32"]  # 32 images: ~30 s on one core


def explorer(args, tmp):
    """The command, its sensitivity cache under `tmp`."""
    return subprocess.run([sys.executable, "-m", "mobilenet_compression.mixed.explorer", *args],
                          cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=explorer_env(tmp))


def explorer_in_process(args, tmp):
    """What explorer() runs, as the module's `main` in this process (conftest.run_main)."""
    return run_main(explorer_main, args, ROOT, explorer_env(tmp))


def explorer_env(tmp):
    return {**os.environ, "MOBILENET_COMPRESSION_CACHE": str(tmp / "cache")}


def real_run(fp32, ckpt, checkpoint, plan, label, fashion_mnist, out_dir, baseline_acc):
    """One PTQ run as pipeline.py does it (fewer images: 64 to calibrate, 500 to evaluate); its
    runs.csv row and exported file."""
    info, train, _, test = fashion_mnist
    calib = BatchLoader(train.head(64), info, 64, channels_last=True)
    qmodel = quantize_model(fp32, plan)
    calibrate(qmodel, calib, "mse", 1)
    bias_correct(qmodel, fp32, calib, 1)
    convert(qmodel)
    quant_acc = evaluate(qmodel, eval_loader(test.head(EVAL_IMAGES), info))
    path = out_dir / "models" / f"{label}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    export_quantized(qmodel, str(path), {**export_metadata(ckpt, file_digest(checkpoint)),
                                         "method": "ptq"})
    assert largest_difference(qmodel, load_quantized(str(path)), test.head(256), info) == 0.0
    full = plan if isinstance(plan, dict) else uniform_plan(fp32, *plan)
    rows, totals = bitops_report(fp32, SIZE, full)
    wb, ab = (plan if not isinstance(plan, dict)
              else mean_bits(full, {r["name"]: r["macs"] for r in rows}))
    return {"run_id": label, "status": "finished", "weight_bits": wb, "activation_bits": ab,
            "plan": "uniform" if not isinstance(plan, dict) else "adaptive", "method": "ptq",
            "calibration": "mse", "bias_correction": True, "baseline_acc": baseline_acc,
            "quant_acc": quant_acc, "acc_drop": baseline_acc - quant_acc,
            "compressed_mb": os.path.getsize(path) / 2**20, **totals,
            "checkpoint": str(checkpoint), "dataset": "fashion-mnist"}, path


@pytest.fixture(scope="module")
def page(tmp_path_factory, small_checkpoint, fashion_mnist):  # noqa: F811
    """The page the real command writes: (its path, its html, the data it embeds, the FP32
    model, {label: (runs.csv row, exported file)}, the sensitivity table)."""
    tmp = tmp_path_factory.mktemp("explorer")
    ckpt, fp32 = load_model(str(small_checkpoint))
    info, _, _, test = fashion_mnist
    made = {}
    with torch_threads(1):
        baseline = evaluate(fp32, eval_loader(test.head(EVAL_IMAGES), info))
        plans = {f"w{w}a{a}": (w, a) for w, a in UNIFORM}
        plans["adaptive"] = adaptive_plan(fp32, SIZE, activation_bits=8)
        for label, plan in plans.items():
            row, path = real_run(fp32, ckpt, small_checkpoint, plan, label, fashion_mnist,
                                 tmp / SWEEP, baseline)
            results.append_run(tmp, SWEEP, row, params={"label": label})
            made[label] = (row, path)
    out = tmp / "explorer.html"
    r = explorer(["--checkpoint", str(small_checkpoint), "--runs", str(tmp / SWEEP), "--out",
                  str(out), *SENSITIVITY, "--threads", "1"], tmp)
    assert r.returncode == 0, r.stderr
    assert "fitted by least squares to the 5 uniform PTQ runs" in r.stdout, r.stdout
    # The sensitivities the page holds are the real ones, now in the cache it was told to use.
    with torch_threads(1):
        table, cached = sens.sensitivity(str(small_checkpoint), batches=1, batch_size=32,
                                         cache_dir=str(tmp / "cache" / "sensitivity"),
                                         verbose=False)
    assert cached
    html = out.read_text()
    data = json.loads(re.search(r'id="explorer-data">(.*?)</script>', html, re.S)[1])
    return out, html, data, fp32, made, table


def numbers(driver):
    """The page's numbers: exact values (data-value) and the text a person reads."""
    from selenium.webdriver.common.by import By

    out = {}
    for key in ("bitops", "mb", "drop", "kl"):
        e = driver.find_element(By.ID, key)
        value = e.get_attribute("data-value")  # none where the page has no number
        out[key] = None if value is None else float(value)
        out[key + "_text"] = e.text
    return out


def choose(driver, control, bits):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, control)).select_by_value(str(bits))


def block_plan(page_plan, fp32):
    """The per-layer plan of {block: (w, a)}."""
    return {n: page_plan[block_of(n)] for n in quantized_layer_names(fp32)}


def test_page_is_self_contained_and_small(page):
    _, html, data, _, _, _ = page
    assert len(html.encode()) < 200_000
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing fetched
    assert "<script src" not in html and "@import" not in html and "plotly" not in html
    assert len(data["runs"]) == 6 and sum(not r["uniform"] for r in data["runs"]) == 1


def test_controls_move_bitops_size_and_drop_as_the_package_counts_them(page, browser):
    from selenium.webdriver.common.by import By

    out, _, data, fp32, made, table = page
    load(browser, out)
    blocks = list(dict.fromkeys(block_of(n) for n in quantized_layer_names(fp32)))
    for b in blocks:  # a weight and an activation control per block, all at 8 bits
        for kind in "wa":
            assert browser.find_element(By.ID, f"{kind}-{b}").get_attribute("value") == "8"
    before = numbers(browser)
    w8a8 = bitops_report(fp32, SIZE, uniform_plan(fp32, 8, 8))[1]["bitops"]
    assert before["bitops"] == w8a8
    assert before["bitops_text"] == f"{w8a8 / 1e9:.4f}"

    # One block's weights from 8 to 2 bits: BitOps fall by exactly its MACs x 6 x 8.
    rows = bitops_report(fp32, SIZE, {})[0]
    block = max(blocks, key=lambda b: sum(r["macs"] for r in rows if block_of(r["name"]) == b
                                          and r["name"] in quantized_layer_names(fp32)))
    block_macs = sum(r["macs"] for r in rows if block_of(r["name"]) == block
                     and r["name"] in quantized_layer_names(fp32))
    marker = browser.find_element(By.ID, "marker").get_attribute("d")
    choose(browser, f"w-{block}", 2)
    after = numbers(browser)
    plan = block_plan({b: (2 if b == block else 8, 8) for b in blocks}, fp32)
    assert after["bitops"] == before["bitops"] - block_macs * (8 - 2) * 8
    assert after["bitops"] == bitops_report(fp32, SIZE, plan)[1]["bitops"]
    assert float(after["bitops_text"]) == pytest.approx(after["bitops"] / 1e9, abs=5e-5)
    assert after["mb"] < before["mb"]
    assert after["drop"] > before["drop"] and after["kl"] > before["kl"]
    assert after["kl"] == pytest.approx(summed_kl(data["layers"], plan), rel=1e-9)
    assert browser.find_element(By.ID, "marker").get_attribute("d") != marker
    assert browser.find_element(By.ID, "w-all").get_attribute("value") == ""  # now mixed
    # The page's drop is the fitted curve at the plan's summed KL of the real sensitivities.
    layer_kl = sum(table["weight"][n]["2" if block_of(n) == block else "8"]
                   + table["activation"][n]["8"] for n in plan)
    assert after["kl"] == pytest.approx(layer_kl, rel=1e-9)
    assert after["drop"] == pytest.approx(predict_drop(layer_kl, data["fit"]), rel=1e-9)

    # Uniform W4A4 through the "set all" controls: the size of the real W4A4 file.
    choose(browser, "w-all", 4)
    choose(browser, "a-all", 4)
    w4a4 = numbers(browser)
    row, path = made["w4a4"]
    assert w4a4["bitops"] == row["bitops"]
    assert w4a4["mb"] == pytest.approx(os.path.getsize(path), rel=SIZE_TOLERANCE)
    assert float(w4a4["mb_text"]) == pytest.approx(row["compressed_mb"], abs=1e-3)

    # The mixed plan (weights 2/4/8 by block cost, activations 8), one control at a time.
    adaptive_row, adaptive_path = made["adaptive"]
    adaptive = adaptive_plan(fp32, SIZE, activation_bits=8)
    for b in blocks:
        (wb, ab), = {adaptive[n] for n in adaptive if block_of(n) == b}
        choose(browser, f"w-{b}", wb)
        choose(browser, f"a-{b}", ab)
    mixed = numbers(browser)
    assert mixed["bitops"] == adaptive_row["bitops"]
    assert mixed["mb"] == pytest.approx(os.path.getsize(adaptive_path), rel=SIZE_TOLERANCE)
    assert mixed["drop"] == pytest.approx(
        predict_drop(summed_kl(data["layers"], adaptive), data["fit"]), rel=1e-9)


def test_chart_draws_every_run_with_its_label(page, browser):
    from selenium.webdriver.common.by import By

    out, _, _, _, made, _ = page
    load(browser, out)
    browser.find_element(By.ID, "zoom").click()  # every run, not only the top 12 points
    uniform = browser.find_elements(By.CSS_SELECTOR, "circle.run.uniform")
    mixed = browser.find_elements(By.CSS_SELECTOR, "circle.run.mixed")
    assert (len(uniform), len(mixed)) == (len(UNIFORM), 1)
    titles = {c.find_element(By.TAG_NAME, "title").get_attribute("textContent")
              for c in uniform}
    row = made["w4a4"][0]
    assert f"W4A4 {row['quant_acc']:.2f}%" in titles
    assert uniform[0].get_attribute("fill") != mixed[0].get_attribute("fill")
    # where the fitted curve puts each uniform run: one grey ring per run it was fitted to
    assert len(browser.find_elements(By.CSS_SELECTOR, "circle.fitted")) == len(UNIFORM)
    notes = browser.find_element(By.ID, "notes").text
    assert "estimate" in notes and "5 uniform PTQ runs" in notes and "0.1%" in notes


def test_without_runs_the_page_shows_the_summed_kl(page, browser, tmp_path,
                                                   small_checkpoint):  # noqa: F811
    from selenium.webdriver.common.by import By

    out = tmp_path / "bare.html"
    cache_root = page[0].parent  # the sensitivities measured for the first page
    r = explorer(["--checkpoint", str(small_checkpoint), "--out", str(out), *SENSITIVITY,
                  "--threads", "1"], cache_root)
    assert r.returncode == 0, r.stderr
    load(browser, out)
    assert browser.find_element(By.ID, "drop").text == "n/a"
    assert "no runs were given" in browser.find_element(By.ID, "notes").text
    before = numbers(browser)["kl"]
    choose(browser, "a-all", 3)
    assert numbers(browser)["kl"] > before


def check_bad_input(run, tmp_path, checkpoint, case):
    """`run` (explorer or explorer_in_process) with the arguments of `case`: exit status 2,
    one `error:` line, no page written, the checkpoint untouched."""
    (tmp_path / "empty").mkdir()
    ckpt_bytes = checkpoint.read_bytes()
    args = {"missing checkpoint": ["--checkpoint", str(tmp_path / "nope.pt"),
                                   "--out", str(tmp_path / "p.html")],
            "runs without runs.csv": ["--checkpoint", str(checkpoint), "--runs",
                                      str(tmp_path / "empty"), "--out",
                                      str(tmp_path / "p.html")],
            "out in a missing folder": ["--checkpoint", str(checkpoint), "--out",
                                        str(tmp_path / "no" / "p.html")],
            "out not html": ["--checkpoint", str(checkpoint), "--out",
                             str(checkpoint)]}[case]
    r = run(args, tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "p.html").exists()
    assert checkpoint.read_bytes() == ckpt_bytes  # never overwritten


@pytest.mark.parametrize("case", ["missing checkpoint", "runs without runs.csv",
                                  "out in a missing folder", "out not html"])
def test_bad_inputs_are_one_error_line(tmp_path, small_checkpoint, case):  # noqa: F811
    check_bad_input(explorer_in_process, tmp_path, small_checkpoint, case)


def test_bad_input_in_a_real_process_is_one_error_line(tmp_path, small_checkpoint):  # noqa: F811
    """A case of the test above again as a real `python -m mobilenet_compression.mixed.explorer`
    (that test calls its main in this process): the entry point, and a real process's exit
    status and stderr."""
    check_bad_input(explorer, tmp_path, small_checkpoint, "runs without runs.csv")
