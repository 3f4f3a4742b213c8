"""Prepare: swap every quantized Conv2d / Linear of the FP32 model for its quantized version, under
a precision plan."""

import copy
import operator

import torch
from torch import nn

from .choices import WEIGHT_GRANULARITIES, WEIGHT_METHODS, check_choice
from .precision import check_plan, quantized_layer_names, uniform_plan
from .quantizers import ActQuantizer, WeightQuantizer


class _QuantLayer:
    """Shared by QuantConv2d and QuantLinear: input_quant and weight_quant."""

    def _setup_quant(self, weight_bits, activation_bits, granularity, method):
        self.weight_bits = weight_bits
        self.activation_bits = activation_bits
        self.input_quant = ActQuantizer(activation_bits)
        self.weight_quant = WeightQuantizer(weight_bits, granularity, method, activation_bits)
        self.weight_quant.init_scale(self.weight)

    def quantized_weight(self):
        """The fake-quantized weight (straight-through gradients when autograd is on)."""
        return self.weight_quant(self.weight)

    def add_bias(self):
        """Give the layer a zero bias (bias correction adds to it); returns the bias.
        `bias_added` marks it: QAT holds such biases fixed (quant/qat.py says why)."""
        if self.bias is None:
            out = self.weight.shape[0]
            self.bias = nn.Parameter(torch.zeros(out, device=self.weight.device,
                                                 dtype=self.weight.dtype))
            self.bias_added = True
        return self.bias


class QuantConv2d(_QuantLayer, nn.Conv2d):
    @classmethod
    def from_float(cls, conv, weight_bits, activation_bits, granularity="per_channel",
                   method="minmax"):
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        q.weight = conv.weight
        q.bias = conv.bias
        q.train(conv.training)
        q._setup_quant(weight_bits, activation_bits, granularity, method)
        return q

    def forward(self, x):
        return self._conv_forward(self.input_quant(x), self.quantized_weight(), self.bias)


class QuantLinear(_QuantLayer, nn.Linear):
    @classmethod
    def from_float(cls, linear, weight_bits, activation_bits, granularity="per_channel",
                   method="minmax"):
        q = cls(linear.in_features, linear.out_features, linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype)
        q.weight = linear.weight
        q.bias = linear.bias
        q.train(linear.training)
        q._setup_quant(weight_bits, activation_bits, granularity, method)
        return q

    def forward(self, x):
        return nn.functional.linear(self.input_quant(x), self.quantized_weight(), self.bias)


QUANT_LAYERS = (QuantConv2d, QuantLinear)



def quant_layers(qmodel):
    """(name, layer) of every QuantConv2d / QuantLinear in a quantized model."""
    return [(n, m) for n, m in qmodel.named_modules() if isinstance(m, QUANT_LAYERS)]


# Modules whose output is a new tensor (never a view of their input), so a single consumer
# may overwrite it.
_FRESH_OUTPUT = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardtanh,
                 nn.Hardswish, nn.SiLU)


def exclusive_input_layers(model, names):
    """The layers in `names` whose input is a fresh module output that nothing else reads
    (found on a torch.fx trace; empty if the model does not trace). Their activation
    quantizers may work in place at inference. In MobileNetV2 these are the depthwise and
    projection convs (inputs after ReLU6) and the convs reading a block output that no
    residual add reads again."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # any model torch.fx cannot trace just keeps the out-of-place path
        return set()
    modules = dict(model.named_modules())

    def exclusive(src):
        while isinstance(src, torch.fx.Node) and len(src.users) == 1:
            if src.op == "call_function":  # the residual sum x + f(x) is a new tensor
                return src.target in (operator.add, torch.add)
            if src.op != "call_module":
                return False
            producer = modules.get(src.target)
            if not isinstance(producer, _FRESH_OUTPUT):
                return False
            if not getattr(producer, "inplace", False):
                return True
            # ReLU6(inplace=True) (torchvision's choice) returns its input: that tensor must
            # be exclusive too.
            src = src.args[0] if src.args else None
        return False

    return {node.target for node in graph.nodes
            if node.op == "call_module" and node.target in names and node.args
            and exclusive(node.args[0])}


def _normalise_plan(model, plan):
    if isinstance(plan, (tuple, list)) and len(plan) == 2:
        plan = uniform_plan(model, *plan)
    if not isinstance(plan, dict):
        raise TypeError("plan must be a dict layer name -> (weight_bits, activation_bits) "
                        "or one (weight_bits, activation_bits) pair")
    return check_plan(model, plan)


def _swap(model, name, new):
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def quantize_model(model, plan, weight_granularity="per_channel", weight_method="minmax"):
    """Return a quantized deep copy of `model` (the FP32 model is untouched).

    plan: dict layer name -> (weight_bits, activation_bits), or one (weight_bits,
    activation_bits) pair for every quantized layer; layers the dict leaves out stay FP32
    (but are still wrapped). Weight scales are set here; activation scales need
    `calibrate` before the model can run (unless all activation bits are FP32). A torch.fx
    trace of `model` marks the layers whose input may be fake-quantized in place.
    """
    check_choice(weight_granularity, WEIGHT_GRANULARITIES, "--weight_granularity")
    check_choice(weight_method, WEIGHT_METHODS, "--weight_method")
    plan = _normalise_plan(model, plan)
    names = quantized_layer_names(model)
    exclusive = exclusive_input_layers(model, set(names))
    qmodel = copy.deepcopy(model)
    for name in names:
        layer = qmodel.get_submodule(name)
        wb, ab = plan.get(name, (32, 32))
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        qlayer = cls.from_float(layer, wb, ab, weight_granularity, weight_method)
        qlayer.input_quant.inplace = name in exclusive
        _swap(qmodel, name, qlayer)
    return qmodel


def precision_plan(qmodel):
    """The plan a quantized model was built with: layer name -> (weight_bits, activation_bits)."""
    return {n: (m.weight_bits, m.activation_bits) for n, m in quant_layers(qmodel)}


def act_quantizers(qmodel):
    return [m.input_quant for _, m in quant_layers(qmodel) if m.input_quant.enabled]


class activations_fp32:
    """Context manager: run a quantized model with its activation quantizers off (weights
    stay quantized), e.g. to count activation elements before calibration."""

    def __init__(self, qmodel):
        self.quantizers = act_quantizers(qmodel)

    def __enter__(self):
        self.modes = [q.mode for q in self.quantizers]
        for q in self.quantizers:
            q.mode = "off"

    def __exit__(self, *exc):
        for q, mode in zip(self.quantizers, self.modes):
            q.mode = mode
