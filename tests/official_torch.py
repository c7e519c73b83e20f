"""An independent NCHW PyTorch version of the official DDF-ResNet modules, for tests only.

It mirrors the official PyTorch module structure and parameter names (the
timm ResNet with the official `DDFPack` as the bottleneck's conv2), so its
`state_dict()` has the official keys. The DDF op is written from its
definition with `torch.nn.functional.unfold` instead of the official CUDA
kernel, so it runs on CPU:

    out[b, c, i, j] = sum_t x[b, c, i*s + (ky - r)*d, j*s + (kx - r)*d]
                            * comb(spatial[b, g(c)*K + t, i, j], channel[b, c, ky, kx])

with t = ky*k + kx, r = (k - 1) // 2 and zero padding. FilterNorm uses the
official unbiased std and `std + 1e-10`. Output sizes are ceil(H / s), which
equals the official floor(H / s) for the even sizes the official op accepts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def ddf_unfold(x, channel_filter, spatial_filter, kernel_size, dilation=1, stride=1, combine="mul"):
    """The DDF op in NCHW.

    Args:
        x: (B, C, H, W).
        channel_filter: (B, C, k, k).
        spatial_filter: (B, G*K, Ho, Wo), K = k*k, channel g*K + t = tap t of head g.
        kernel_size, dilation, stride: k, d, s.
        combine: "mul" or "add".

    Returns:
        (B, C, Ho, Wo), Ho = ceil(H / s).
    """
    b, c, h, w = x.shape
    k = kernel_size
    taps = k * k
    r = (k - 1) // 2
    heads = spatial_filter.shape[1] // taps
    out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
    # unfold: (B, C*K, L) with row c*K + t, t = ky*k + kx.
    patches = F.unfold(x, k, dilation=dilation, padding=r * dilation, stride=stride)
    patches = patches.reshape(b, heads, c // heads, taps, out_h, out_w)
    spatial = spatial_filter.reshape(b, heads, 1, taps, out_h, out_w)
    channel = channel_filter.reshape(b, heads, c // heads, taps, 1, 1)
    weight = spatial * channel if combine == "mul" else spatial + channel
    return (patches * weight).sum(dim=3).reshape(b, c, out_h, out_w)


class FilterNorm(nn.Module):
    """The official FilterNorm (no learnable mean)."""

    def __init__(self, in_channels, kernel_size, filter_type, nonlinearity="linear", running_std=False):
        super().__init__()
        self.in_channels = in_channels
        self.filter_type = filter_type
        self.running_std = running_std
        gain = {"linear": 1.0, "relu": math.sqrt(2.0)}[nonlinearity]
        scale = gain / kernel_size
        if running_std:
            self.std = nn.Parameter(torch.randn(in_channels * kernel_size**2) * scale)
        else:
            self.std = scale

    def forward(self, x):
        if self.filter_type == "spatial":
            b, channels, h, w = x.shape
            f = x.reshape(b, self.in_channels, -1, h, w)
            f = (f - f.mean(dim=2, keepdim=True)) / (f.std(dim=2, keepdim=True) + 1e-10)
            f = f.reshape(b, channels, h, w)
            return f * (self.std[None, :, None, None] if self.running_std else self.std)
        b = x.shape[0]
        f = x.reshape(b, self.in_channels, -1)
        f = (f - f.mean(dim=2, keepdim=True)) / (f.std(dim=2, keepdim=True) + 1e-10)
        f = f.reshape(b, -1)
        return f * (self.std[None, :] if self.running_std else self.std)


class DDFPack(nn.Module):
    """The official DDF module: spatial branch (.0 conv, .1 norm) and channel branch (.1, .3 convs, .4 norm)."""

    def __init__(self, in_channels, kernel_size=3, stride=1, dilation=1, head=1, se_ratio=0.2,
                 nonlinearity="relu", kernel_combine="mul"):
        super().__init__()
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.head, self.kernel_combine = head, kernel_combine
        taps = kernel_size**2
        mid = int(in_channels * se_ratio)
        self.spatial_branch = nn.Sequential(
            nn.Conv2d(in_channels, head * taps, 1, stride=stride),
            FilterNorm(head, kernel_size, "spatial", nonlinearity),
        )
        self.channel_branch = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Conv2d(in_channels, mid, 1),
            nn.ReLU(True),
            nn.Conv2d(mid, in_channels * taps, 1),
            FilterNorm(in_channels, kernel_size, "channel", nonlinearity, running_std=True),
        )

    def forward(self, x):
        b, c, _, _ = x.shape
        k = self.kernel_size
        channel_filter = self.channel_branch(x).reshape(b, c, k, k)
        spatial_filter = self.spatial_branch(x)
        return ddf_unfold(x, channel_filter, spatial_filter, k, self.dilation, self.stride, self.kernel_combine)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, conv2="conv"):
        super().__init__()
        assert conv2 == "conv"
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, conv2="conv"):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        if conv2 == "conv":
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        else:
            self.conv2 = DDFPack(width, 3, stride=stride, kernel_combine=conv2.split("_")[1])
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + shortcut)


class ResNet(nn.Module):
    """timm's ResNet (v1.5) with an optional DDF conv2 and an optional CIFAR stem (3x3, no max pool)."""

    def __init__(self, block, layers, num_classes=1000, in_chans=3, widths=(64, 128, 256, 512),
                 stem="imagenet", stem_width=64, conv2="conv"):
        super().__init__()
        block_cls = Bottleneck if block == "bottleneck" else BasicBlock
        self.stem = stem
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        inplanes = stem_width
        self.num_stages = len(layers)
        for i, (depth, planes) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                downsample = None
                if stride != 1 or inplanes != planes * block_cls.expansion:
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, planes * block_cls.expansion, 1, stride, bias=False),
                        nn.BatchNorm2d(planes * block_cls.expansion),
                    )
                blocks.append(block_cls(inplanes, planes, stride, downsample, conv2))
                inplanes = planes * block_cls.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(inplanes, num_classes)

    def forward_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            x = F.max_pool2d(x, 3, 2, 1)
        features = {"stem": x}
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
            features[f"stage{i + 1}"] = x
        return features

    def forward(self, x):
        features = self.forward_features(x)
        return self.fc(features[f"stage{self.num_stages}"].mean(dim=(2, 3)))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fills every parameter and BatchNorm buffer with random values that keep activations O(1).

    Conv weights: normal with std sqrt(1 / fan_in); BatchNorm weight in [0.5, 1.5], bias,
    running mean ~ N(0, 0.1^2), running var in [0.5, 2]; biases ~ N(0, 0.1^2); FilterNorm std
    ~ N(0, (sqrt(2) / 3)^2).
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=generator) * std

    def uniform(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=generator)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(normal(module.weight.shape, 1.0 / math.sqrt(fan_in)))
                if module.bias is not None:
                    module.bias.copy_(normal(module.bias.shape, 0.1))
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(uniform(module.weight.shape, 0.5, 1.5))
                module.bias.copy_(normal(module.bias.shape, 0.1))
                module.running_mean.copy_(normal(module.running_mean.shape, 0.1))
                module.running_var.copy_(uniform(module.running_var.shape, 0.5, 2.0))
                module.num_batches_tracked.fill_(7)
            elif isinstance(module, FilterNorm) and module.running_std:
                module.std.copy_(normal(module.std.shape, math.sqrt(2.0) / 3.0))
    return model
