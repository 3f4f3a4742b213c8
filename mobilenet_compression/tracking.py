"""Weights & Biases set-up shared by training and quantization runs.

One decision lives here: which W&B mode a run uses. The default is online; with no
credentials (no `wandb login`, no WANDB_API_KEY) a run goes offline by itself and says so in
one line, so an air-gapped cluster needs no flag and `wandb sync` uploads the run later.
"""

import netrc
import os
from urllib.parse import urlsplit

PROJECT = "mobilenet-compression"
WANDB_MODES = ("online", "offline", "disabled")


def has_credentials():
    """True when W&B could authenticate: an API key in the environment or in ~/.netrc for
    the configured host. The key itself is never read out, printed or logged."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(requested=None):
    """The W&B mode to use: the flag, else $WANDB_MODE, else online; online without
    credentials becomes offline (announced in one line)."""
    if os.environ.get("WANDB_MODE") == "":  # wandb itself rejects an empty WANDB_MODE
        del os.environ["WANDB_MODE"]
    mode = requested or os.environ.get("WANDB_MODE") or "online"
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode not in WANDB_MODES:
        mode = "online"
    if mode == "online" and not has_credentials():
        print("W&B: no credentials found, logging offline to ./wandb "
              "(upload later with `wandb sync wandb/offline-run-*`).")
        mode = "offline"
    return mode


def init_run(mode, job_type, config, **kwargs):
    """wandb.init for this project; imported lazily so `--wandb_mode disabled` and the
    pure-metric code never pay for importing wandb.

    Inside a sweep (WANDB_SWEEP_ID set, by `wandb agent` or the offline agent) the project is
    the sweep's: wandb ignores a `project` argument there and warns about it on every run
    ("Ignoring project ... when running a sweep"), so none is passed."""
    import wandb

    project = kwargs.pop("project", None) or os.environ.get("WANDB_PROJECT") or PROJECT
    if not os.environ.get("WANDB_SWEEP_ID"):
        kwargs["project"] = project
    return wandb.init(job_type=job_type, config=config, mode=mode, **kwargs)
