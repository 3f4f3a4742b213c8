"""Bring your own MobileNetV2: torchvision state dicts, torchvision's weights by name, and
image folders streamed from disk, through the real command line (sweep.py and the BitOps
table in subprocesses, W&B offline) on folders the tests write in the real layout."""

import csv
import json
import os
import subprocess
import sys

import onnx
import pandas as pd
import pytest
import torch

from mobilenet_compression.data import DATASETS
from mobilenet_compression.deploy.export import read_quantized
from mobilenet_compression.image_folder import FolderSplit, load_image_folder
from mobilenet_compression.source_options import TENSOR_DATASET_NAMES, SourceOptions
from mobilenet_compression.sources import load_model, preprocess_of
from tests.image_folders import (
    save_torchvision_state_dict,
    write_fashion_mnist_pngs,
    write_jpeg_folder,
)
from tests.test_qat import env_for, small_checkpoint  # noqa: F401  (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = DATASETS["fashion-mnist"]
# The flags that describe Fashion-MNIST's images to the image-folder path: this project's
# CIFAR strides, 28x28 with no resize, its one-channel normalisation.
FASHION_FOLDER = ["--dataset", "imagefolder", "--arch", "cifar", "--input_size", "28",
                  "--resize_size", "28", "--mean", "0.2860", "--std", "0.3530"]
PNG_TRAIN, PNG_TEST = 6000, 2000
# The torchvision-network runs: small crops keep them quick on 2 cores.
QUICK = ["--input_size", "64", "--calib_batches", "1", "--calib_batch_size", "32",
         "--threads", "1", "--workers", "1"]


def run(args, tmp, module=None, **env):
    command = [sys.executable, *(["-m", module] if module else [os.path.join(ROOT, "sweep.py")])]
    return subprocess.run([*command, *args], cwd=tmp, env=env_for(tmp, PYTHONPATH=ROOT, **env),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)


def rows(results):
    return pd.read_csv(results / "runs" / "runs.csv")


@pytest.fixture(scope="module")
def fashion_pngs(tmp_path_factory):
    """Debian's Fashion-MNIST as a folder of PNGs: 6,000 training and 2,000 test images."""
    return write_fashion_mnist_pngs(str(tmp_path_factory.mktemp("pngs")), PNG_TRAIN, PNG_TEST)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """Three classes of generated JPEGs at many sizes: 40 training and 12 test images each."""
    return write_jpeg_folder(str(tmp_path_factory.mktemp("jpegs")), 3, 40, 12)


@pytest.fixture(scope="module")
def torchvision_state_dict(tmp_path_factory):
    """torchvision's mobilenet_v2(weights=None) at width 0.5 with 3 classes."""
    path = tmp_path_factory.mktemp("sd") / "mobilenet_v2_3_classes.pth"
    return save_torchvision_state_dict(path, num_classes=3, width_mult=0.5)


def test_png_folder_gives_the_tensor_paths_pixels(fashion_mnist, fashion_pngs):
    """The image-folder loader (PIL decode, resize, crop, workers) hands the network exactly
    the normalised tensors the in-memory loader does, image by image."""
    info, _, _, test = fashion_mnist
    ckpt = {"in_channels": 1, "preprocess": {"input_size": 28, "resize_size": 28,
                                             "mean": FASHION.mean, "std": FASHION.std}}
    finfo, _, _, ftest = load_image_folder("imagefolder", fashion_pngs, preprocess_of(ckpt), 10,
                                           workers=2)
    assert len(ftest) == PNG_TEST and finfo.num_classes == 10
    index = torch.tensor([int(os.path.basename(p)[:-4]) for p, _ in ftest.samples])
    assert torch.equal(ftest.labels, test.labels[index])
    # class-balanced order: the first 100 test images hold 10 of each class
    assert torch.bincount(ftest.labels[:100]).tolist() == [10] * 10
    everything, _ = next(iter(test.loader(info, len(test))))
    expected = everything[index]
    got = torch.cat([x for x, _ in ftest.loader(finfo, 256)])
    assert torch.equal(got, expected)


