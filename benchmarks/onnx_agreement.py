"""Top-1 agreement of ONNX Runtime's int8 model with the PyTorch quantized model, with and
without the 8-bit grids between integer kernels at 8-bit activations.

    python benchmarks/onnx_agreement.py results/fashion-mnist-w0.35-e30/best.pt \
        [--weight_bits 8 4 3] [--activation_bits 8] [--data_dir ./data]

Where a block's inputs are 8-bit, the converted model reads its residual add's two summands
and the last conv's output on 8-bit grids (quant/output_grids.py), and so does the exported
graph, so that ONNX Runtime runs those convs and adds as integer kernels. This quantizes the
checkpoint (mse calibration on 8 batches of training images, nearest rounding: a quick
configuration, not the runs' defaults), then measures it twice, with those grids (model and
file) and without them (float adds in both), and prints each file's agreement with its
PyTorch model and both accuracies on the test images, at one thread. Figures, not tests.
"""

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mobilenet_compression.deploy import onnx_export as ox  # noqa: E402
from mobilenet_compression.deploy import onnx_runtime as rt  # noqa: E402
from mobilenet_compression.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from mobilenet_compression.cpu import cpu_isa  # noqa: E402
from mobilenet_compression.data import BatchLoader, load_dataset  # noqa: E402
from mobilenet_compression.evaluation import accuracy, agreement, predict  # noqa: E402
from mobilenet_compression.quant.calibrate import calibrate
from mobilenet_compression.quant.convert import convert
from mobilenet_compression.quant.output_grids import attach_output_grids
from mobilenet_compression.quant.prepare import quantize_model

CALIB_BATCHES = 8


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="FP32 checkpoint written by train.py")
    p.add_argument("--weight_bits", type=int, nargs="+", default=[8, 4, 3],
                   help="weight bits, one model each (default: 8 4 3)")
    p.add_argument("--activation_bits", type=int, default=8, help="activation bits (default: 8)")
    p.add_argument("--data_dir", default="./data", help="dataset folder (default: ./data)")
    p.add_argument("--images", type=int, default=None, help="test images (default: all)")
    args = p.parse_args()
    torch.set_num_threads(1)
    ckpt = load_checkpoint(args.checkpoint)
    fp32 = model_from_checkpoint(ckpt).eval()
    info, train, _, test = load_dataset(ckpt["dataset"], args.data_dir)
    if args.images:
        test = test.head(args.images)
    calib = BatchLoader(train, info, 128, channels_last=True)
    loader = BatchLoader(test, info, 500)
    shape = (info.in_channels, info.input_size, info.input_size)
    print(f"{args.checkpoint}, {len(test)} test images, cpu_isa {cpu_isa()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        for w in args.weight_bits:
            q = quantize_model(fp32, (w, args.activation_bits))
            calibrate(q, calib, num_batches=CALIB_BATCHES, seed=42, method="mse")
            convert(q)
            for name in ("float adds", "8-bit grids (the runs')"):
                if name != "float adds":
                    attach_output_grids(q, calib, CALIB_BATCHES)
                torch_logits, labels = predict(q, loader)
                ox.export_onnx(q, path, shape)
                onnx_logits, _ = rt.predict_onnx(rt.session(path, 1), loader)
                print(f"W{w}A{args.activation_bits} {name}: agreement "
                      f"{agreement(torch_logits, onnx_logits):.2f}%, PyTorch "
                      f"{accuracy(torch_logits, labels):.2f}%, ONNX Runtime "
                      f"{accuracy(onnx_logits, labels):.2f}%", flush=True)

if __name__ == "__main__":
    main()
