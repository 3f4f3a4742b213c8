"""Quantized against FP32 evaluation throughput, in the same process, on the same images.

    python benchmarks/quantized_eval.py checkpoints/best.pt [--weight_bits 8 --activation_bits 8]

Evaluates the FP32 checkpoint and its fake-quantized copy (calibrated on training images,
then converted: weights frozen at their quantized values, re-quantized at every forward) alternately, several rounds, and prints images/s of each and
their ratio (median over rounds). Figures, not tests.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mobilenet_compression.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from mobilenet_compression.data import BatchLoader, load_dataset  # noqa: E402
from mobilenet_compression.evaluation import eval_loader, evaluate  # noqa: E402
from mobilenet_compression.quant.calibrate import calibrate
from mobilenet_compression.quant.convert import convert
from mobilenet_compression.quant.prepare import quantize_model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="FP32 checkpoint written by train.py")
    p.add_argument("--weight_bits", type=int, default=8, help="weight bits")
    p.add_argument("--activation_bits", type=int, default=8, help="activation bits")
    p.add_argument("--images", type=int, default=4000, help="test images per evaluation")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    args = p.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    fp32 = model_from_checkpoint(ckpt, args.checkpoint)
    info, train, _, test = load_dataset(ckpt["dataset"], ckpt["args"].get("data_dir", "./data"))
    loader = eval_loader(test.head(args.images), info)
    qmodel = quantize_model(fp32, (args.weight_bits, args.activation_bits))
    calibrate(qmodel, BatchLoader(train.head(1024), info, 128, channels_last=True), "minmax", 8)
    convert(qmodel)
    evaluate(fp32, loader), evaluate(qmodel, loader)  # warm-up
    speeds = {"fp32": [], "quant": []}
    for _ in range(args.rounds):
        for name, model in (("fp32", fp32), ("quant", qmodel)):
            t0 = time.perf_counter()
            evaluate(model, loader)
            speeds[name].append(len(loader.split) / (time.perf_counter() - t0))
    f, q = statistics.median(speeds["fp32"]), statistics.median(speeds["quant"])
    print(f"{ckpt['dataset']}, width {ckpt['width_multiplier']}, {torch.get_num_threads()} "
          f"threads, {args.images} images, batch {loader.batch_size}: FP32 {f:.0f} images/s, "
          f"W{args.weight_bits}A{args.activation_bits} {q:.0f} images/s, ratio {q / f:.2f}")


if __name__ == "__main__":
    main()
