"""The FP32 statistics a sweep's runs share (fp32_stats.py): measured once, read back as the
same bits, so a run gives the same numbers from the cache as without it."""

import copy

import pandas as pd
import torch
from safetensors.torch import load_file

from mobilenet_compression.data import BatchLoader
from mobilenet_compression.quant.bias_correction import bias_correct, fp32_channel_means
from mobilenet_compression.quant.equalize import (
    depthwise_input_maxes,
    equalize_depthwise_inputs,
)
from mobilenet_compression.quant.prepare import quant_layers
from tests.test_qat import QUICK, ptq, small_checkpoint, sweep_py  # noqa: F401  (a fixture)


def test_stored_statistics_give_the_same_network_as_measuring_them(fashion_mnist_model,
                                                                    fashion_mnist):
    info, train, _, _ = fashion_mnist
    loader = BatchLoader(train, info, 256)
    fp32 = fashion_mnist_model.eval()
    eq, _ = equalize_depthwise_inputs(fp32, loader, 2)
    maxes = depthwise_input_maxes(fp32, loader, 2)
    eq_stored, _ = equalize_depthwise_inputs(fp32, None, 2, maxes)  # no images read
    for (n, a), (_, b) in zip(eq.state_dict().items(), eq_stored.state_dict().items()):
        assert torch.equal(a, b), n
    qmodel = ptq(eq, fashion_mnist, 4, 6)
    measured = bias_correct(copy.deepcopy(qmodel), eq, loader, 2)
    means = fp32_channel_means(eq, loader, 2)
    stored = bias_correct(copy.deepcopy(qmodel), None, loader, 2, fp32_means=means)
    biases = [(n, m.bias) for n, m in quant_layers(measured) if n.startswith("features")]
    assert biases and all(b is not None for _, b in biases)
    for (n, a), (_, b) in zip(biases, [(n, m.bias) for n, m in quant_layers(stored)
                                       if n.startswith("features")]):
        assert torch.equal(a, b), n


def test_a_second_run_reads_the_statistics_and_gives_the_same_numbers(tmp_path,
                                                                      small_checkpoint):  # noqa: F811
    cache = tmp_path / "cache"

    def run(name):
        r = sweep_py(["--checkpoint", str(small_checkpoint), "--weight_bits", "4",
                      "--activation_bits", "4", "--results_dir", str(tmp_path / name),
                      "--wandb_mode", "disabled", *QUICK], tmp_path,
                     MOBILENET_COMPRESSION_CACHE=str(cache))
        assert r.returncode == 0, r.stderr
        return pd.read_csv(tmp_path / name / "runs" / "runs.csv").iloc[0]

    first = run("a")
    files = sorted((cache / "fp32-stats").glob("*.safetensors"))
    assert [f.name.split("-")[0] for f in files] == ["equalize", "means"]  # the defaults
    stamps = [f.stat().st_mtime_ns for f in files]
    means = load_file(str(files[1]))
    assert len(means) > 40 and all(t.dtype == torch.float32 for t in means.values())
    second = run("b")
    assert [f.stat().st_mtime_ns for f in files] == stamps  # read, not measured again
    # A damaged file is a cache miss: measured again, rewritten, the same numbers.
    files[1].write_bytes(b"not a safetensors file")
    third = run("c")
    assert load_file(str(files[1])).keys() == means.keys()
    for row in (second, third):
        for col in ("quant_acc", "bias_correction_val_acc_without",
                    "bias_correction_val_acc_with", "onnx_acc"):
            assert row[col] == first[col], col
