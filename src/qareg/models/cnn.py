"""A small four-convolution CNN with batch norm, for quick CPU experiments (the demo's)."""

from __future__ import annotations

from torch import Tensor, nn

from qareg.models.registry import check_args, feature_count, init_conv_bn, register_model


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


@register_model("cnn4")
class CNN4(nn.Module):
    """Four 3x3 conv + BN + ReLU (32, 32, 64, 64 channels) with a max pool after the first and
    the third, global average pooling and one linear layer.

    Pooling early keeps a CPU epoch of Fashion-MNIST near half a minute; the small linear
    head leaves almost all weights in convolutions followed by batch norm.
    """

    # two floor halvings: s // 4 >= 1 needs s >= 4
    min_input_size = 4

    def __init__(self, num_classes: int, in_channels: int, input_size: int) -> None:
        super().__init__()
        check_args(num_classes, in_channels, input_size, self.min_input_size)
        self.features = nn.Sequential(
            *conv_bn_relu(in_channels, 32),  # (B, 32, s, s)
            nn.MaxPool2d(2),  # (B, 32, s/2, s/2)
            *conv_bn_relu(32, 32),
            *conv_bn_relu(32, 64),
            nn.MaxPool2d(2),  # (B, 64, s/4, s/4)
            *conv_bn_relu(64, 64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, 64)
        )
        n = feature_count(self.features, in_channels, input_size)  # 64 at every size
        self.classifier = nn.Sequential(nn.Linear(n, num_classes))
        init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))  # (B, C, H, W) -> (B, num_classes)
