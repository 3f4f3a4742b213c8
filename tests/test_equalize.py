"""Equalizing the depthwise convs' inputs (quant/equalize.py), on the small model trained on the real
Fashion-MNIST (conftest): the FP32 function is kept, every channel fills the range, the
depthwise weights keep their integer codes, and the equalized model exports, reloads and runs
in ONNX Runtime as the same model."""

import json

import numpy as np
import onnx
import pandas as pd
import torch
from torch import nn

from mobilenet_compression.deploy import onnx_export as ox
from mobilenet_compression.deploy import onnx_runtime as rt
from mobilenet_compression.data import BatchLoader
from mobilenet_compression.evaluation import agreement, eval_loader, predict
from mobilenet_compression.deploy.export import export_quantized, load_quantized, read_quantized
from mobilenet_compression.quant.calibrate import calibrate
from mobilenet_compression.quant.convert import convert
from mobilenet_compression.quant.equalize import (
    MAX_FACTOR,
    depthwise_inputs,
    equalize_depthwise_inputs,
)
from mobilenet_compression.quant.prepare import quantize_model
from tests.conftest import torch_threads
from tests.test_qat import QUICK, small_checkpoint, sweep_py  # noqa: F401  (a fixture)

SHAPE = (1, 28, 28)
META = {"arch": "cifar", "num_classes": 10, "width_multiplier": 0.25, "in_channels": 1}


def with_narrow_channels(model, factor=16.0):
    """`model` with every other channel of each depthwise conv's input made `factor` times
    narrower where it is produced (its BatchNorm's scale and shift / factor) and its depthwise
    filter `factor` times larger: channels of very different ranges behind one per-tensor
    grid, the case equalization exists for, built into the network rather than left to the
    luck of a short training. The function changes only where such a channel passed 6 (ReLU6
    now cuts it at 6 x factor in its old units); tests compare against this network's own FP32
    outputs. Returns the model."""
    with torch.no_grad():
        for bn, _, _, conv in depthwise_inputs(model):
            narrow = torch.arange(bn.num_features) % 2 == 0
            bn.weight[narrow] /= factor
            bn.bias[narrow] /= factor
            conv.weight[narrow] *= factor
    return model


def calibration(fashion_mnist, n=512):
    info, train, _, _ = fashion_mnist
    return BatchLoader(train.head(n), info, 128, channels_last=True)


def channel_maxes(model, loader):
    """Per-channel max of every depthwise conv's input over `loader`."""
    sites = depthwise_inputs(model)
    maxes, hooks = [None] * len(sites), []
    for i, (_, parent, child, _) in enumerate(sites):
        def hook(m, args, out, i=i):
            mx = out.amax((0, 2, 3))
            maxes[i] = mx if maxes[i] is None else torch.maximum(maxes[i], mx)
        hooks.append(parent.get_submodule(child).register_forward_hook(hook))
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    for h in hooks:
        h.remove()
    return maxes


def test_every_depthwise_input_is_found(fashion_mnist_model):
    sites = depthwise_inputs(fashion_mnist_model)
    depthwise = [m for m in fashion_mnist_model.modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1]
    # one per inverted residual block, but the first: at width 0.25 its input (the stem's
    # output) is also its residual sum's, so scaling it would change the sum
    assert fashion_mnist_model.features[1].use_res_connect
    assert len(depthwise) == 17 and [s[3] for s in sites] == depthwise[1:]
    assert all(type(s[1].get_submodule(s[2])) is nn.ReLU6 for s in sites)


def test_the_fp32_function_is_kept_and_every_channel_fills_the_range(
        fashion_mnist, fashion_mnist_model):
    loader = calibration(fashion_mnist)
    with torch_threads(1):
        before = channel_maxes(fashion_mnist_model, loader)
        eq, done = equalize_depthwise_inputs(fashion_mnist_model, loader, None)
        after = channel_maxes(eq, loader)
        x, _ = next(iter(loader))
        with torch.no_grad():
            want, got = fashion_mnist_model(x), eq(x)
    assert len(done) == 16
    # The original is untouched; the copy computes the same logits up to float rounding.
    assert all(type(s[1].get_submodule(s[2])) is nn.ReLU6
               for s in depthwise_inputs(fashion_mnist_model))
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())
    spread_before = []
    for (name, r, a), m0, m1 in zip(done, before, after):
        assert r == float(m0.max())
        live = m0 >= r / MAX_FACTOR
        # every live channel now reaches the same max R (the clamp's bound); before they
        # spread over a range
        assert torch.allclose(m1[live], torch.full_like(m1[live], r), rtol=1e-4)
        spread_before.append(float(m0[live].min() / r))
        assert type(eq.get_submodule(name)) is nn.Hardtanh and eq.get_submodule(name).max_val == r
    assert min(spread_before) < 0.5  # the fixture's channels did differ: the test tests


