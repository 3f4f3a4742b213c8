"""BitOps: the seeds' worked examples, the DESIGN checks, and the command line.

The expected numbers are written out by hand (seed 001's and seed 003's examples, corrected
where seed 003 ignored the depthwise groups), not computed with the code under test.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the bare `pytest` entry point does not put the repo on the path

from mobilenet_compression import bitops as bitops_cli
from mobilenet_compression.checkpoint import FORMAT, atomic_save  # noqa: E402
from mobilenet_compression.errors import UserError  # noqa: E402
from mobilenet_compression.model import build_model  # noqa: E402
from mobilenet_compression.quant import bitops
from tests.conftest import run_main  # noqa: E402

CLI = [sys.executable, "-m", "mobilenet_compression.bitops"]


def by_name(rows):
    return {r["name"]: r for r in rows}


@pytest.fixture(scope="module")
def imagenet():
    # Shapes are all BitOps needs, so a meta model keeps the 3.5M-parameter init out of tests.
    with torch.device("meta"):
        return build_model("imagenet", num_classes=1000)


@pytest.fixture(scope="module")
def cifar():
    return build_model("cifar", num_classes=10)


def test_seed001_depthwise_example():
    # 3x3 depthwise, 64 channels, 32x32 output, 4-bit weights: 32*32*64*3*3*4.
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False))
    rows, totals = bitops.bitops_report(model, 32, {"0": (4, 8)})
    (row,) = rows
    assert row["type"] == "depthwise"
    assert row["output_hw"] == (32, 32)
    assert row["macs"] == 589_824
    assert row["weight_bitops"] == 2_359_296
    assert totals["weight_bitops"] == 2_359_296
    assert totals["bitops"] == 589_824 * 4 * 8


def test_imagenet_w8a8_quantize_all_seed003(imagenet):
    plan = bitops.uniform_plan(imagenet, 8, 8, quantize_all=True)
    assert "features.0.0" in plan and "classifier.1" in plan
    rows, totals = bitops.bitops_report(imagenet, 224, plan)
    r = by_name(rows)

    stem = r["features.0.0"]
    assert (stem["type"], stem["stride"], stem["input_hw"], stem["output_hw"]) == (
        "standard", (2, 2), (224, 224), (112, 112))
    assert stem["macs"] == 10_838_016 and stem["bitops"] == 693_633_024

    proj = r["features.1.conv.1"]
    assert (proj["type"], proj["in_channels"], proj["out_channels"], proj["output_hw"]) == (
        "pointwise", 32, 16, (112, 112))
    assert proj["macs"] == 6_422_528 and proj["bitops"] == 411_041_792

    dw = r["features.1.conv.0.0"]
    assert (dw["type"], dw["in_channels"], dw["groups"], dw["output_hw"]) == (
        "depthwise", 32, 32, (112, 112))
    assert dw["macs"] == 3_612_672 and dw["bitops"] == 231_211_008
    assert dw["bitops"] != 1_053_294_592  # seed 003's value, groups ignored

    # 300,774,272 INCLUDES the classifier Linear (1280 x 1000 = 1,280,000 MACs); the convs
    # alone are 299,494,272.
    assert r["classifier.1"]["macs"] == 1_280_000
    assert totals["macs"] == 300_774_272
    assert sum(x["macs"] for x in rows if x["type"] != "linear") == 299_494_272
    assert totals["bitops"] == 300_774_272 * 64
    assert totals["weight_bitops"] == 300_774_272 * 8
    assert len(rows) == 52 + 1  # 52 convs + the classifier


def test_cifar_total_macs(cifar):
    rows, totals = bitops.bitops_report(cifar, 32, {})
    # Includes the 1280 x 10 classifier (12,800 MACs); stem stride 1 keeps 32x32.
    assert totals["macs"] == 87_976_448
    assert by_name(rows)["classifier.1"]["macs"] == 12_800
    assert by_name(rows)["features.0.0"]["output_hw"] == (32, 32)


def test_macs_match_conv_formula(cifar):
    # An independent check of every layer: out_h*out_w*out_c*(in_c/groups)*kh*kw.
    modules = dict(cifar.named_modules())
    for r in bitops.layer_stats(cifar, 32):
        m = modules[r["name"]]
        if isinstance(m, nn.Linear):
            assert r["macs"] == m.in_features * m.out_features
        else:
            oh, ow = r["output_hw"]
            kh, kw = m.kernel_size
            assert r["macs"] == oh * ow * m.out_channels * (m.in_channels // m.groups) * kh * kw


def test_fp32_layers_count_at_32x32(cifar):
    plan = bitops.uniform_plan(cifar, 4, 8)
    assert "features.0.0" not in plan and "classifier.1" not in plan
    rows, totals = bitops.bitops_report(cifar, 32, plan)
    r = by_name(rows)
    for name in ("features.0.0", "classifier.1"):
        assert (r[name]["weight_bits"], r[name]["activation_bits"]) == (32, 32)
        assert r[name]["bitops"] == r[name]["macs"] * 1024
        assert r[name]["weight_bitops"] == r[name]["macs"] * 32
    fp32_macs = r["features.0.0"]["macs"] + r["classifier.1"]["macs"]
    assert fp32_macs == 884_736 + 12_800
    quant_macs = 87_976_448 - fp32_macs
    assert totals["bitops"] == quant_macs * 4 * 8 + fp32_macs * 32 * 32
    assert totals["weight_bitops"] == quant_macs * 4 + fp32_macs * 32
    assert totals["bitops_fp32"] == totals["macs"] * 1024
    assert set(totals) == {"macs", "bitops", "bitops_fp32", "weight_bitops"}


def test_adaptive_between_fixed_2_and_8(cifar, imagenet):
    for model, size in ((cifar, 32), (imagenet, 224)):
        def total(plan):
            return bitops.bitops_report(model, size, plan)[1]["bitops"]

        for act in (8, None):  # activations fixed at 8, or following the weights
            adaptive = bitops.adaptive_plan(model, size, activation_bits=act)
            a2, a8 = (8, 8) if act == 8 else (2, 8)
            assert total(bitops.uniform_plan(model, 2, a2)) < total(adaptive)
            assert total(adaptive) < total(bitops.uniform_plan(model, 8, a8))
        assert set(adaptive) == set(bitops.quantized_layer_names(model))
        # The costliest block gets the fewest bits, the cheapest the most.
        block_macs = {}
        for row in bitops.layer_stats(model, size):
            if row["name"] in adaptive:
                b = bitops.block_of(row["name"])
                block_macs[b] = block_macs.get(b, 0) + row["macs"]
        costliest = max(block_macs, key=block_macs.get)
        cheapest = min(block_macs, key=block_macs.get)
        weight_bits = lambda block: {wb for n, (wb, _) in adaptive.items()
                                     if bitops.block_of(n) == block}
        assert weight_bits(costliest) == {2} and weight_bits(cheapest) == {8}
        assert {wb for wb, _ in adaptive.values()} == {2, 4, 8}


def test_report_does_not_touch_the_model(cifar):
    # Counting is static: the model keeps its mode, device and every tensor. (How long a
    # report takes is a benchmark figure, not a test: machines differ in speed.)
    cifar.train()
    before = {k: v.clone() for k, v in cifar.state_dict().items()}
    bitops.bitops_report(cifar, 32, bitops.uniform_plan(cifar, 4, 4))
    assert cifar.training
    assert next(cifar.parameters()).device.type == "cpu"
    after = cifar.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_plans_are_rejected(cifar):
    with pytest.raises(UserError, match="does not have"):
        bitops.bitops_report(cifar, 32, {"features.99.conv": (4, 4)})
    with pytest.raises(UserError, match="2..8"):
        bitops.bitops_report(cifar, 32, {"features.1.conv.1": (1, 8)})
    with pytest.raises(UserError):
        bitops.uniform_plan(cifar, 4, 9)
    # 16 and 32 are floating point, counted at their width.
    rows, _ = bitops.bitops_report(cifar, 32, {"features.1.conv.1": (16, 32)})
    row = by_name(rows)["features.1.conv.1"]
    assert row["bitops"] == row["macs"] * 16 * 32


def run_cli(*args):
    return subprocess.run(CLI + list(args), cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def run_cli_in_process(*args):
    """What run_cli runs, in this process (conftest.run_main): the module's `main`, whose
    return value (the totals) `python -m` does not make its exit status."""
    def main(argv):
        bitops_cli.main(argv)

    return run_main(main, args, REPO, dict(os.environ))


def test_cli_imagenet_w8a8():
    p = run_cli("--arch", "imagenet", "--input_size", "224", "--quantize_all",
                "--weight_bits", "8", "--activation_bits", "8")
    assert p.returncode == 0, p.stderr
    assert "693,633,024" in p.stdout  # the stem conv
    assert "231,211,008" in p.stdout  # the first depthwise conv
    assert "300,774,272" in p.stdout  # total MACs
    assert "19,249,553,408" in p.stdout  # 300,774,272 x 64


def check_bad_value(run, flag, value, message):
    """`run` (run_cli or run_cli_in_process) with `flag value`: exit status 2, one `error:`
    line that says `message`."""
    p = run(flag, value)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("flag,value,message", [
    ("--weight_bits", "1", "2..8"),
    ("--activation_bits", "12", "2..8"),
    ("--input_size", "4", "at least 8"),
    ("--width_multiplier", "0", "positive"),
])
def test_cli_bad_values_one_line_exit_2(flag, value, message):
    check_bad_value(run_cli_in_process, flag, value, message)


def test_cli_bad_value_in_a_real_process_one_line_exit_2():
    """A case of the test above again as a real `python -m mobilenet_compression.bitops`
    (that test calls its main in this process): the entry point, and a real process's exit
    status and stderr."""
    check_bad_value(run_cli, "--weight_bits", "1", "2..8")


def test_cli_non_integer_bits_exit_2():
    p = run_cli_in_process("--weight_bits", "4.5")
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert "whole numbers" in p.stderr.strip().splitlines()[-1]


def test_cli_compare_csv_and_checkpoint(tmp_path, capsys):
    # A checkpoint with the metadata train.py writes: 1-channel 28x28 (Fashion-MNIST).
    model = build_model("cifar", num_classes=10, in_channels=1)
    ckpt = {"format": FORMAT, "arch": "cifar", "dataset": "fashion-mnist", "num_classes": 10,
            "in_channels": 1, "input_size": 28, "width_multiplier": 1.0, "seed": 42,
            "model": model.state_dict()}
    path = tmp_path / "best.pt"
    atomic_save(ckpt, path)
    png, csv = tmp_path / "cmp.png", tmp_path / "layers.csv"
    totals = bitops_cli.main(["--checkpoint", str(path), "--plan", "adaptive",
                          "--compare", str(png), "--csv", str(csv)])
    out = capsys.readouterr().out
    assert "input 1x28x28" in out and "28x28" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("name,type,") and len(lines) == 1 + 53
    assert totals["macs"] == sum(r["macs"] for r in bitops.layer_stats(model, 28))
    assert f"{totals['bitops']:,}" in out

    # The same flags with --arch are a contradiction, and a corrupt file is one error line.
    with pytest.raises(SystemExit) as e:
        bitops_cli.main(["--checkpoint", str(path), "--arch", "cifar"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: {path} is a checkpoint of train.py, which knows "
                                       f"its own dataset and model; drop --arch.\n")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        bitops_cli.main(["--checkpoint", str(bad)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "corrupt" in err and err.count("\n") == 1
