"""One quantization run, as a real subprocess: the same configuration on the same checkpoint
gives the same model, whatever ran before it."""

from tests.test_qat import QUICK, small_checkpoint, sweep_py  # noqa: F401  (a fixture)


def test_same_configuration_gives_the_same_file_with_or_without_the_baseline_cache(
        tmp_path, small_checkpoint):  # noqa: F811
    """The first run of a sweep measures the FP32 baseline, later ones read it from
    baseline_acc.json. Measuring it used to convert the FP32 model to channels_last before
    quantization, so the two kinds of run calibrated with differently laid-out weights,
    whose convolutions round differently: activation scales moved by an ulp in some layers,
    enough to move accuracy by a few test images (the 75.02 / 75.05 pair of issue 7)."""
    res = tmp_path / "res"
    args = ["--checkpoint", str(small_checkpoint), "--weight_bits", "8", "--activation_bits",
            "8", "--results_dir", str(res), "--wandb_mode", "disabled", *QUICK]
    first = sweep_py(args, tmp_path)  # measures the baseline
    second = sweep_py(args, tmp_path)  # reads it from the cache
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert (res / "runs" / "baseline_acc.json").exists()
    files = sorted((res / "runs" / "models").glob("*.safetensors"))
    assert len(files) == 2
    assert files[0].read_bytes() == files[1].read_bytes()
