"""Weight rounding that minimises each layer's output error: GPTQ (Frantar et al. 2023,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
Algorithm 1; the one-shot form of Optimal Brain Quantization).

Rounding every weight to its nearest grid point minimises the error of each weight alone.
What matters is the layer's output: with X the layer's (quantized) inputs on calibration
images, GPTQ quantizes the columns of W (one input feature at a time, in decreasing order of
the Hessian's diagonal, "act order") and after each column moves the not yet quantized ones
to cancel the output error it made, using the inverse of H = X X^T (plus 1% of its mean
diagonal, GPTQ's damping). The scales stay those `quantize_model` chose (minmax or mse per
output channel); only which grid point each weight takes changes.

Here a conv is a matrix product over its unfolded input: H is (C_in k k)^2 for a dense conv,
and one 9 x 9 matrix per channel for a depthwise one (each output channel reads its own
input channel), so the column updates run per group with that group's H. Layers are done in
network order and each reads its input from the quantized network with every earlier layer
already rounded (the images are carried block by block, as `bias_correct` does), so later
layers also absorb the earlier ones' error.

The GPTQ packages on PyPI (auto-gptq, gptqmodel) quantize the Linear layers of language
models in their own formats; they do not take convolutions or this package's quantizers, so
the algorithm's few lines are written here. Call after `calibrate` (the inputs are quantized
as in the final model) and before `bias_correct`.
"""

import torch
from torch import nn

from .calibrate import training_batches
from .prepare import QUANT_LAYERS

DAMP = 0.01  # GPTQ's default: 1% of the mean diagonal of H added to it
# Calibration images the layer inputs are collected on. On validation images (BC off, two
# checkpoints, W{4,3} x A{8,4}) 128, 256 and 512 rounded as well as each other (differences
# of -0.55 to +0.9 point, no sign favouring more images), and 128 takes the least time.
GPTQ_IMAGES = 128
# Layers with more weight bits keep nearest rounding: at 8 bits GPTQ moved no cell of the
# 93.65% checkpoint's grid at 4 to 8-bit activations by more than 0.03 point (README), and
# a sweep's W8 runs would pay its time for nothing.
GPTQ_MAX_BITS = 7


def _pointwise(layer):
    """A Linear layer or a 1x1 conv with stride 1 and no padding: its rows are its inputs."""
    return isinstance(layer, nn.Linear) or (
        layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding == (0, 0))


