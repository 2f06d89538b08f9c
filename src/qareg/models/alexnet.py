"""AlexNet (Krizhevsky et al., 2012) in its common small-image (CIFAR) form."""

from __future__ import annotations

from torch import Tensor, nn

from qareg.models.registry import check_args, feature_count, register_model


@register_model("alexnet")
class AlexNet(nn.Module):
    """Five 3x3 convolutions (the first with stride 2) and three fully connected layers."""

    # size s -> ceil(s/2) (stride-2 conv) -> three halvings by pooling; ceil(s/2) >= 8 needs s >= 15
    min_input_size = 15

    def __init__(self, num_classes: int, in_channels: int, input_size: int) -> None:
        super().__init__()
        check_args(num_classes, in_channels, input_size, self.min_input_size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 192, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        n = feature_count(self.features, in_channels, input_size)  # 256*1*1 at 28, 256*2*2 at 32
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(n, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))  # (B, C, H, W) -> (B, num_classes)
