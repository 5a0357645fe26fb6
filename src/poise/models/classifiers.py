"""Tiny classifiers for the digits streams, built from a config; registered as kind ``model``.
(Old path: ``poise.tasks.models``, still importable.)"""

from __future__ import annotations

import torch
from torch import nn

from poise._registry import register

__all__ = ["CNN", "MLP", "build_model"]


@register("model", "mlp")
class MLP(nn.Module):
    """``in -> hidden -> hidden -> n_classes`` with ReLU; flattens its input."""

    def __init__(self, in_features: int = 64, n_classes: int = 10, hidden: int = 256, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        layers.append(nn.Linear(d, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register("model", "cnn")
class CNN(nn.Module):
    """Two 3x3 conv layers (``hidden // 8`` and ``hidden // 4`` channels) on 8x8 inputs,
    a max-pool, then a linear head."""

    def __init__(self, in_features: int = 64, n_classes: int = 10, hidden: int = 256, depth: int = 2):
        super().__init__()
        c1, c2 = max(4, hidden // 8), max(8, hidden // 4)
        self.side = int(round(in_features**0.5))
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
        )
        self.head = nn.Linear(c2 * (self.side // 2) ** 2, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(len(x), 1, self.side, self.side)))


def build_model(name: str, in_features: int, n_classes: int, hidden: int = 256, depth: int = 2) -> nn.Module:
    from poise._registry import get

    return get("model", name)(in_features=in_features, n_classes=n_classes, hidden=hidden, depth=depth)
