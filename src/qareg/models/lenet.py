"""LeNet-5 (LeCun et al., 1998) with ReLU and max pooling."""

from __future__ import annotations

from torch import Tensor, nn

from qareg.models.registry import check_args, feature_count, register_model


@register_model("lenet5")
class LeNet5(nn.Module):
    """Two 5x5 convolutions and three fully connected layers."""

    # size s -> s (padded conv) -> s//2 -> s//2 - 4 -> (s//2 - 4)//2 >= 1 needs s >= 12
    min_input_size = 12

    def __init__(self, num_classes: int, in_channels: int, input_size: int) -> None:
        super().__init__()
        check_args(num_classes, in_channels, input_size, self.min_input_size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        n = feature_count(self.features, in_channels, input_size)  # 16*5*5 at 28 and 32
        self.classifier = nn.Sequential(
            nn.Linear(n, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))  # (B, C, H, W) -> (B, num_classes)


@register_model("lenet5-caffe")
class LeNet5Caffe(nn.Module):
    """The wider LeNet-5 of Caffe's MNIST example (20 and 50 filters, 500 hidden units): the
    usual small network of compression papers (Han et al. 2016, Ullrich et al. 2017)."""

    # s -> s - 4 -> (s - 4)//2 -> (s - 4)//2 - 4 -> ((s - 4)//2 - 4)//2 >= 1 needs s >= 16
    min_input_size = 16

    def __init__(self, num_classes: int, in_channels: int, input_size: int) -> None:
        super().__init__()
        check_args(num_classes, in_channels, input_size, self.min_input_size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        n = feature_count(self.features, in_channels, input_size)  # 50*4*4 at 28, 50*5*5 at 32
        self.classifier = nn.Sequential(
            nn.Linear(n, 500),
            nn.ReLU(inplace=True),
            nn.Linear(500, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))  # (B, C, H, W) -> (B, num_classes)
