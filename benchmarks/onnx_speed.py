"""Images/s of the quantized model in ONNX Runtime against FP32, side by side in one process.

    python benchmarks/onnx_speed.py [--checkpoint CKPT | --width 1.0] [--data_dir ./data]
        [--weight_bits 8 --activation_bits 8] [--threads 2] [--profile]

Times, on the same batch of real Fashion-MNIST test images (batch 256, median of --repeats):
PyTorch eager FP32 (what a torch-engine sweep evaluates with, fake quantization off), ONNX
Runtime FP32 (BatchNorm folded), ONNX Runtime running this package's QDQ export (our
scales), and ONNX Runtime running its own `quantize_static` QDQ model of the same FP32 model
(its scales, every tensor quantized), with and without its `reduce_range` (7-bit weights).
Without --checkpoint the network is randomly initialised at --width (speed does not depend
on the weights); calibration reads training images either way. --profile adds ONNX Runtime's profiler's
time per operator type for our export. Figures, not tests.
"""

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mobilenet_compression.deploy import onnx_export as ox
from mobilenet_compression.deploy import onnx_runtime as rt
from mobilenet_compression.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from mobilenet_compression.cpu import cpu_isa  # noqa: E402
from mobilenet_compression.data import BatchLoader, load_dataset  # noqa: E402
from mobilenet_compression.model import build_model  # noqa: E402
from mobilenet_compression.quant.calibrate import calibrate
from mobilenet_compression.quant.convert import convert
from mobilenet_compression.quant.output_grids import attach_output_grids
from mobilenet_compression.quant.prepare import quantize_model


def torch_img_s(model, batch, repeats):
    x = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
    model.to(memory_format=torch.channels_last).eval()
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return len(batch) / statistics.median(times)


def ort_static(fp32_proto_bytes, calib_images, path, reduce_range=False):
    """ONNX Runtime's own static QDQ quantization (per-channel int8 weights, uint8
    activations, its MinMax calibration). reduce_range=True puts the weights on 7 bits, ONNX
    Runtime's advice for x86 CPUs without VNNI, whose u8 x s8 kernels add pairs of products
    in int16."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{ox.INPUT: calib_images[i:i + 128]}
                                 for i in range(0, len(calib_images), 128)])

        def get_next(self):
            return next(self.batches, None)

    src = path + ".fp32.onnx"
    with open(src, "wb") as f:
        f.write(fp32_proto_bytes)
    quantize_static(src, path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    reduce_range=reduce_range)
    return path


def profile(path, batch, threads, prefix):
    sess = rt.session(path, threads, profile_prefix=prefix)
    for _ in range(3):
        sess.run([ox.OUTPUT], {ox.INPUT: batch})
    trace = json.load(open(sess.end_profiling()))
    by_op = collections.Counter()
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"] / 3e3  # ms per run
    total = sum(by_op.values())
    print(f"ONNX Runtime profile of our export, batch {len(batch)}, ms per batch by op type:")
    for op, ms in by_op.most_common():
        print(f"  {op:22s} {ms:8.1f} ms  {100 * ms / total:5.1f}%")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="trained checkpoint (default: random weights)")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier without "
                   "--checkpoint (default: %(default)s)")
    p.add_argument("--data_dir", default="./data", help="Fashion-MNIST folder")
    p.add_argument("--weight_bits", type=int, default=8)
    p.add_argument("--activation_bits", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="threads for every engine")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7, help="timed passes per engine")
    p.add_argument("--profile", action="store_true", help="ONNX Runtime profile by op")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info, train, _, test = load_dataset("fashion-mnist", args.data_dir)
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        fp32 = model_from_checkpoint(ckpt, args.checkpoint)
    else:
        torch.manual_seed(0)
        fp32 = build_model("cifar", 10, args.width, info.in_channels)
    fp32.eval()
    calib = BatchLoader(train.head(1024), info, 128, channels_last=True)
    qmodel = quantize_model(fp32, (args.weight_bits, args.activation_bits))
    calibrate(qmodel, calib, "mse", 8)
    convert(qmodel)
    attach_output_grids(qmodel, calib)
    batch = rt.to_numpy(next(iter(BatchLoader(test.head(args.batch_size), info,
                                            args.batch_size)))[0])
    calib_images = np.concatenate([rt.to_numpy(x) for x, _ in calib])
    shape = (info.in_channels, info.input_size, info.input_size)
    with tempfile.TemporaryDirectory() as tmp:
        ours = os.path.join(tmp, "ours.onnx")
        ox.export_onnx(qmodel, ours, shape)
        fp32_bytes = ox.build_onnx(fp32, shape)[0].SerializeToString()
        theirs = ort_static(fp32_bytes, calib_images, os.path.join(tmp, "ort.onnx"))
        theirs_7 = ort_static(fp32_bytes, calib_images, os.path.join(tmp, "ort7.onnx"),
                              reduce_range=True)
        sessions = {"ONNX Runtime FP32": rt.session(fp32_bytes, args.threads),
                    f"ONNX Runtime W{args.weight_bits}A{args.activation_bits} (ours)":
                        rt.session(ours, args.threads),
                    "ONNX Runtime quantize_static W8A8": rt.session(theirs, args.threads),
                    "ONNX Runtime quantize_static W8A8 reduce_range":
                        rt.session(theirs_7, args.threads)}
        # The ONNX Runtime sessions run in turn, one pass each per round (paired_throughput),
        # so a change in the machine's speed falls on all alike; the ratios are pass against
        # pass. PyTorch is timed between those blocks, its ratio from the medians.
        speeds = {"PyTorch eager FP32": [], **{k: [] for k in sessions}}
        ratios = {k: [] for k in sessions}
        for _ in range(3):
            speeds["PyTorch eager FP32"].append(torch_img_s(fp32, batch, args.repeats))
            ort_speeds, ort_ratios = rt.paired_throughput(list(sessions.values()), batch,
                                                          args.batch_size, args.repeats)
            for name, v, r in zip(sessions, ort_speeds, ort_ratios):
                speeds[name].append(v)
                ratios[name].append(r)
        base = statistics.median(speeds["ONNX Runtime FP32"])
        width = (f"{ckpt['width_multiplier']:g} ({args.checkpoint})" if args.checkpoint
                 else f"{args.width:g} (random weights)")
        print(f"CPU int8 instructions (cpu_isa): {cpu_isa()}")
        print(f"width {width}, batch {args.batch_size}, {args.threads} threads, images/s "
              f"(median of 3 rounds x {args.repeats} passes); x ONNX Runtime FP32 (ONNX "
              f"Runtime rows: the median of 3 rounds' medians of pass-against-pass ratios, "
              f"each round's in brackets):")
        for name, values in speeds.items():
            v = statistics.median(values)
            if name in ratios:
                r = statistics.median(ratios[name])
                per_round = ", ".join(f"{x:.2f}" for x in ratios[name])
                print(f"  {name:47s} {v:8.0f}   x{r:.2f}  ({per_round})")
            else:
                print(f"  {name:47s} {v:8.0f}   x{v / base:.2f}")
        if args.profile:
            profile(ours, batch, args.threads, os.path.join(tmp, "ours"))


if __name__ == "__main__":
    main()
