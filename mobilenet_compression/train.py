"""Train an FP32 MobileNetV2 (CIFAR variant) and log every epoch to Weights & Biases.

The loop follows torchvision's references/classification/train.py: `get_args_parser()`,
`train_one_epoch`, `evaluate`, `main(args)`. The data path is the one in data.py: the whole
dataset lives on the device as uint8 and is augmented there in batches.

Reproducibility and exact resume: the order and augmentation of epoch e are drawn from a
generator seeded with (seed, e), and the global RNG (dropout) is seeded with seed + e at the
start of each epoch, so an epoch's randomness does not depend on what ran before it. An
interrupted epoch saves the global RNG state and its position, and resumes from there.
"""

import argparse
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn
from tqdm import tqdm

from . import checkpoint as ckpt_io
from . import threads
from .data import DATASETS, BatchLoader, load_dataset
from .errors import ArgumentParser, UserError, cli
from .evaluation import evaluate
from .model import build_model
from .signals import StopFlag
from .tracking import WANDB_MODES, init_run, resolve_mode

# Arguments that define the training run; --resume refuses to continue with others.
RUN_DEFINING = (
    "dataset", "epochs", "batch_size", "lr", "momentum", "weight_decay", "label_smoothing",
    "width_multiplier", "seed", "max_train_samples", "val_size", "augment", "lr_schedule",
)
AUGMENTATIONS = ("crop-flip", "none")
LR_SCHEDULES = ("epoch", "step")


def get_args_parser(add_help=True):
    p = ArgumentParser(
        description="Train an FP32 MobileNetV2 (CIFAR variant) with W&B tracking.",
        add_help=add_help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="cifar10", choices=list(DATASETS),
                   help="dataset to train on")
    p.add_argument("--data_dir", default="./data",
                   help="where the dataset is (or is downloaded to)")
    p.add_argument("--epochs", type=int, default=200, help="number of training epochs")
    p.add_argument("--batch_size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=0.1,
                   help="initial learning rate (cosine annealing to 0)")
    p.add_argument("--lr_schedule", default="epoch", choices=LR_SCHEDULES,
                   help="when the cosine schedule moves: once per epoch (the committed "
                        "checkpoints' recipe; the last epoch runs at lr/2 when --epochs is 2), "
                        "or after every step, reaching 0 at the last one (better in a few "
                        "epochs, see make demo)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight_decay", type=float, default=4e-5, help="SGD weight decay")
    p.add_argument("--label_smoothing", type=float, default=0.1,
                   help="label smoothing of the cross-entropy loss")
    p.add_argument("--augment", default="crop-flip", choices=AUGMENTATIONS,
                   help="training augmentation: random crops of a 4-pixel padded copy and "
                        "horizontal flips, or none (the images themselves, reshuffled each "
                        "epoch; converges faster in a few epochs, see make demo)")
    p.add_argument("--width_multiplier", type=float, default=1.0,
                   help="MobileNetV2 width multiplier")
    p.add_argument("--seed", type=int, default=42, help="random seed")
    p.add_argument("--val_size", type=int, default=None,
                   help="images held out of the training set for validation "
                        "(default: 5000); the checkpoint is chosen on them")
    p.add_argument("--max_train_samples", type=int, default=None,
                   help="train on only the first N training images (quick runs)")
    p.add_argument("--max_eval_samples", type=int, default=None,
                   help="evaluate on only the first N validation and test images")
    p.add_argument("--checkpoint_dir", default="checkpoints",
                   help="where last.pt, best.pt and training_log.txt are written")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --checkpoint_dir from last.pt")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu)")
    threads.add_argument(p)
    p.add_argument("--wandb_mode", default=None, choices=WANDB_MODES,
                   help="W&B mode (default: $WANDB_MODE, else online; offline by itself "
                        "when there are no W&B credentials)")
    p.add_argument("--wandb_project", default=None,
                   help="W&B project (default: $WANDB_PROJECT, else mobilenet-compression)")
    return p


