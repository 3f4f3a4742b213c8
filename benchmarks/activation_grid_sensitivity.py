"""Why A6 can lose more than A4: the first depthwise conv's input, quantized alone.

    python benchmarks/activation_grid_sensitivity.py checkpoints/best.pt

For the trained checkpoint, quantizes only the stem's output (the input of the first
depthwise conv, features.1.conv.0.0) with torch's own fake_quantize_per_tensor_affine, at
several bit widths and scales, and prints the test accuracy on 2,000 images. Also prints the
largest BatchNorm gain gamma / sqrt(running_var) right after that conv. Figures, not tests.
"""

import sys

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from mobilenet_compression.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from mobilenet_compression.data import BatchLoader, load_dataset  # noqa: E402


@torch.inference_mode()
def main(path):
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    info, train, _, test = load_dataset(ckpt["dataset"], ckpt["args"].get("data_dir", "./data"))
    x, y = next(iter(BatchLoader(test.head(2000), info, 2000)))
    calib, _ = next(iter(BatchLoader(train.head(1024), info, 1024)))
    stem_max = float(model.features[0](calib).max())  # min/max calibration on training images
    bn = model.features[1].conv[0][1]
    gain = (bn.weight.abs() / (bn.running_var + bn.eps).sqrt()).max()
    print(f"stem output max on 1,024 training images: {stem_max:.4f}; "
          f"largest BN gain after the first depthwise conv: {gain:.2f}")
    a = model.features[0](x)

    def accuracy(scale, qmax):
        aq = torch.fake_quantize_per_tensor_affine(a, scale, 0, 0, qmax)
        logits = model.classifier(model.features[1:](aq).mean((2, 3)))
        return 100.0 * float((logits.argmax(1) == y).float().mean())

    print(f"FP32: {100.0 * float((model(x).argmax(1) == y).float().mean()):.2f}%")
    for bits in (8, 7, 6, 5, 4, 3):
        qmax = 2**bits - 1
        scale = stem_max / qmax
        nearby = ", ".join(f"{accuracy(scale * f, qmax):.1f}" for f in (0.95, 0.98, 1.02, 1.05))
        print(f"A{bits}: scale {scale:.4f} -> {accuracy(scale, qmax):.2f}%   "
              f"(scale x0.95/0.98/1.02/1.05: {nearby})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "checkpoints/best.pt")
