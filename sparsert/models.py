"""Reference architectures used by the bench, the demo and the tests (no weights, no downloads)."""
from __future__ import annotations

import torchvision
from torch import nn


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision ResNet18 adapted to 32x32 inputs: 3x3 stride-1 stem, no max-pool."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def mlp(sizes=(1024, 4096, 4096, 1000)) -> nn.Sequential:
    """Linear-ReLU stack, e.g. the bench's 1024-4096-4096-1000 or the tutorials' 784-256-128-10."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
