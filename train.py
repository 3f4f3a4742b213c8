"""Train an FP32 MobileNetV2 with W&B tracking. See `python train.py --help`."""

from mobilenet_compression.environment import requirements_guard

if __name__ == "__main__":
    # A `python` without the project's requirements: one line naming the virtualenv, exit 2.
    with requirements_guard():
        from mobilenet_compression.train import run_cli

        run_cli()