def _im2col(layer, x):
    """A conv's unfolded input, (N, groups, d, positions): what each group's W_g multiplies."""
    u = nn.functional.unfold(x, layer.kernel_size, layer.dilation, layer.padding,
                             layer.stride)  # (N, C_in k k, L), channel-major
    n, d, length = u.shape
    return u.reshape(n, layer.groups, d // layer.groups, length)


def _unfold(layer, x):
    """The layer's input as (groups, rows, features): each row one output position's input,
    so that the layer's output per group is W_g @ row."""
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    g = layer.groups
    if _pointwise(layer):
        cols = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # (N H W, C_in)
        return cols.reshape(-1, g, x.shape[1] // g).transpose(0, 1)
    u = _im2col(layer, x)
    return u.permute(1, 0, 3, 2).reshape(g, -1, u.shape[2])


def add_hessian(h, layer, x):
    """h + sum over rows of x x^T per group ((groups, d, d), float64). Each batch's sum is
    taken in float32 (BLAS; over at most a few hundred thousand rows) and added in float64.
    Pointwise convs and Linear layers multiply the rows (a view of a channels-last input);
    other convs multiply each image's unfolded (groups, d, positions) block by its transpose
    and add over images, which skips `_unfold`'s copy (40% faster for depthwise convs)."""
    x = x.float()
    if _pointwise(layer):
        cols = _unfold(layer, x)
        part = torch.bmm(cols.transpose(1, 2), cols)
    else:
        u = _im2col(layer, x)
        part = torch.matmul(u, u.transpose(-1, -2)).sum(0)
    part = part.double()
    return part if h is None else h + part


@torch.no_grad()
def gptq_weight(weight, scale, qmin, qmax, hessian, damp=DAMP):
    """GPTQ-rounded copy of `weight` (out, ...) on the grid scale * {qmin..qmax}, per output
    channel (scale: (out,) or (1,)). hessian: (groups, d, d) with d = weight[0].numel() and
    out divisible by groups; output channel r belongs to group r // (out / groups)."""
    out = weight.shape[0]
    g, d, _ = hessian.shape
    w = weight.detach().reshape(g, out // g, d).double().clone()
    s = scale.detach().double().reshape(-1).expand(out).reshape(g, out // g, 1)
    h = hessian.clone()
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag == 0  # an input that is always 0: its weights never matter
    diag[dead] = 1.0
    w.masked_fill_(dead[:, None, :], 0.0)
    diag += damp * diag.mean(1, keepdim=True)
    perm = torch.argsort(diag, dim=1, descending=True)  # act order
    w = torch.gather(w, 2, perm[:, None, :].expand_as(w))
    h = torch.gather(torch.gather(h, 1, perm[:, :, None].expand_as(h)), 2,
                     perm[:, None, :].expand_as(h))
    # The upper Cholesky factor of H^-1: row i holds what GPTQ's column-i update needs.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)),
                                 upper=True)
    q = torch.empty_like(w)
    for i in range(d):
        col = w[:, :, i:i + 1]
        qi = torch.clamp(torch.round(col / s), qmin, qmax) * s
        q[:, :, i:i + 1] = qi
        err = (col - qi) / hinv[:, i, i].reshape(g, 1, 1)
        w[:, :, i + 1:] -= err * hinv[:, i:i + 1, i + 1:]
    q = torch.empty_like(q).scatter_(2, perm[:, None, :].expand_as(q), q)
    return q.reshape(weight.shape).to(weight.dtype)


class _Enough(Exception):
    """Raised by `_block_hessian`'s hook: the rest of the block is not needed."""


def _block_hessian(block, layer, xs):
    """H of `layer`'s quantized inputs when `block` runs on each tensor of xs (each pass
    stops at `layer`)."""
    h = [None]

    def hook(module, args, out):
        h[0] = add_hessian(h[0], layer, out)
        raise _Enough

    handle = layer.input_quant.register_forward_hook(hook)
    try:
        for x in xs:
            try:
                block(x)
            except _Enough:
                pass
    finally:
        handle.remove()
    return h[0]


def _rounds(module):
    """Whether GPTQ rounds this module: a quantized layer with 2 to GPTQ_MAX_BITS weight bits."""
    return (isinstance(module, QUANT_LAYERS) and module.weight_quant.enabled
            and module.weight_quant.bits <= GPTQ_MAX_BITS)


@torch.no_grad()
def gptq(qmodel, loader, images=GPTQ_IMAGES):
    """Round the weights of every quantized layer of `qmodel` with 2 to GPTQ_MAX_BITS weight
    bits by GPTQ on the first `images` calibration images; layers in network order
    (`qmodel.features`, block by block), each on its inputs in the already-rounded network.
    Reads TRAINING images only (the loader's split is checked). Each rounded weight is
    written on its grid, so the weight quantizer leaves it as it is. Returns qmodel.

    Layers whose input quantizer works in place (quantize_model's torch.fx rule) quantize
    the carried tensors themselves when they are a block's first layer; fake quantization
    is idempotent, so the next block reads the same values either way."""
    training_batches(loader, None, "GPTQ rounding")
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ValueError(f"images must be a positive integer, got {images!r}")
    if not any(_rounds(m) for m in qmodel.modules()):
        return qmodel  # nothing to round: no image needs to pass through the network
    xs, seen = [], 0
    for x, _ in loader:
        xs.append(x[:images - seen])
        seen += len(xs[-1])
        if seen >= images:
            break
    was_training = qmodel.training
    qmodel.eval()
    try:
        for block in qmodel.features:
            for layer in [m for m in block.modules() if _rounds(m)]:
                wq = layer.weight_quant
                h = _block_hessian(block, layer, xs)
                rounded = gptq_weight(layer.weight, wq.scale, wq.qmin, wq.qmax, h)
                # through the quantizer's own arithmetic, so that it is a fixed point
                layer.weight.copy_(wq(rounded, impl="tensor"))
            xs = [block(x) for x in xs]
    finally:
        qmodel.train(was_training)
    return qmodel
