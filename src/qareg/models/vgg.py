"""VGG (Simonyan and Zisserman, 2015) with batch norm, in its small-image (CIFAR) form."""

from __future__ import annotations

from torch import Tensor, nn

from qareg.models.registry import check_args, feature_count, init_conv_bn, register_model

# Output channels of each 3x3 conv + BN + ReLU; "M" is a 2x2 max pool.
CFGS: dict[str, list[int | str]] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
}  # fmt: skip


def make_layers(cfg: list[int | str], in_channels: int) -> nn.Sequential:
    """Conv3x3 (no bias) + BatchNorm + ReLU per int in `cfg`, ceil-mode max pool per "M"."""
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            # ceil_mode: 28 -> 14 -> 7 -> 4 -> 2 -> 1, so 28x28 input also ends at 1x1
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            assert isinstance(v, int), f"bad layer spec {v!r}"
            layers += [nn.Conv2d(in_channels, v, 3, padding=1, bias=False),
                       nn.BatchNorm2d(v), nn.ReLU(inplace=True)]  # fmt: skip
            in_channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG features from a layer list, then flatten and one linear classifier."""

    # ceil-mode pooling never shrinks a side below 1, so any size works
    min_input_size = 1

    def __init__(
        self, cfg: list[int | str], num_classes: int, in_channels: int, input_size: int
    ) -> None:
        super().__init__()
        check_args(num_classes, in_channels, input_size, self.min_input_size)
        self.features = nn.Sequential(make_layers(cfg, in_channels), nn.Flatten())
        n = feature_count(self.features, in_channels, input_size)  # 512*1*1 at 28 and 32
        self.classifier = nn.Linear(n, num_classes)
        init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))  # (B, C, H, W) -> (B, num_classes)


@register_model("vgg16")
def vgg16(num_classes: int, in_channels: int, input_size: int) -> VGG:
    """VGG16-BN: 13 convolutions, about 14.7 M parameters at 3x32x32."""
    return VGG(CFGS["vgg16"], num_classes, in_channels, input_size)
