"""The 8-bit grids an integer engine needs between its kernels, in the PyTorch model too.

The quantized layers round their inputs only. An integer engine (ONNX Runtime's QLinearConv,
QLinearAdd) also needs the tensors between two integer kernels on a grid: where a block's
layers read 8-bit inputs, the exported file (deploy/onnx_export.py) reads

- each residual add's two summands on 8-bit grids: the block input on the grid its first
  conv reads it on, the projection conv's output (after its BatchNorm) on a new signed grid
  (absmax / 127 over the calibration images, codes -128..127);
- the last conv's output (after its ReLU6) on a new unsigned grid (absmax / 255, codes
  0..255), which the pooling reads.

`attach_output_grids` puts the same roundings in the converted PyTorch model, so that the
model a run measures (`quant_acc`) computes what the file holds: an `OutputGrid` module after
the projection's BatchNorm and after the last ReLU6, and each such residual block made a
`GridResidual`, whose add reads its input through its first conv's input quantizer. Below
8-bit inputs nothing is added: the engine has no narrower integer add, and the file keeps
those sums in float as the model does. The grids are part of the exported safetensors file
(`output_grid_table`, `restore_output_grids`)."""

import numpy as np
import torch
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual

from .calibrate import training_batches
from .prepare import QUANT_LAYERS

GRID_NAME = "out_grid"


class OutputGrid(nn.Module):
    """A fixed 8-bit grid: round(x / scale) saturated to -128..127 (signed) or 0..255, times
    scale; ONNX QuantizeLinear's arithmetic (it divides by the scale and rounds half to even,
    as torch.round does)."""

    def __init__(self, scale, signed):
        super().__init__()
        # float32, the value the ONNX file stores, so the two divide by the same number
        self.scale, self.signed = float(np.float32(scale)), bool(signed)

    def forward(self, x):
        lo, hi = (-128, 127) if self.signed else (0, 255)
        return torch.clamp(torch.round(x / self.scale), lo, hi) * self.scale

    def extra_repr(self):
        return f"scale={self.scale:.6g}, {'signed' if self.signed else 'unsigned'}"


def first_layer(module):
    """The first quantized layer inside `module` (the one that reads its input)."""
    return next((m for m in module.modules() if isinstance(m, QUANT_LAYERS)), None)


class GridResidual(InvertedResidual):
    """An inverted residual block whose add reads the block input on the grid its first conv
    reads it on (that conv's input quantizer), as the integer engine's add does."""

    def forward(self, x):
        return first_layer(self.conv).input_quant(x) + self.conv(x)


def _reads_8_bits(module):
    layer = first_layer(module)
    return (layer is not None and layer.input_quant.enabled and layer.input_quant.bits == 8)


def grid_targets(qmodel):
    """{name of the module whose output gets a grid: signed} for `qmodel`: the last conv of
    each residual block whose first conv reads 8-bit inputs (`features.<i>.conv`), and the
    last block (`features.<n-1>`) where its conv reads 8-bit inputs."""
    targets = {}
    for name, m in qmodel.named_modules():
        if isinstance(m, InvertedResidual) and m.use_res_connect and _reads_8_bits(m):
            targets[f"{name}.conv"] = True
    last = f"features.{len(qmodel.features) - 1}"
    if _reads_8_bits(qmodel.features[-1]):
        targets[last] = False
    return targets


def install(qmodel, name, scale, signed):
    """Put an OutputGrid at the end of module `name` (a Sequential); in a residual block,
    make the block a GridResidual."""
    try:
        seq = qmodel.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the network has no module {name}") from None
    if not isinstance(seq, nn.Sequential) or hasattr(seq, GRID_NAME):
        raise ValueError(f"{name} cannot take an output grid")
    seq.add_module(GRID_NAME, OutputGrid(scale, signed))
    parent_name, _, child = name.rpartition(".")
    parent = qmodel.get_submodule(parent_name) if parent_name else qmodel
    if child == "conv" and isinstance(parent, InvertedResidual):
        if not parent.use_res_connect:
            raise ValueError(f"{parent_name} has no residual add")
        parent.__class__ = GridResidual


@torch.no_grad()
def attach_output_grids(qmodel, loader, num_batches=None):
    """Measure and install the grids of `grid_targets` on a converted model, from `loader`'s
    TRAINING images (absmax of each target's output over `num_batches` batches, all measured
    before any is installed). Returns {name: (scale, signed)}."""
    targets = grid_targets(qmodel)
    if not targets:
        return {}
    total = training_batches(loader, num_batches, "the output grids' calibration")
    absmax, hooks = dict.fromkeys(targets, 0.0), []
    for name in targets:
        def hook(mod, args, out, key=name):
            absmax[key] = max(absmax[key], float(out.abs().max()))
        hooks.append(qmodel.get_submodule(name).register_forward_hook(hook))
    was_training = qmodel.training
    try:
        qmodel.eval()
        for i, (x, _) in enumerate(loader):
            if i >= total:
                break
            qmodel(x)
    finally:
        for h in hooks:
            h.remove()
        qmodel.train(was_training)
    grids = {name: (max(absmax[name], 1e-12) / (127 if signed else 255), signed)
             for name, signed in targets.items()}
    for name, (scale, signed) in grids.items():
        install(qmodel, name, scale, signed)
    return grids


def output_grid_table(qmodel):
    """[[name, scale, signed], ...] of the grids in `qmodel`, for the exported file."""
    return [[n.rpartition(".")[0], m.scale, m.signed] for n, m in qmodel.named_modules()
            if isinstance(m, OutputGrid)]


def restore_output_grids(qmodel, table):
    """Put the grids of `output_grid_table` back into a freshly built quantized model."""
    for name, scale, signed in table:
        install(qmodel, name, float(scale), bool(signed))
    return qmodel
