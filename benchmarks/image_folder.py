"""Images/s of the image-folder data path (PIL decode, resize 256, center crop 224, workers),
alone and feeding an FP32 MobileNetV2 evaluation, and how long the network waited for
decoded images.

    python benchmarks/image_folder.py [--data_dir DIR] [--images 512] [--workers 0 1 2]

Without --data_dir it writes ImageNet-like JPEGs (500x375, 10 classes) to a temporary
folder. Prints one table: per worker count, the median over --repeats passes of the data
path alone (batches produced, no model) and of the evaluation (torchvision's ImageNet
MobileNetV2, width 1.0, random weights), with the seconds it waited for data. Figures, not
assertions.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mobilenet_compression.image_folder import Preprocess, load_image_folder  # noqa: E402
from mobilenet_compression.model import build_model  # noqa: E402
from mobilenet_compression.sources import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def write_jpegs(root, classes, per_class):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = os.path.join(root, split, f"n{c:08d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                # smooth noise compresses like a photograph, not like white noise
                small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
                Image.fromarray(small).resize((500, 375), Image.BILINEAR).save(
                    os.path.join(folder, f"{i}.JPEG"), quality=90)
    return root


def passes(loader, model, repeats):
    data, evaluation, waits = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(len(y) for _, y in loader)
        data.append(n / (time.perf_counter() - t0))
        loader.wait_s = 0.0
        t0 = time.perf_counter()
        with torch.inference_mode():
            n = sum(len(model(x)) for x, _ in loader)
        evaluation.append(n / (time.perf_counter() - t0))
        waits.append(loader.wait_s)
    return statistics.median(data), statistics.median(evaluation), statistics.median(waits)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default=None, help="a folder with train/ and val/ (default: "
                   "generated JPEGs)")
    p.add_argument("--images", type=int, default=512, help="test images per pass")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or write_jpegs(tmp, 10, max(1, args.images // 10) + 1)
        classes = len(os.listdir(os.path.join(root, "train")))
        preprocess = Preprocess(224, 256, IMAGENET_MEAN, IMAGENET_STD)
        model = build_model("imagenet", classes).eval().to(memory_format=torch.channels_last)
        print(f"{torch.get_num_threads()} torch threads, batch {args.batch_size}, "
              f"{args.images} images of {root}")
        print("| workers | data path alone, img/s | evaluation, img/s | waited for data, s |")
        print("|---|---|---|---|")
        for workers in args.workers:
            info, _, _, test = load_image_folder("imagefolder", root, preprocess, classes,
                                                 val_size=1, workers=workers)
            loader = test.head(args.images).loader(info, args.batch_size, channels_last=True)
            data, evaluation, wait = passes(loader, model, args.repeats)
            print(f"| {workers} | {data:.0f} | {evaluation:.1f} | {wait:.2f} |")


if __name__ == "__main__":
    main()
