"""Training and evaluation images/s: the device-tensor data path against a torchvision
DataLoader pipeline (PIL transforms, worker processes), in one run, on the current device.

    python benchmarks/data_path.py --dataset fashion-mnist --width_multiplier 1.0

Prints one table: for each pipeline, the data path alone (batches produced, no model) and a
full training step / evaluation forward at the given width. Figures, not assertions.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mobilenet_compression.data import BatchLoader, load_dataset  # noqa: E402
from mobilenet_compression.model import build_model  # noqa: E402


class PILDataset(torch.utils.data.Dataset):
    """The usual pipeline: one PIL image at a time through torchvision transforms."""

    def __init__(self, split, transform):
        self.images = split.images.permute(0, 2, 3, 1).squeeze(-1).numpy()
        self.labels = split.labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def timed(batches, step, n_batches, device):
    it = iter(batches)
    x, y = next(it)  # warm-up: worker start, cuDNN autotune, first allocation
    step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, seen = time.perf_counter(), 0
    for _, (x, y) in zip(range(n_batches), it):
        step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist", help="dataset to read")
    p.add_argument("--data_dir", default="./data", help="where the dataset is")
    p.add_argument("--width_multiplier", type=float, default=1.0, help="MobileNetV2 width")
    p.add_argument("--batch_size", type=int, default=128, help="training batch size")
    p.add_argument("--eval_batch_size", type=int, default=512, help="evaluation batch size")
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info, train, _, test = load_dataset(args.dataset, args.data_dir)
    model = build_model("cifar", info.num_classes, args.width_multiplier, info.in_channels)
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def train_step(x, y):
        model.train()
        with amp:
            loss = criterion(model(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.inference_mode()
    def eval_step(x, y):
        model.eval()
        with amp:
            model(x.contiguous(memory_format=torch.channels_last)).argmax(1)

    def no_model(x, y):
        pass

    norm = transforms.Normalize(info.mean, info.std)
    aug = [transforms.RandomCrop(info.input_size, padding=4)]
    if info.flip:
        aug.append(transforms.RandomHorizontalFlip())
    pil_train = DataLoader(
        PILDataset(train, transforms.Compose([*aug, transforms.ToTensor(), norm])),
        batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=True)
    pil_test = DataLoader(PILDataset(test, transforms.Compose([transforms.ToTensor(), norm])),
                          batch_size=args.eval_batch_size, num_workers=args.workers,
                          pin_memory=device.type == "cuda", persistent_workers=True)
    fast_train = BatchLoader(train.to(device), info, args.batch_size, augment=True, seed=0,
                             drop_last=True, channels_last=True)
    fast_test = BatchLoader(test.to(device), info, args.eval_batch_size, channels_last=True)

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; {args.dataset}, width {args.width_multiplier}, "
          f"batch {args.batch_size}/{args.eval_batch_size}, {args.batches} timed batches")
    print(f"{'pipeline':<34}{'data only':>12}{'train step':>12}{'eval':>12}   (images/s)")
    for label, tr, te in (("device tensors (data.BatchLoader)", fast_train, fast_test),
                          (f"DataLoader + PIL, {args.workers} workers", pil_train, pil_test)):
        data = timed(tr, no_model, args.batches, device)
        t = timed(tr, train_step, args.batches, device)
        e = timed(te, eval_step, max(2, args.batches // 4), device)
        print(f"{label:<34}{data:>12,.0f}{t:>12,.0f}{e:>12,.0f}")


if __name__ == "__main__":
    main()
