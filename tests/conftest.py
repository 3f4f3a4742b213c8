"""Shared fixtures: the real Fashion-MNIST files and a small MobileNetV2 trained on them."""

import contextlib
import copy
import functools
import hashlib
import importlib.util
import inspect
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

# Under pytest-xdist (`make test`: two workers on two cores) every process the suite starts
# takes one thread, the workers and the runs and trainings they launch alike (they inherit
# the variable, as the offline agent's runs do): two-thread processes on cores the other
# worker keeps busy spin in OpenMP and run several times slower. Set before torch is
# imported, which reads it then; a value the user exported wins.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mobilenet_compression.data import DEBIAN_FASHION_MNIST, BatchLoader, load_dataset  # noqa: E402
from mobilenet_compression.environment import cache_folder  # noqa: E402
from mobilenet_compression.model import build_model  # noqa: E402

CHROMEDRIVER = "/usr/bin/chromedriver"

# A few hundred SGD steps at width 0.25 give ~80% test accuracy: enough for quantization
# effects (a lost activation bit, a per-tensor scale) to show in accuracy and logits.
SMALL_MODEL_RECIPE = dict(width_multiplier=0.25, steps=240, batch_size=64, max_lr=0.2,
                          weight_decay=5e-5, seed=0)
# The tests' assertions need a model well clear of chance (10%) on any machine: training is
# bit-identical on one machine but not across CPUs, so the fixture checks it, not assumes it.
MIN_VAL_ACC = 50.0


@contextlib.contextmanager
def torch_threads(n):
    """Run with n intra-op threads. On 2 shared cores, two OpenMP threads that spin while the
    other core is busy made a training step ~15x slower than one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_main(main, argv, cwd, env):
    """Run a command's `main(argv)` in this process as `python COMMAND ARGV` would run, in
    `cwd` with the environment `env`, and return a subprocess.CompletedProcess (returncode,
    stdout, stderr). For a bad-input check (exit 2, one `error:` line, nothing written) a
    fresh interpreter adds nothing but ~4 s of importing torch; one case per command stays a
    real subprocess, for the entry point and a real process's exit status and stderr. Other
    exceptions are not caught: a traceback fails the test, as it would on stderr."""
    env, out, err = dict(env), io.StringIO(), io.StringIO()
    old_cwd, old_env, old_threads = os.getcwd(), dict(os.environ), torch.get_num_threads()

    def show_warning(message, category, filename, lineno, file=None, line=None):
        err.write(warnings.formatwarning(message, category, filename, lineno, line))

    try:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings():
            # pytest records warnings; a process prints them on stderr (a second line there),
            # filtered as Python does by default.
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                             ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = show_warning
            try:
                code = main(list(argv))
            except SystemExit as e:
                code = e.code
            if code is not None and not isinstance(code, int):  # sys.exit("message")
                print(code, file=sys.stderr)
                code = 1
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
        torch.set_num_threads(old_threads)
    return subprocess.CompletedProcess(list(argv), code or 0, out.getvalue(), err.getvalue())


@functools.cache
def _sweep_script():
    path = Path(__file__).resolve().parents[1] / "sweep.py"
    spec = importlib.util.spec_from_file_location("sweep_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def sweep_main(argv):
    """sweep.py's `main(argv)` (the entry script, not on sys.path; loaded once), for
    run_main."""
    return _sweep_script().main(argv)


@pytest.fixture(scope="session")
def fashion_mnist(tmp_path_factory):
    """(info, train, val, test) Splits of the real Fashion-MNIST, via data.load_dataset."""
    if not os.path.isdir(DEBIAN_FASHION_MNIST):
        pytest.skip("real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return load_dataset("fashion-mnist", str(tmp_path_factory.mktemp("data")))


def _train_small_model(info, train, recipe):
    torch.manual_seed(recipe["seed"])
    model = build_model("cifar", info.num_classes, recipe["width_multiplier"], info.in_channels)
    opt = torch.optim.SGD(model.parameters(), lr=recipe["max_lr"], momentum=0.9, nesterov=True,
                          weight_decay=recipe["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["max_lr"],
                                                total_steps=recipe["steps"], pct_start=0.25)
    loader = BatchLoader(train, info, recipe["batch_size"], seed=recipe["seed"], drop_last=True)
    model.train()
    step = 0
    with torch_threads(1):
        while step < recipe["steps"]:
            for x, y in loader:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if step == recipe["steps"]:
                    break
            loader.set_epoch(loader.epoch + 1)
    return model.eval()


def _val_accuracy(state, info, val, n=2000):
    model = build_model("cifar", info.num_classes, SMALL_MODEL_RECIPE["width_multiplier"],
                        info.in_channels)
    model.load_state_dict(state)
    model.eval()
    correct = 0
    with torch.no_grad(), torch_threads(1):
        for x, y in BatchLoader(val.head(n), info, 500):
            correct += (model(x).argmax(1) == y).sum().item()
    return 100.0 * correct / min(n, len(val))


def _state_cache_path():
    """Where the trained state dict is kept between test sessions and clones: the project's
    cache folder (environment.cache_folder, beside the virtualenvs), keyed by the content of
    everything that decides the weights: the recipe, the training code, torch's version and
    the CPU (training is bit-identical on one machine, not across CPUs)."""
    cpu = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "flags"):
                cpu.setdefault(key.strip(), value.strip())
    key = json.dumps([sorted(SMALL_MODEL_RECIPE.items()), inspect.getsource(_train_small_model),
                      torch.__version__, sorted(cpu.items()), platform.machine()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_folder("test-fixtures")) / f"fashion-mnist-small-{digest}.pt"


@pytest.fixture(scope="session")
def _fashion_mnist_state(fashion_mnist):
    """State dict of the small trained model, trained once per machine and code (about a
    minute on 2 cores) and kept in the project's cache folder (`_state_cache_path`)."""
    info, train, val, _ = fashion_mnist
    path = _state_cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = None
    if path.exists():
        try:
            state = torch.load(path, weights_only=True)
        except Exception:  # a truncated cache file: train again
            pass
    if state is None:
        state = _train_small_model(info, train, SMALL_MODEL_RECIPE).state_dict()
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two workers may train at once
        torch.save(state, tmp)
        os.replace(tmp, path)
    val_acc = _val_accuracy(state, info, val)
    assert val_acc >= MIN_VAL_ACC, (
        f"the shared fixture model reached only {val_acc:.2f}% validation accuracy; "
        f"train longer (SMALL_MODEL_RECIPE) before trusting any quantization test")
    return state


@pytest.fixture
def fashion_mnist_model(fashion_mnist, _fashion_mnist_state):
    """A fresh copy (eval mode) of the small FP32 MobileNetV2 trained on Fashion-MNIST."""
    info = fashion_mnist[0]
    model = build_model("cifar", info.num_classes, SMALL_MODEL_RECIPE["width_multiplier"],
                        info.in_channels)
    model.load_state_dict(copy.deepcopy(_fashion_mnist_state))
    return model.eval()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Debian's chromedriver (selenium must not fetch a driver)."""
    if not (os.path.exists(CHROMEDRIVER) and (shutil.which("chromium")
                                              or shutil.which("chromium-browser"))):
        pytest.fail("the browser tests need Chromium and its driver: "
                    "apt-get install -y chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the browser tests need selenium: pip install -r requirements.txt")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's errors
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def load(driver, path):
    """Open the page from file:// and check its script ran without an error."""
    driver.get(path.as_uri())
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