def test_depthwise_weights_keep_their_integer_codes(fashion_mnist, fashion_mnist_model):
    loader = calibration(fashion_mnist)
    with torch_threads(1):
        eq, done = equalize_depthwise_inputs(fashion_mnist_model, loader, None)
    q0, q1 = quantize_model(fashion_mnist_model, (4, 8)), quantize_model(eq, (4, 8))
    dw0 = [m for m in q0.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    dw1 = [m for m in q1.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(dw0) == len(dw1) == 17 and len(done) == 16
    moved = 0
    for l0, l1, (_, _, a) in zip(dw0[1:], dw1[1:], done):
        assert torch.equal(l0.weight_quant.integers(l0.weight), l1.weight_quant.integers(l1.weight))
        torch.testing.assert_close(l1.weight_quant.scale.view(-1) * a, l0.weight_quant.scale.view(-1),
                                   rtol=1e-5, atol=0)
        moved += int((a > 1.01).sum())
    assert moved > 0


def test_4_bit_inputs_lose_less_once_equalized(fashion_mnist, fashion_mnist_model):
    """The point of it: where a depthwise conv's input channels differ in range (built in:
    `with_narrow_channels`), with 4-bit activations the equalized model's logits stay much
    closer to the FP32 ones (mean squared error over 1,000 real test images)."""
    info, _, _, test = fashion_mnist
    loader, tl = calibration(fashion_mnist), eval_loader(test.head(1000), info)
    model = with_narrow_channels(fashion_mnist_model)
    errors = []
    with torch_threads(1):
        want, _ = predict(model, tl)
        eq, _ = equalize_depthwise_inputs(model, loader, None)
        for source in (model, eq):
            q = quantize_model(source, (8, 4))
            calibrate(q, loader, "mse")
            convert(q)
            got, _ = predict(q, tl)
            errors.append(float(((got - want) ** 2).mean()))
    assert errors[1] < 0.5 * errors[0], errors


def test_equalized_model_exports_reloads_and_runs_in_onnx_runtime(
        fashion_mnist, fashion_mnist_model, tmp_path):
    info, _, _, test = fashion_mnist
    loader, tl = calibration(fashion_mnist), eval_loader(test.head(500), info)
    with torch_threads(1):
        eq, done = equalize_depthwise_inputs(fashion_mnist_model, loader, None)
        q = quantize_model(eq, (4, 4))
        calibrate(q, loader, "mse")
        convert(q)
        want, _ = predict(q, tl)
        path = tmp_path / "m.safetensors"
        export_quantized(q, str(path), META)
        metadata, _ = read_quantized(str(path))
        back = load_quantized(str(path))
        got, _ = predict(back, tl)
    assert torch.equal(got, want)
    clamps = dict(json.loads(metadata["clamps"]))
    assert clamps == {name: r for name, r, _ in done}
    proto, _ = ox.build_onnx(q, SHAPE)
    onnx.checker.check_model(proto, full_check=True)
    # each clamp sits before an unsigned 4-bit quantizer whose grid ends at or under its max:
    # left out, as ReLU6 is there, so the float Clips left are ReLU6s that a float tensor
    # reads (a residual sum, the pooling), and no initializer is left unused
    float_clips = [n for n in proto.graph.node if n.op_type == "Clip"
                   and not n.input[1].endswith("code_lo")]
    assert float_clips and all(n.input[2] == "six" for n in float_clips)
    read = {i for n in proto.graph.node for i in n.input}
    assert all(t.name in read for t in proto.graph.initializer)
    out, _ = rt.predict_onnx(rt.session(proto.SerializeToString(), 1), tl)
    assert agreement(want, out) >= 98.0
    assert np.isfinite(out.numpy()).all()


def test_a_run_with_equalize_records_it_and_exports_its_clamps(tmp_path, small_checkpoint):  # noqa: F811
    res = tmp_path / "res"
    r = sweep_py(["--checkpoint", str(small_checkpoint), "--weight_bits", "4",
                  "--activation_bits", "4", "--equalize", "true", "--results_dir", str(res),
                  "--wandb_mode", "disabled", *QUICK], tmp_path)
    assert r.returncode == 0, r.stderr
    row = pd.read_csv(res / "runs" / "runs.csv").iloc[0]
    assert row.equalize and row.status == "finished" and row.roundtrip_max_abs_diff == 0.0
    assert row.onnx_agreement >= 98.0
    (model,) = (res / "runs" / "models").glob("*.safetensors")
    metadata, _ = read_quantized(str(model))
    assert len(json.loads(metadata["clamps"])) == 16


def test_equalize_takes_true_or_false_only(tmp_path, small_checkpoint):  # noqa: F811
    r = sweep_py(["--checkpoint", str(small_checkpoint), "--equalize", "maybe",
                  "--wandb_mode", "disabled"], tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: --equalize must be true or false, got 'maybe'."]
