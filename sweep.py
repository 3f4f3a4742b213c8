"""Quantization sweeps of MobileNetV2, tracked in W&B.

  python sweep.py --checkpoint checkpoints/best.pt --weight_bits 4 --activation_bits 8
      one run; also what `wandb agent` launches for every run of sweeps/bits.yaml
  python sweep.py --sweep sweeps/bits.yaml [--agents K] [--count N]
      the whole sweep locally and offline, as `wandb agent` would run it
  python sweep.py --sweep sweeps/bits.yaml --list | --index N
      a grid sweep's runs, numbered; run only the N-th (a SLURM job array's task,
      slurm/sweep_array.sbatch)
  python sweep.py --report results/<sweep_id>
      summary.md and plots from a sweep's runs.csv
"""

import sys

from mobilenet_compression.environment import requirements_guard


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    flags = {arg.split("=", 1)[0] for arg in argv}
    # Imported lazily: each mode pays only for its own imports (a run does not need the agent).
    # Started by a `python` without the requirements (`wandb agent` runs `python` from PATH):
    # one line saying which virtualenv to activate, exit 2.
    with requirements_guard():
        if "--sweep" in flags:
            from mobilenet_compression.sweep.cli import main as mode
        elif "--report" in flags:
            from mobilenet_compression.sweep.report import main as mode
        else:
            if flags & {"-h", "--help"}:
                print(__doc__)
            from mobilenet_compression.run import main as mode
        return mode(argv)


if __name__ == "__main__":
    sys.exit(main())
