"""GPTQ weight rounding: the algorithm on known matrices, the conv unfolding it relies on, and
the whole-model pass on the small MobileNetV2 trained on the real Fashion-MNIST."""

import copy

import pytest
import torch
from torch import nn

from mobilenet_compression.data import BatchLoader
from mobilenet_compression.errors import UserError
from mobilenet_compression.quant.calibrate import calibrate
from mobilenet_compression.quant.fake_quant import fake_quantize
from mobilenet_compression.quant.precision import signed_range
from mobilenet_compression.quant.prepare import (
    precision_plan,
    quant_layers,
    quantize_model,
)
from mobilenet_compression.quant.rounding import _unfold, add_hessian, gptq, gptq_weight


def _grid(weight, bits):
    qmin, qmax = signed_range(bits, narrow=True)
    scale = weight.abs().amax(1) / qmax
    return scale, qmin, qmax


def _output_error(w, q, x):
    return float(((x @ (w - q).T) ** 2).sum())


def test_gptq_cuts_the_output_error_of_nearest_rounding_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    # Inputs with correlated features, as a layer's inputs are: nearest rounding ignores
    # the correlation, GPTQ's updates use it to cancel errors.
    x = torch.randn(4000, 8, generator=g) @ torch.randn(8, 48, generator=g)
    w = torch.randn(16, 48, generator=g)
    scale, qmin, qmax = _grid(w, 3)
    h = (x.T.double() @ x.double())[None]
    q = gptq_weight(w, scale, qmin, qmax, h)
    nearest = fake_quantize(w, scale, qmin, qmax, axis=0, impl="tensor")
    codes = q / scale[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-4)  # on the grid ...
    assert codes.min() >= qmin and codes.max() <= qmax  # ... and in range
    assert not torch.equal(q, nearest)
    assert _output_error(w, q, x) < 0.2 * _output_error(w, nearest, x)  # 0.03-0.06 measured


def test_uncorrelated_inputs_give_nearest_rounding_and_dead_inputs_get_zero_weights():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 5, generator=g)
    scale, qmin, qmax = _grid(w, 4)
    nearest = fake_quantize(w, scale, qmin, qmax, axis=0, impl="tensor")
    # H diagonal: no error can be moved to another input, so GPTQ is nearest rounding.
    h = torch.diag(torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0], dtype=torch.float64))[None]
    assert torch.allclose(gptq_weight(w, scale, qmin, qmax, h), nearest, atol=1e-6)
    h[0, 2, 2] = 0.0  # input 2 is always 0
    q = gptq_weight(w, scale, qmin, qmax, h)
    assert torch.all(q[:, 2] == 0)
    keep = [0, 1, 3, 4]
    assert torch.allclose(q[:, keep], nearest[:, keep], atol=1e-6)


def test_groups_are_rounded_each_with_its_own_hessian():
    # A depthwise conv: output channel c reads only input channel c, so its 9 weights are
    # rounded against channel c's own 9 x 9 H, the same as rounding that row alone.
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 1, 3, 3, generator=g)
    scale, qmin, qmax = _grid(w.reshape(4, 9), 3)
    xs = [torch.randn(500, 3, generator=g) @ torch.randn(3, 9, generator=g) for _ in range(4)]
    h = torch.stack([x.T.double() @ x.double() for x in xs])
    together = gptq_weight(w, scale, qmin, qmax, h)
    for c in range(4):
        alone = gptq_weight(w[c:c + 1], scale[c:c + 1], qmin, qmax, h[c:c + 1])
        assert torch.allclose(together[c:c + 1], alone, atol=1e-6), c


@pytest.mark.parametrize("conv", [
    nn.Conv2d(6, 5, 1, bias=False),                                  # pointwise
    nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=False),   # depthwise, stride 2
    nn.Conv2d(6, 4, 3, padding=1, bias=False),                       # dense 3x3
    nn.Conv2d(6, 4, 3, padding=1, groups=2, bias=False),             # grouped
])
def test_unfolded_rows_times_the_weight_give_the_convs_output(conv):
    # The rows GPTQ's H is built from must be exactly what each output channel multiplies:
    # per group, output = W_g @ row for every output position.
    torch.manual_seed(3)
    x = torch.randn(2, 6, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = conv(x)
        rows = _unfold(conv, x)  # (groups, N * positions, d)
        groups = conv.groups
        w = conv.weight.reshape(groups, conv.out_channels // groups, -1)
        out = torch.bmm(rows, w.transpose(1, 2))  # (groups, N * positions, out / groups)
        n, c, hh, ww = y.shape
        expected = y.reshape(n, groups, c // groups, hh * ww).permute(1, 0, 3, 2).reshape(
            groups, n * hh * ww, c // groups)
    assert torch.allclose(out, expected, atol=1e-5)
    h = add_hessian(add_hessian(None, conv, x), conv, x)
    assert h.shape == (groups, w.shape[2], w.shape[2]) and h.dtype == torch.float64
    assert torch.allclose(h, 2 * torch.bmm(rows.transpose(1, 2), rows).double(), rtol=1e-4)


def _logit_error(qmodel, fp32, x):
    with torch.inference_mode():
        return float(((qmodel(x) - fp32(x)) ** 2).mean())


def test_gptq_on_the_model_reads_training_images_keeps_weights_on_grid_and_helps(
        fashion_mnist_model, fashion_mnist):
    info, train, val, test = fashion_mnist
    qmodel = quantize_model(fashion_mnist_model, (3, 8))
    loader = BatchLoader(train.head(512), info, 128)
    calibrate(qmodel, loader, "minmax")
    for split in (val, test):
        with pytest.raises(UserError, match=f"got the '{split.name}' split"):
            gptq(copy.deepcopy(qmodel), BatchLoader(split, info, 128))
    rounded = gptq(copy.deepcopy(qmodel), loader, images=256)
    changed = 0
    for (name, before), (_, after) in zip(quant_layers(qmodel), quant_layers(rounded)):
        wq = after.weight_quant
        assert torch.equal(wq.scale, before.weight_quant.scale), name  # scales untouched
        codes = after.weight / wq.scale.view(-1, *[1] * (after.weight.dim() - 1))
        assert torch.allclose(codes, codes.round(), atol=1e-3), name
        assert torch.equal(wq(after.weight, impl="tensor"), after.weight.detach()), name
        changed += not torch.equal(after.weight, before.weight_quant(before.weight))
    assert changed == len(quant_layers(qmodel))
    # Fewer errors in the logits, on images neither pass has seen (held-out validation).
    x = torch.cat([x for x, _ in BatchLoader(val.head(512), info, 512)])
    assert _logit_error(rounded, fashion_mnist_model, x) < _logit_error(
        qmodel, fashion_mnist_model, x)
    # 8-bit weights keep nearest rounding (GPTQ_MAX_BITS).
    w8 = calibrate(quantize_model(fashion_mnist_model, {**precision_plan(qmodel),
                                                        "features.1.conv.1": (8, 8)}),
                   loader, "minmax")
    w8_rounded = gptq(copy.deepcopy(w8), loader, images=256)
    layer, kept = w8.get_submodule("features.1.conv.1"), w8_rounded.get_submodule(
        "features.1.conv.1")
    assert torch.equal(kept.weight, layer.weight)
    assert not torch.equal(w8_rounded.get_submodule("features.2.conv.0.0").weight,
                           w8.get_submodule("features.2.conv.0.0").weight)