def test_png_folder_run_matches_the_tensor_run(tmp_path, fashion_pngs, small_checkpoint):  # noqa: F811
    """The same checkpoint, once as this project's checkpoint on the in-memory dataset and
    once as a plain state dict on the PNG folder: the FP32 accuracy is the same to the image.
    The quantized accuracy is close, not equal: the folder path calibrates on a class-balanced
    sample of its 6,000 training files, the tensor path on its own first 1,024 training images,
    and chooses bias correction on 600 held-out files instead of 2,000 images."""
    state_dict = tmp_path / "state_dict.pth"
    torch.save(torch.load(small_checkpoint, weights_only=True)["model"], state_dict)
    common = ["--weight_bits", "8", "--activation_bits", "8", "--threads", "1"]
    r = run(["--checkpoint", str(small_checkpoint), "--max_eval_samples", str(PNG_TEST),
             "--results_dir", str(tmp_path / "tensor"), *common], tmp_path)
    assert r.returncode == 0, r.stderr
    r = run(["--checkpoint", str(state_dict), "--data_dir", fashion_pngs, *FASHION_FOLDER,
             "--results_dir", str(tmp_path / "folder"), *common], tmp_path)
    assert r.returncode == 0, r.stderr
    tensor, folder = rows(tmp_path / "tensor").iloc[0], rows(tmp_path / "folder").iloc[0]
    assert tensor.eval_images == folder.eval_images == PNG_TEST
    assert folder.baseline_acc == tensor.baseline_acc
    assert abs(folder.quant_acc - tensor.quant_acc) <= 1.0, (folder.quant_acc, tensor.quant_acc)
    assert folder.data_wait_s >= 0 and "data_wait_s" not in tensor
    assert folder.roundtrip_max_abs_diff == 0.0 and folder.onnx_agreement >= 99.5
    metadata, _ = read_quantized(str(next((tmp_path / "folder").rglob("*.safetensors"))))
    assert metadata["source"] == str(state_dict) and metadata["dataset"] == "imagefolder"
    assert json.loads(metadata["preprocess"])["resize_size"] == 28


def test_a_torchvision_state_dict_runs_ptq_qat_a_mixed_plan_and_onnx(tmp_path, jpegs,
                                                                     torchvision_state_dict):
    """torchvision's own network (ImageNet strides, its key names) from a state dict file,
    on JPEGs of many sizes: post-training, QAT and a sensitivity plan all finish, every file
    reloads to the same logits and runs in ONNX Runtime."""
    res = tmp_path / "res"
    source = ["--checkpoint", str(torchvision_state_dict), "--data_dir", jpegs,
              "--results_dir", str(res), *QUICK]
    for extra in (["--weight_bits", "4", "--activation_bits", "8"],
                  ["--weight_bits", "4", "--activation_bits", "4", "--method", "qat",
                   "--qat_epochs", "1"],
                  ["--plan", "sensitivity", "--bitops_budget", "w4a8",
                   "--sensitivity_images", "32"]):
        r = run([*source, *extra], tmp_path)
        assert r.returncode == 0, r.stderr
    table = rows(res)
    assert table.status.tolist() == ["finished"] * 3
    assert table.method.tolist() == ["ptq", "qat", "ptq"]
    assert (table.roundtrip_max_abs_diff == 0.0).all()
    assert (table.eval_images == 36).all() and table.onnx_acc.notna().all()
    assert table.bitops.iloc[2] <= table.bitops.iloc[0]  # the plan within W4A8's BitOps
    for path in (res / "runs" / "models").glob("*.safetensors"):
        metadata, _ = read_quantized(str(path))
        assert metadata["arch"] == "imagenet" and float(metadata["width_multiplier"]) == 0.5
        assert metadata["source"] == str(torchvision_state_dict)
        props = {p.key: p.value for p in onnx.load(str(path.with_suffix(".onnx"))).metadata_props}
        assert props["source"] == metadata["source"] and props["preprocess"] == metadata[
            "preprocess"]


def test_state_dict_bitops_at_224_match_the_design_checks(tmp_path):
    """The BitOps table of a torchvision ImageNet state dict (width and classes read from its
    tensors) at 224x224, every layer at W8A8: shared/DESIGN.md's seed 003 figures."""
    path = save_torchvision_state_dict(tmp_path / "mobilenet_v2.pth")
    r = run(["--checkpoint", str(path), "--weight_bits", "8", "--activation_bits", "8",
             "--quantize_all", "--csv", str(tmp_path / "table.csv")], tmp_path,
            module="mobilenet_compression.bitops")
    assert r.returncode == 0, r.stderr
    assert "width 1, 1000 classes, input 3x224x224" in r.stdout
    table = {row["name"]: row for row in csv.DictReader(open(tmp_path / "table.csv"))}
    expected = {"features.0.0": (10_838_016, 693_633_024),
                "features.1.conv.1": (6_422_528, 411_041_792),
                "features.1.conv.0.0": (3_612_672, 231_211_008)}
    for layer, (macs, bitops) in expected.items():
        assert (int(table[layer]["macs"]), int(table[layer]["bitops"])) == (macs, bitops)


