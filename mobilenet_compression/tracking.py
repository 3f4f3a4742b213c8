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



def log_run(run, metrics, rows, model_path, ckpt, config, status):
    """W&B: summary metrics and `status`, the per-layer BitOps table, the exported file as an
    artifact."""
    import wandb

    run.summary.update({**metrics, "status": status})
    columns = ["name", "type", "in_channels", "out_channels", "kernel", "stride",
               "input_hw", "output_hw", "macs", "weight_bits", "activation_bits", "calibration",
               "bitops", "bitops_share", "weight_bitops"]
    total = sum(r["bitops"] for r in rows)
    table = wandb.Table(columns=columns, data=[
        ["x".join(map(str, r[c])) if isinstance(r[c], tuple) else r[c] for c in columns]
        for r in ({**r, "bitops_share": r["bitops"] / total} for r in rows)])
    # The plan, layer by layer (a mixed plan's bits differ from layer to layer): the table and
    # one bar chart per kind of bits, in the order of the network.
    run.log({"bitops_per_layer": table,
             "bits_per_layer/weight": wandb.plot.bar(table, "name", "weight_bits",
                                                title="weight bits per layer"),
             "bits_per_layer/activation": wandb.plot.bar(table, "name", "activation_bits",
                                                    title="activation bits per layer")})
    label = (f"w{config.weight_bits}a{config.activation_bits}" if config.plan == "uniform"
             else f"{config.plan}-{config.bitops_budget or ''}"
                  f"{config.size_budget_mb and f'{config.size_budget_mb:g}mb' or ''}".rstrip("-"))
    artifact = wandb.Artifact(
        f"mobilenetv2-{ckpt['dataset']}-w{ckpt['width_multiplier']:g}-{label}-{config.method}",
        type="quantized-model", metadata=metrics)
    artifact.add_file(model_path)
    onnx_path = model_path.removesuffix(".safetensors") + ".onnx"
    if os.path.exists(onnx_path):  # the ONNX QDQ file (onnx_export.py), beside it
        artifact.add_file(onnx_path)
    run.log_artifact(artifact)
    if run.settings.mode == "online":
        try:  # lineage: the baseline model artifact logged by train.py, if it is there
            run.use_artifact(f"mobilenetv2-{ckpt['dataset']}-"
                             f"w{ckpt['width_multiplier']:g}:latest")
        except Exception as e:  # a checkpoint trained with W&B disabled has none
            print(f"W&B: no baseline model artifact to link ({type(e).__name__}).")
