"""A small four-convolution CNN with batch norm, for quick CPU experiments."""

from __future__ import annotations

from torch import Tensor, nn

from qareg.models import check_args, feature_count, register_model


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


@register_model("cnn4")
class CNN4(nn.Module):
    """Two blocks of two 3x3 conv + BN + ReLU, each followed by a max pool; two linear layers."""

    # two floor halvings: s // 4 >= 1 needs s >= 4
    min_input_size = 4

    def __init__(self, num_classes: int, in_channels: int, input_size: int) -> None:
        super().__init__()
        check_args(num_classes, in_channels, input_size, self.min_input_size)
        self.features = nn.Sequential(
            *conv_bn_relu(in_channels, 32),
            *conv_bn_relu(32, 32),
            nn.MaxPool2d(2),
            *conv_bn_relu(32, 64),
            *conv_bn_relu(64, 64),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        n = feature_count(self.features, in_channels, input_size)  # 64*7*7 at 28, 64*8*8 at 32
        self.classifier = nn.Sequential(
            nn.Linear(n, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))  # (B, C, H, W) -> (B, num_classes)
