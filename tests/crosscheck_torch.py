"""PyTorch ports of the paper's LeNet and CIFAR-10-quick holding our weights, for cross-checks against reference
implementations written for PyTorch (torchattacks' AutoAttack). Inputs are [N, C, H, W] in 0..1 (torchattacks'
convention); the ports multiply by 255 and then preprocess exactly as bang_jax.models does in pixel units."""

import math

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812


def _pool(x, window, stride, kind):
    """Caffe pooling: ceil-mode output size; average pooling divides border windows by their in-image size."""
    h, w = x.shape[-2:]
    ph = max(0, (math.ceil((h - window) / stride)) * stride + window - h)
    pw = max(0, (math.ceil((w - window) / stride)) * stride + window - w)
    if kind == "max":
        return F.max_pool2d(F.pad(x, (0, pw, 0, ph), value=-math.inf), window, stride)
    total = F.avg_pool2d(F.pad(x, (0, pw, 0, ph)), window, stride, divisor_override=1)
    ones = F.pad(torch.ones_like(x[:1, :1]), (0, pw, 0, ph))
    return total / F.avg_pool2d(ones, window, stride, divisor_override=1)


def _conv(p):
    return torch.tensor(np.transpose(np.asarray(p["kernel"]), (3, 2, 0, 1)).copy()), torch.tensor(np.asarray(p["bias"]))


def _dense(p):
    return torch.tensor(np.asarray(p["kernel"]).T.copy()), torch.tensor(np.asarray(p["bias"]))


class TorchLeNet(torch.nn.Module):
    def __init__(self, params):
        super().__init__()
        self.w = {k: _conv(params[k]) for k in ("conv1", "conv2")} | {k: _dense(params[k]) for k in ("ip1", "ip2")}

    def forward(self, x):
        x = x * 255.0 * 0.00390625
        x = _pool(F.conv2d(x, *self.w["conv1"]), 2, 2, "max")
        x = _pool(F.conv2d(x, *self.w["conv2"]), 2, 2, "max")
        x = F.relu(F.linear(x.flatten(1), *self.w["ip1"]))
        return F.linear(x, *self.w["ip2"])


class TorchCifarQuick(torch.nn.Module):
    def __init__(self, variables):
        super().__init__()
        params = variables["params"]
        self.w = {k: _conv(params[k]) for k in ("conv1", "conv2", "conv3")} | {
            k: _dense(params[k]) for k in ("ip1", "ip2")}
        self.mean = torch.tensor(np.transpose(np.asarray(variables["constants"]["mean_image"]), (2, 0, 1)).copy())

    def forward(self, x):
        x = x * 255.0 - self.mean[None]
        x = _pool(F.conv2d(x, *self.w["conv1"], padding=2), 3, 2, "max")
        x = F.relu(x)
        x = _pool(F.relu(F.conv2d(x, *self.w["conv2"], padding=2)), 3, 2, "avg")
        x = _pool(F.relu(F.conv2d(x, *self.w["conv3"], padding=2)), 3, 2, "avg")
        x = F.linear(x.flatten(1), *self.w["ip1"])
        return F.linear(x, *self.w["ip2"])
