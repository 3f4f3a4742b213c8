"""How many CPU threads a process's torch uses, so that several runs on one machine share it,
and which device it runs on (`resolve_device`).

torch starts one intra-op thread per core. K runs at a time (the offline agent's --agents K,
or K `wandb agent` processes on one machine) that each take every core fight over them: on
2 shared cores, a training step with two OpenMP threads while the other core was busy ran
~20x slower than with one (13 against 253 images/s). So a run takes `--threads N`, else
OMP_NUM_THREADS (what the offline agent sets for its runs: cores / K), else
SLURM_CPUS_PER_TASK (a SLURM task's share of its node), else torch's default.

    from mobilenet_compression import threads
    threads.add_argument(parser)             # --threads N
    threads.set_threads(args.threads)        # after parsing (and after wandb.config)
"""

import os

from .errors import UserError

ENV = "OMP_NUM_THREADS"
SLURM_ENV = "SLURM_CPUS_PER_TASK"  # set by SLURM when the job asks --cpus-per-task


def add_argument(parser):
    """Add `--threads N` to an argparse parser (default None: OMP_NUM_THREADS, else torch's
    default of one thread per core)."""
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: $OMP_NUM_THREADS, else "
                             "$SLURM_CPUS_PER_TASK, else one per core); give K runs sharing a "
                             "machine cores / K each")
    return parser


def _positive(value, name):
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool) or number != float(value) or number < 1:
        raise UserError(f"{name} must be a positive integer (threads per run), got {value!r}")
    return number


def resolve_threads(n=None):
    """The thread count asked for: `n`, else OMP_NUM_THREADS, else SLURM_CPUS_PER_TASK, else
    None (torch's default)."""
    if n is not None:
        return _positive(n, "--threads")
    for name in (ENV, SLURM_ENV):
        if os.environ.get(name):
            return _positive(os.environ[name], name)
    return None


def set_threads(n=None):
    """Set torch's intra-op thread count from `n` (a --threads value), else OMP_NUM_THREADS;
    neither leaves torch's default. Returns the count torch now uses. A bad value is one
    UserError sentence."""
    import torch

    wanted = resolve_threads(n)
    if wanted is not None and wanted != torch.get_num_threads():
        torch.set_num_threads(wanted)
    return torch.get_num_threads()


def resolve_device(name):
    """The torch device of --device NAME (None: cuda if there is one, else cpu); one that
    cannot be used is a UserError."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"cannot use --device {name}: {str(e).splitlines()[0]}") from None
    return device
