"""The sweep yaml: W&B's format, read and checked (its schema, by W&B's own sweep engine, and
every parameter value by the run's own rules) before anything runs; its id."""

import dataclasses
import hashlib
import json
import sys
import warnings
from pathlib import Path

from mobilenet_compression.errors import UserError
from mobilenet_compression.sweep import results

# wandb agent's default command, used when the yaml has none.
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]

METHODS = ("grid", "random", "bayes")


def import_sweeps():
    # sweeps 0.2.0 still uses pydantic-v1 config names; the warning says nothing to our users.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Valid config keys have changed in V2")
        import sweeps
    return sweeps


def load_sweep_config(path):
    """The sweep yaml as a dict, checked by W&B's schema and by what the local engine can run.
    Every problem is one UserError sentence."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"cannot read the sweep yaml {path} ({e.strerror or e}); "
                        f"pass the path of a sweep yaml such as sweeps/bits.yaml") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path} is not valid YAML{where}: {problem}; fix the file") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} must be a YAML mapping with `method` and `parameters` "
                        f"(see sweeps/bits.yaml), not {type(config).__name__}")
    validate_sweep_config(config, path)
    return config


def validate_sweep_config(config, path):
    sweeps = import_sweeps()
    try:
        violations = sweeps.schema_violations_from_proposed_config(config)
    except ValueError as e:  # the schema check raises instead of reporting for some shapes
        violations = [str(e)]
    if violations:
        unique = list(dict.fromkeys(v.replace("\n", " ") for v in violations))
        raise UserError(f"{path} breaks W&B's sweep schema: {'; '.join(unique)}; see "
                        f"https://docs.wandb.ai/guides/sweeps/sweep-config-keys")
    method = config["method"]
    if method not in METHODS:
        raise UserError(f"{path}: method {method!r} needs a W&B server; the local agent runs "
                        f"{', '.join(METHODS)}")
    if method == "bayes" and "metric" not in config:
        raise UserError(f"{path}: a bayes sweep needs a `metric` (name and goal) to optimize")
    command = config.get("command") or DEFAULT_COMMAND
    if "${program}" in command and not config.get("program"):
        raise UserError(f"{path} has no `program:`, which its command's ${{program}} needs")


def _listed_values(spec):
    """The concrete values a sweep parameter's spec names: `value`, every one of `values`,
    and the ends of a `min`/`max` range."""
    if not isinstance(spec, dict):
        return []
    if "value" in spec:
        return [spec["value"]]
    if isinstance(spec.get("values"), list):
        return list(spec["values"])
    return [spec[k] for k in ("min", "max") if k in spec]


def check_parameter_values(config, path):
    """Check every value a sweep's parameters name by the run's own rules (RunConfig, the
    same as its flags) before any run starts: a bad value is one UserError naming the
    parameter, not a failed run. Each value is checked beside the first value of every other
    parameter (so `plan: sensitivity` meets its budget); an error about another parameter is
    left to the runs, since the sweep's command may add flags. Parameters that are not a
    run's (a sweep of another program) are that program's to check."""
    from mobilenet_compression.config import RunConfig

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    params = {k: v for k, v in (config.get("parameters") or {}).items() if k in fields}
    values = {name: _listed_values(spec) for name, spec in params.items()}
    first = {name: v[0] for name, v in values.items() if v}
    for name, listed in values.items():
        for value in listed:
            try:
                RunConfig.from_dict({**first, name: value})
            except UserError as e:
                if str(e).startswith(f"--{name} "):  # this value's own error
                    raise UserError(f"{path}: parameter {name}: {e}") from None


def sweep_id_for(config):
    """A W&B-looking sweep id (8 characters, [0-9a-z]) that depends only on the yaml's content,
    so the same sweep resumes where it stopped and a changed one starts afresh."""
    canonical = json.dumps(config, sort_keys=True, default=str).encode()
    number = int.from_bytes(hashlib.sha256(canonical).digest()[:8], "big")
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    for _ in range(8):
        number, rest = divmod(number, 36)
        out += digits[rest]
    return out


def plain(value):
    """The engine returns numpy scalars for random and bayes; yaml and json want Python ones."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def results_dir_of(config, path, given):
    """Where the sweep's runs write runs.csv: a `results_dir` parameter of the yaml (the
    runs take their parameters from it, over any flag), else --results_dir, else
    $MOBILENET_COMPRESSION_RESULTS_DIR or `results`."""
    spec = config["parameters"].get("results_dir")
    if spec is None:
        return given or results.default_results_dir()
    values = [spec["value"]] if "value" in spec else spec.get("values") or []
    if len(values) != 1 or not isinstance(values[0], str) or not values[0]:
        raise UserError(f"{path}: the results_dir parameter must be one directory (where the "
                        f"sweep's runs.csv goes), not {spec}")
    if given and Path(given).resolve() != Path(values[0]).resolve():
        print(f"note: the sweep's results_dir parameter ({values[0]}) is where its runs write; "
              f"using it instead of --results_dir {given}", file=sys.stderr)
    return values[0]
