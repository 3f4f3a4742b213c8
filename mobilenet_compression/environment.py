"""Which Python environment holds the project's requirements. Standard library only: this
runs before anything else is imported, in whatever `python` a user (or `wandb agent`, whose
${interpreter} is `python` from PATH) happened to start.

`make setup` builds the virtualenv at ~/.cache/mobilenet-compression/venv-<hash>, the hash
being the first 16 hex digits of requirements.txt's SHA-256 (the Makefile's REQ_HASH), so a
changed requirements.txt gets a fresh one. `make -s venv-path` prints the same path.
"""

import contextlib
import hashlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = "~/.cache/mobilenet-compression"
OWN_PACKAGES = {"mobilenet_compression", "tests"}


def cache_folder(name):
    """A folder of the project's caches (the sensitivity tables, the FP32 statistics):
    under $MOBILENET_COMPRESSION_CACHE when set, else beside the virtualenvs."""
    return os.path.join(os.environ.get("MOBILENET_COMPRESSION_CACHE")
                        or os.path.expanduser(CACHE), name)


def venv_path():
    """The virtualenv `make setup` builds for this checkout's requirements.txt."""
    digest = hashlib.sha256((REPO / "requirements.txt").read_bytes()).hexdigest()[:16]
    return Path(os.path.expanduser(CACHE)) / f"venv-{digest}"


def missing_requirement_message(module):
    try:
        venv = venv_path()
    except OSError:  # no requirements.txt next to the package: say what we can
        venv = Path(os.path.expanduser(CACHE)) / "venv-<hash>"
    return (f"{sys.executable} lacks the project's requirements (no module named {module!r}); "
            f"activate the virtualenv: source {venv}/bin/activate (make setup builds it)")


@contextlib.contextmanager
def requirements_guard():
    """Around an entry script's imports and main: a missing third-party module (the wrong
    `python`) is one `error:` line naming the virtualenv to activate, and exit status 2."""
    try:
        yield
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if not top or top in OWN_PACKAGES:
            raise  # our own code is broken: that traceback is the useful report
        print(f"error: {missing_requirement_message(top)}", file=sys.stderr)
        sys.exit(2)
