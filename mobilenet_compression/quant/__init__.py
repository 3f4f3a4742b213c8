"""Post-training quantization by swapping layers (the Brevitas idea, without its machinery).

A quantized model is the FP32 model with every Conv2d and Linear except the stem conv
(`features.0.0`) and the classifier (`classifier.1`) replaced by a `QuantConv2d` /
`QuantLinear`. Those subclass the torch layers, so the state dict keeps its names and its
FP32 weights, and BatchNorm stays a separate, unfolded FP32 layer. Each carries two small
quantizer modules:

- `input_quant` (`ActQuantizer`) fake-quantizes the layer's INPUT activation, per tensor,
  with zero point 0: unsigned codes [0, 2^b-1] when calibration saw no negative value (the
  input after ReLU6: depthwise and projection convs), signed codes [-2^(b-1), 2^(b-1)-1]
  otherwise (MobileNetV2's projection conv has no activation, so block inputs, i.e. the
  expansion convs' inputs and the last 1x1 conv's input, are signed). The clip value c is
  found by calibration on training images (`calibrate`); scale = c / (2^b-1) unsigned,
  c / (2^(b-1)-1) signed, so +c is exactly representable (Brevitas' convention).
- `weight_quant` (`WeightQuantizer`) fake-quantizes the weight: symmetric, per output
  channel (or per tensor, to reproduce the seeds), NARROW range: integers in
  [-(2^(b-1)-1), 2^(b-1)-1], i.e. 2^b-1 levels per channel (ternary at 2 bits). Narrow is
  chosen because it is symmetric (the full range's extra level -2^(b-1) would bias every
  channel towards the negative side and, with scale = absmax / 2^(b-1), clip its largest
  positive weights) and is what int8 engines (TensorRT, ONNX Runtime, XNNPACK) expect of
  weights; on the Fashion-MNIST test model the full range gave 20% at W3A8, narrow 69%.
  The scale is absmax / (2^(b-1)-1) (`minmax`, the default) or (r*absmax) / (2^(b-1)-1)
  with r in 0.01..1 minimising the channel's squared weight error (`mse`). MSE clipping
  cuts the weight error but shrinks each channel's output, which the frozen FP32 BatchNorm
  after it no longer renormalises; on the test model it lost to minmax at 3-4 bits.

Bits are integers in 2..8; 16 and 32 mean "leave this tensor FP32" (rules in quant/precision.py).
Both quantizers go through one function, `fake_quantize`: torch's fake-quantize ops when a
gradient is needed (straight-through), else a pure-tensor round/clamp path that gives the
same numbers bit for bit (tested) and is faster at inference. For quantization-aware
training the scales become learnable (LSQ, Esser et al. 2020): torch's
`_fake_quantize_learnable_per_{channel,tensor}_affine` ops, with LSQ's gradient scale.

The flow, a file a step, in the order recipe.py (and run.py after it) runs them:
  prepare.py          `quantize_model`: swap the layers, set weight scales;
  calibrate.py        `calibrate`: activation ranges from training images;
  rounding.py         `gptq` (optional, `--weight_rounding gptq`): each weight's grid point
                      chosen to cut its layer's output error (GPTQ);
  clip_search.py      (at 3 bits and fewer) clips moved by the network's output;
  bias_correction.py  `bias_correct` (optional): empirical bias correction;
  qat.py              `train_qat` (optional): fine-tune weights and scales;
  convert.py          `convert`: freeze: scales fixed, each weight replaced by its quantized
                      value (codes x scale), so the model is exactly what the exported file
                      holds.
equalize.py (before calibration), quantizers.py and fake_quant.py (what every step uses),
precision.py (the bit rules) and divergence.py (the KL the clip search and the sensitivity
table share) serve them.

There is no cache of fake-quantized weights: a cache keyed on storage pointers could go
stale when memory was reused, and re-quantizing the weights costs little next to the convs
(benchmarks/quantized_eval.py). Where a torch.fx trace shows a layer is the only reader of a
freshly computed input (the ReLU6 outputs feeding depthwise and projection convs), the
activation is fake-quantized in place at inference instead of into a new tensor.
"""