@pytest.fixture
def torch_home(tmp_path):
    """A torch hub cache holding a mobilenet_v2(weights=None) state dict under the file name of
    IMAGENET1K_V1 (torchvision checks the hash on download only, so a cached file loads)."""
    from torchvision.models import MobileNet_V2_Weights

    folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    save_torchvision_state_dict(folder / os.path.basename(MobileNet_V2_Weights.IMAGENET1K_V1.url))
    return tmp_path / "torch_home"


def test_torchvision_weights_by_name_from_the_hub_cache(tmp_path, torch_home, monkeypatch):
    """torchvision:IMAGENET1K_V1 loads through torchvision's weights API from torch's cache,
    with the preprocessing of its transforms(), and quantizes on an ImageNet-layout folder."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    ckpt, model = load_model("torchvision:IMAGENET1K_V1")
    assert (ckpt["dataset"], ckpt["num_classes"], ckpt["width_multiplier"]) == ("imagenet",
                                                                                 1000, 1.0)
    assert ckpt["preprocess"]["resize_size"] == 256 and ckpt["input_size"] == 224
    assert ckpt["preprocess"]["mean"] == (0.485, 0.456, 0.406)
    folder = write_jpeg_folder(str(tmp_path / "imagenet"), 1000, 2, 1)
    res = tmp_path / "res"
    r = run(["--checkpoint", "torchvision:IMAGENET1K_V1", "--dataset", "imagenet",
             "--data_dir", folder, "--max_eval_samples", "16", "--results_dir", str(res),
             *QUICK], tmp_path, TORCH_HOME=str(torch_home))
    assert r.returncode == 0, r.stderr
    row = rows(res).iloc[0]
    assert (row.status, row.eval_images, row.roundtrip_max_abs_diff) == ("finished", 16, 0.0)
    metadata, _ = read_quantized(str(next(res.rglob("*.safetensors"))))
    assert metadata["source"] == "torchvision:IMAGENET1K_V1"


def bad(tmp_path, args, **env):
    res = tmp_path / "res"
    r = run([*args, "--results_dir", str(res)], tmp_path, **env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not (res / "runs" / "runs.csv").exists()
    return lines[0]


def test_bad_sources_and_folders_are_one_line_each(tmp_path, jpegs, torchvision_state_dict,
                                                   torch_home):
    from torchvision.models import resnet18

    resnet = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), resnet)
    sd = ["--checkpoint", str(torchvision_state_dict)]
    assert "is not a MobileNetV2 state dict" in bad(tmp_path, ["--checkpoint", str(resnet),
                                                               "--data_dir", jpegs])
    assert "--num_classes is 5, but the classifier" in bad(
        tmp_path, [*sd, "--data_dir", jpegs, "--num_classes", "5"])
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    (flat / "val").mkdir()
    (flat / "train" / "a.jpg").write_bytes(b"")
    assert "has no class folders" in bad(tmp_path, [*sd, "--data_dir", str(flat)])
    assert "needs --data_dir" in bad(tmp_path, [*sd])
    assert "has no MobileNetV2 weights named 'IMAGENET1K_V9'" in bad(
        tmp_path, ["--checkpoint", "torchvision:IMAGENET1K_V9", "--data_dir", jpegs])
    assert "--dataset imagenet needs --data_dir" in bad(
        tmp_path, ["--checkpoint", "torchvision:IMAGENET1K_V1"], TORCH_HOME=str(torch_home))
    assert "has 3 class folders, but the model's classifier has 1000" in bad(
        tmp_path, ["--checkpoint", "torchvision:IMAGENET1K_V1", "--data_dir", jpegs],
        TORCH_HOME=str(torch_home))
    assert "is not in torch's cache and could not be downloaded" in bad(
        tmp_path, ["--checkpoint", "torchvision:IMAGENET1K_V2", "--data_dir", jpegs],
        TORCH_HOME=str(torch_home))


def test_an_unreadable_image_is_named(tmp_path, torchvision_state_dict):
    folder = write_jpeg_folder(str(tmp_path / "jpegs"), 3, 12, 4)
    broken = os.path.join(folder, "val", "class_0001", "0.jpg")
    with open(broken, "wb") as f:
        f.write(b"not a jpeg")
    line = bad(tmp_path, ["--checkpoint", str(torchvision_state_dict), "--data_dir", folder,
                          "--weight_bits", "8", "--activation_bits", "8", *QUICK])
    assert f"cannot read the image {broken}" in line


def test_a_state_dict_of_a_train_py_checkpoint_keeps_its_flags_apart(small_checkpoint):  # noqa: F811
    """A checkpoint of train.py knows its own data: state dict flags are refused, not mixed."""
    from mobilenet_compression.errors import UserError

    with pytest.raises(UserError, match="drop --dataset"):
        load_model(str(small_checkpoint), SourceOptions(dataset="imagefolder"))


def test_the_configuration_names_the_datasets_the_loaders_have():
    # config.py checks --dataset against source_options' names (no torch there); the tensor
    # datasets themselves are data.py's.
    assert TENSOR_DATASET_NAMES == tuple(DATASETS)


def test_folder_split_head_is_class_balanced_and_fixed(jpegs):
    ckpt = {"in_channels": 3, "preprocess": {"input_size": 32, "resize_size": 36,
                                             "mean": (0.5,), "std": (0.25,)}}
    info, train, val, test = load_image_folder("imagefolder", jpegs, preprocess_of(ckpt), 3)
    assert (len(train), len(val), len(test)) == (108, 12, 36)
    assert isinstance(train, FolderSplit) and train.name == "train"
    assert torch.bincount(val.labels).tolist() == [4, 4, 4]
    assert not set(p for p, _ in val.samples) & set(p for p, _ in train.samples)
    again = load_image_folder("imagefolder", jpegs, preprocess_of(ckpt), 3)[1]
    assert [p for p, _ in again.head(9).samples] == [p for p, _ in train.head(9).samples]
    x, y = next(iter(train.head(9).loader(info, 9)))
    assert x.shape == (9, 3, 32, 32) and torch.bincount(y).tolist() == [3, 3, 3]


@pytest.mark.parametrize("name", ["imagenet", "imagenet_plans"])
def test_the_imagenet_sweeps_are_valid_runs(name):
    """Every run of the ImageNet sweeps is a valid run configuration (they cannot run here:
    no ImageNet, no torchvision weights)."""
    from mobilenet_compression.config import RunConfig
    from mobilenet_compression.sweep.array import grid_runs
    from mobilenet_compression.sweep.sweep_file import load_sweep_config

    path = os.path.join(ROOT, "sweeps", f"{name}.yaml")
    runs = grid_runs(load_sweep_config(path), path)
    assert len(runs) == {"imagenet": 25, "imagenet_plans": 2}[name]
    for params in runs:
        config = RunConfig.from_dict(params)
        assert config.checkpoint == "torchvision:IMAGENET1K_V1" and config.dataset == "imagenet"


def test_an_offline_sweep_over_a_state_dict_and_an_image_folder(tmp_path, jpegs,
                                                                torchvision_state_dict):
    """A sweep yaml naming a state dict and an image folder runs through the offline agent
    like any other: one finished row per configuration."""
    import yaml

    sweep = tmp_path / "own.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "own", "program": os.path.join(ROOT, "sweep.py"), "method": "grid",
        "metric": {"name": "quant_acc", "goal": "maximize"},
        "parameters": {"weight_bits": {"values": [8, 4]}, "activation_bits": {"value": 8},
                       "checkpoint": {"value": str(torchvision_state_dict)},
                       "data_dir": {"value": jpegs}, "input_size": {"value": 64},
                       "calib_batches": {"value": 1}, "calib_batch_size": {"value": 32},
                       "workers": {"value": 1}},
        "command": ["${env}", "${interpreter}", "${program}", "${args}"]}))
    r = run(["--sweep", str(sweep), "--agents", "1", "--threads", "1",
             "--results_dir", str(tmp_path / "res")], tmp_path)
    assert r.returncode == 0, r.stderr
    (csv_path,) = (tmp_path / "res").glob("*/runs.csv")
    table = pd.read_csv(csv_path)
    assert sorted(table.weight_bits) == [4, 8] and (table.status == "finished").all()
    assert (table.eval_images == 36).all()
