"""Train an FP32 MobileNetV2 with W&B tracking. See `python train.py --help`."""

from mobilenet_compression.train import run_cli

if __name__ == "__main__":
    run_cli()