def check_args(args):
    positive = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                "width_multiplier": args.width_multiplier}
    for name, value in positive.items():
        if not value > 0 or not math.isfinite(value):
            raise UserError(f"--{name} must be positive, got {value}.")
    for name in ("max_train_samples", "max_eval_samples", "val_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be a positive number of images, got {value}.")
    if args.weight_decay < 0:
        raise UserError(f"--weight_decay must be zero or positive, got {args.weight_decay}.")
    if not 0 <= args.label_smoothing < 1:
        raise UserError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}.")
    if not 0 <= args.momentum < 1:
        raise UserError(f"--momentum must be in [0, 1), got {args.momentum}.")


def prepare_checkpoint_dir(path, resume):
    """Make sure checkpoints can be written, and never start over a finished run's files."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(
            f"cannot write checkpoints to {path} ({e.strerror}); choose another "
            f"--checkpoint_dir."
        ) from None
    last = os.path.join(path, "last.pt")
    if resume and not os.path.exists(last):
        raise UserError(f"--resume needs {last}, which does not exist; train without --resume.")
    if not resume and any(os.path.exists(os.path.join(path, f)) for f in ("last.pt", "best.pt")):
        raise UserError(
            f"{path} already holds a training run; pass --resume to continue it or choose "
            f"another --checkpoint_dir (nothing was overwritten)."
        )


def train_one_epoch(model, loader, optimizer, criterion, stop, totals, desc, step_scheduler=None):
    """Train over `loader` from its start step. `totals` (loss sum, correct, seen, steps)
    carries an interrupted epoch's partial sums; `step_scheduler`, when given, is stepped
    after every optimizer step. Returns "done", "stopped" or "nan"."""
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=loader.split.device.type == "cuda")
    bar = tqdm(loader, desc=desc, leave=False, disable=None, dynamic_ncols=True)
    for x, y in bar:
        with autocast:
            logits = model(x)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        totals["lr"] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        if step_scheduler is not None:
            step_scheduler.step()
        # Sums stay on the device; reading them back every step would stall a GPU.
        totals["loss"] += loss.detach().float() * len(y)
        totals["correct"] += (logits.argmax(1) == y).sum()
        totals["seen"] += len(y)
        totals["steps"] += 1
        if totals["steps"] % 20 == 0 or stop.requested:
            running = float(totals["loss"]) / totals["seen"]
            if not math.isfinite(running):
                return "nan"
            bar.set_postfix(loss=f"{running:.3f}")
        if stop.requested:
            return "stopped"
    return "done" if math.isfinite(float(totals["loss"])) else "nan"


def checkpoint_metadata(args, info):
    return {
        "format": ckpt_io.FORMAT,
        "arch": "cifar",
        "dataset": args.dataset,
        "num_classes": info.num_classes,
        "in_channels": info.in_channels,
        "input_size": info.input_size,
        "width_multiplier": args.width_multiplier,
        "seed": args.seed,
        "args": {k: v for k, v in vars(args).items()
                 if v is None or isinstance(v, (int, float, str, bool))},
    }


def cpu_state(model):
    """The model's weights on the CPU: a best.pt trained on a GPU then loads with a plain
    torch.load on a machine without one (the optimizer state in last.pt may stay on the
    device: only --resume reads it, through load_checkpoint's map_location)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_resume_state(args, last_path):
    """The interrupted run's last.pt with --resume (refused if a run-defining flag changed),
    else None."""
    if not args.resume:
        return None
    state = ckpt_io.load_checkpoint(last_path)
    for k in RUN_DEFINING:
        if k in state["args"] and state["args"][k] != getattr(args, k):
            raise UserError(
                f"--resume continues the run in {args.checkpoint_dir} exactly: its "
                f"--{k} was {state['args'][k]}, not {getattr(args, k)}."
            )
    return state


def make_loaders(args, device):
    """(dataset info, train, validation and test loaders) on `device`, channels-last (faster
    for MobileNetV2 on the GPU, cuDNN, and on the CPU, oneDNN)."""
    info, train, val, test = load_dataset(args.dataset, args.data_dir, args.val_size)
    train = train.head(args.max_train_samples).to(device)
    val = val.head(args.max_eval_samples).to(device)
    test = test.head(args.max_eval_samples).to(device)
    train_loader = BatchLoader(train, info, args.batch_size,
                               augment=args.augment == "crop-flip", shuffle=True, seed=args.seed,
                               drop_last=len(train) > args.batch_size, channels_last=True)
    eval_bs = max(args.batch_size, 512)
    return (info, train_loader, BatchLoader(val, info, eval_bs, channels_last=True),
            BatchLoader(test, info, eval_bs, channels_last=True))


class Training:
    """One training run: the model, its optimiser and schedule, the checkpoint files, and the
    epoch loop (`run`), which saves last.pt after every epoch (and at a stop mid-epoch) and
    best.pt whenever validation accuracy improves."""

    def __init__(self, args):
        check_args(args)
        threads.set_threads(args.threads)
        prepare_checkpoint_dir(args.checkpoint_dir, args.resume)
        self.args = args
        self.last_path = os.path.join(args.checkpoint_dir, "last.pt")
        self.best_path = os.path.join(args.checkpoint_dir, "best.pt")
        self.log_path = os.path.join(args.checkpoint_dir, "training_log.txt")
        self.state = load_resume_state(args, self.last_path)
        self.device = threads.resolve_device(args.device)
        self.info, self.train_loader, self.val_loader, self.test_loader = make_loaders(
            args, self.device)
        torch.manual_seed(args.seed)
        model = build_model("cifar", self.info.num_classes, args.width_multiplier,
                            self.info.in_channels)
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=args.lr,
                                         momentum=args.momentum,
                                         weight_decay=args.weight_decay, nesterov=False)
        self.per_step = args.lr_schedule == "step"
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer,
            T_max=args.epochs * len(self.train_loader) if self.per_step else args.epochs)
        self.meta = checkpoint_metadata(args, self.info)
        self.start_epoch, self.start_step, self.best_val, self.wandb_id = 0, 0, -1.0, None
        self.totals = None
        if self.state is not None:
            self.restore(self.state)
        self.run = None

    def restore(self, state):
        """Model, optimiser, schedule and position from last.pt (mid-epoch: the totals so far)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch, self.start_step = state["epoch"], state["step"]
        self.best_val = state["best_val_acc"]
        self.wandb_id = state.get("wandb_id")
        if self.start_step:
            self.totals = {k: (torch.tensor(v, device=self.device)
                               if k in ("loss", "correct") else v)
                           for k, v in state["partial"].items()}
        print(f"resuming from {self.last_path}: epoch {self.start_epoch + 1}, "
              f"step {self.start_step}")

    def start_wandb(self):
        mode = resolve_mode(self.args.wandb_mode)
        if mode != "disabled":
            self.run = init_run(mode, "train", vars(self.args), id=self.wandb_id,
                                resume="allow" if self.wandb_id else None,
                                project=self.args.wandb_project)
            self.wandb_id = self.run.id

    def save_last(self, epoch, step, partial=None):
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        ckpt_io.atomic_save({
            **self.meta, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "epoch": epoch, "step": step, "partial": partial, "rng": rng,
            "best_val_acc": self.best_val, "wandb_id": self.wandb_id,
        }, self.last_path)

    def epoch_start(self, epoch):
        """The epoch's randomness and running totals: a resumed epoch's saved RNG state and
        totals, else seed + epoch and zeros."""
        if self.totals is not None and self.start_step:
            torch.set_rng_state(self.state["rng"]["cpu"])
            if self.device.type == "cuda" and "cuda" in self.state["rng"]:
                torch.cuda.set_rng_state(self.state["rng"]["cuda"], self.device)
        else:
            torch.manual_seed(self.args.seed + epoch)
            self.totals = {"loss": torch.zeros((), device=self.device),
                           "correct": torch.zeros((), dtype=torch.long, device=self.device),
                           "seen": 0, "steps": 0}
        self.train_loader.set_epoch(epoch, self.start_step)
        self.start_step = 0

    def run_epochs(self):
        """Train to the last epoch or to a stop; returns "done" or "stopped"."""
        status = "done"
        with StopFlag() as stop:
            for epoch in range(self.start_epoch, self.args.epochs):
                t0 = time.perf_counter()
                self.epoch_start(epoch)
                status = train_one_epoch(
                    self.model, self.train_loader, self.optimizer, self.criterion, stop,
                    self.totals, desc=f"epoch {epoch + 1}/{self.args.epochs}",
                    step_scheduler=self.scheduler if self.per_step else None)
                if status == "nan":
                    raise UserError(
                        f"the training loss became NaN in epoch {epoch + 1}; {self.last_path} "
                        f"keeps the last good epoch. Lower --lr and train again.")
                if status == "stopped":
                    self.save_stopped(epoch)
                    break
                self.epoch_end(epoch, t0, time.perf_counter() - t0)
        return status

    def save_stopped(self, epoch):
        totals = self.totals
        partial = {"loss": float(totals["loss"]), "correct": int(totals["correct"]),
                   "seen": totals["seen"], "steps": totals["steps"]}
        self.save_last(epoch, totals["steps"], partial)
        print(f"stopped in epoch {epoch + 1} at step {totals['steps']}; {self.last_path} "
              f"saved: continue with the same command and --resume.")

    def epoch_end(self, epoch, t0, train_time):
        """Validate, keep best.pt, save last.pt, and log the epoch's line and W&B row."""
        totals = self.totals
        lr = totals.get("lr", self.optimizer.param_groups[0]["lr"])  # the epoch's last step's
        if not self.per_step:
            self.scheduler.step()
        val_loss, val_acc = evaluate(self.model, self.val_loader, self.criterion, bf16=True)
        row = {
            "epoch": epoch + 1,
            "train_loss": float(totals["loss"]) / totals["seen"],
            "train_acc": 100.0 * int(totals["correct"]) / totals["seen"],
            "val_loss": val_loss, "val_acc": val_acc, "lr": lr,
            "epoch_time_s": time.perf_counter() - t0,
            "images_per_s": totals["seen"] / train_time,
        }
        if val_acc > self.best_val:
            self.best_val = val_acc
            ckpt_io.atomic_save({**self.meta, "model": cpu_state(self.model),
                                 "epoch": epoch + 1, "train_acc": row["train_acc"],
                                 "val_acc": val_acc, "best_val_acc": self.best_val},
                                self.best_path)
        self.save_last(epoch + 1, 0)
        line = (f"epoch {epoch + 1}/{self.args.epochs} train_loss {row['train_loss']:.4f} "
                f"train_acc {row['train_acc']:.2f} val_loss {val_loss:.4f} val_acc "
                f"{val_acc:.2f} best_val_acc {self.best_val:.2f} lr {lr:.5f} "
                f"time {row['epoch_time_s']:.1f}s {row['images_per_s']:.0f} img/s")
        print(line)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")
        if self.run is not None:
            self.run.log(row, step=epoch + 1)

    def finish(self):
        """best.pt's test accuracy (written into it), and its W&B artifact."""
        best = ckpt_io.load_checkpoint(self.best_path)
        self.model.load_state_dict(best["model"])
        _, test_acc = evaluate(self.model, self.test_loader, self.criterion, bf16=True)
        best["test_acc"] = test_acc
        ckpt_io.atomic_save(best, self.best_path)
        print(f"best epoch {best['epoch']}: val_acc {best['val_acc']:.2f} test_acc "
              f"{test_acc:.2f} -> {self.best_path}")
        if self.run is not None:
            self.run.summary.update({"test_acc": test_acc, "best_val_acc": best["val_acc"],
                                     "best_epoch": best["epoch"]})
            import wandb

            artifact = wandb.Artifact(
                f"mobilenetv2-{self.args.dataset}-w{self.args.width_multiplier:g}",
                type="model", metadata={k: v for k, v in best.items() if k not in ("model",)},
            )
            artifact.add_file(self.best_path, name="best.pt")
            self.run.log_artifact(artifact)
            self.run.finish()
        return best


def main(args):
    """Train as `args` say (a stop exits 130 with last.pt saved); returns best.pt's content."""
    training = Training(args)
    training.start_wandb()
    if training.run_epochs() == "stopped":
        if training.run is not None:
            training.run.finish(exit_code=130)
        sys.exit(130)
    return training.finish()


@cli
def run_cli(argv=None):
    return main(get_args_parser().parse_args(argv))
