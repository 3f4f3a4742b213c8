"""MobileNetV2 for small (32x32 / 28x28) images, built on torchvision's MobileNetV2 class.

The ImageNet network downsamples 32x; on 32x32 inputs that leaves a 1x1 map. The CIFAR
variant (as in most CIFAR MobileNetV2 code) sets the stem stride and the second
stage's stride to 1, so the last feature map is 4x4. At width 1.0 and 3 input channels this
is 87,976,448 MACs per 32x32 image.
"""

from torch import nn
from torchvision.models import MobileNetV2

# t (expansion), c (channels), n (repeats), s (stride) -- torchvision's table with the second
# stage's stride changed from 2 to 1.
CIFAR_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


def mobilenet_v2_cifar(num_classes=10, width_multiplier=1.0, in_channels=3):
    """torchvision's MobileNetV2 with the CIFAR strides, `in_channels` input planes."""
    model = MobileNetV2(
        num_classes=num_classes,
        width_mult=width_multiplier,
        inverted_residual_setting=CIFAR_SETTING,
    )
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(
        in_channels, stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False
    )
    nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    return model


def mobilenet_v2_imagenet(num_classes=1000, width_multiplier=1.0):
    """torchvision's ImageNet MobileNetV2 (the usual ImageNet setting), randomly initialised."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_multiplier)


def build_model(arch="cifar", num_classes=10, width_multiplier=1.0, in_channels=3):
    if arch == "cifar":
        return mobilenet_v2_cifar(num_classes, width_multiplier, in_channels)
    if arch == "imagenet":
        if in_channels != 3:
            raise ValueError("the ImageNet MobileNetV2 takes 3 input channels")
        return mobilenet_v2_imagenet(num_classes, width_multiplier)
    raise ValueError(f"unknown arch {arch!r}")


def first_conv_name(model):
    """Name of the stem conv, which stays FP32."""
    return "features.0.0"


def classifier_name(model):
    """Name of the final Linear, which stays FP32."""
    return "classifier.1"
