"""A small ResNet for 8×8 inputs: BatchNorm, identity and projection shortcuts."""

from __future__ import annotations

from torch import Tensor, nn


class BasicBlock(nn.Module):
    """``relu(x + bn(conv(relu(bn(conv(x))))))``; a 1×1 projection when the shape changes.

    A block without projection maps its input to an output of the same shape, so it can be
    removed as a whole (replaced by the identity) by structured pruning.
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.shortcut(x) + self.bn2(self.conv2(out)))


class ResNet(nn.Module):
    """A stem, stages of basic blocks, a global average pool and a linear classifier.

    With ``downsample`` each stage after the first halves the resolution (strided first
    block); without it every stage keeps the input's resolution, which suits inputs as small
    as 8×8.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: tuple[int, ...] = (32, 64),
        blocks_per_stage: int = 2,
        classes: int = 10,
        downsample: bool = True,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages, channels = [], widths[0]
        for i, width in enumerate(widths):
            stride = 2 if downsample and i > 0 else 1
            blocks = [BasicBlock(channels, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))
