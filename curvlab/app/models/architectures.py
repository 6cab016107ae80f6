"""Real architectures, written the way torchvision and timm write them (``resnet18``, ``vgg16-bn``,
``vit-tiny``, ``mobilenetv2``).

Residual ``out += identity``, in-place ReLUs, train-mode BatchNorm, ``AdaptiveAvgPool2d``,
``torch.flatten``, a cls token and position embedding held by the root module, attention from
``nn.Linear`` on ``[N, T, D]``: nothing is adapted to an extraction engine.  curvlab extracts them
with its autograd engine (with BackPACK and its graph converter where BackPACK covers the model,
e.g. the ResNet in eval mode); the BatchNorm, LayerNorm, cls-token and position-embedding
parameters, and MobileNetV2's depthwise convolutions, are parameter blocks, first order in the
optimizers.

Sizes are the published ones by default (ResNet-18 with the CIFAR stem: 11.2 M parameters on
CIFAR-10; VGG-16-BN with a 512-wide classifier: 15.0 M; ViT-Tiny, dim 192, depth 12, 3 heads,
patch 4: 5.4 M; MobileNetV2: 2.2 M); ``width``/``dim``/``depth`` shrink them for a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from curvlab.app.models.sequential import image_shape


# ----------------------------------------------------------------------- ResNet (torchvision)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3×3 convs with BatchNorm, ``out += identity``."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """ResNet with BasicBlocks and the CIFAR stem (3×3 conv, stride 1, no max-pool)."""

    def __init__(self, in_channels: int, num_classes: int, layers: tuple[int, ...] = (2, 2, 2, 2), width: int = 64) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages = [self._make_layer(width * 2**i, blocks, stride=1 if i == 0 else 2) for i, blocks in enumerate(layers)]
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 2 ** (len(layers) - 1), num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        out = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        out += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _resnet18(input_shape: tuple[int, ...], num_classes: int, width: int = 64) -> nn.Module:
    """ResNet-18 (CIFAR stem, BatchNorm); ``width`` is the first stage's channels."""
    c, _, _ = image_shape("resnet18", input_shape, min_side=8)
    return ResNet(c, num_classes, (2, 2, 2, 2), int(width))


def torchvision_init(model: nn.Module) -> None:
    """torchvision's initialisation of VGG and MobileNetV2: convolutions He-normal by
    their outputs, BatchNorm as the identity, Linear ``N(0, 0.01²)``, biases zero (as the ResNet's
    convolutions): a network measured at initialisation is the one the papers start from."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # (MobileNetV2's default: the same gain)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) and m.bias is not None:
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- VGG (torchvision)

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """torchvision's VGG with BatchNorm (``features`` as ``nn.Sequential``) and a CIFAR-sized
    classifier on the globally pooled features."""

    def __init__(self, features: nn.Sequential, channels: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(True), nn.Linear(hidden, num_classes))
        torchvision_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _vgg16_bn(input_shape: tuple[int, ...], num_classes: int, width: int = 64, hidden: int = 512) -> nn.Module:
    """VGG-16 with BatchNorm; ``width`` scales every stage (64 → 64, 128, 256, 512, 512)."""
    c, _, _ = image_shape("vgg16-bn", input_shape, min_side=32)
    layers: list[nn.Module] = []
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out = int(v) * int(width) // 64
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        c = out
    return VGG(nn.Sequential(*layers), c, num_classes, int(hidden) * int(width) // 64)


# ------------------------------------------------------------------ MobileNetV2 (torchvision)

#: (expansion t, channels c, blocks n, stride s) per stage; the CIFAR variant's second stage keeps
#: stride 1 (ImageNet's: 2), as its stem does, so 32×32 inputs end at 4×4.
MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: channels rounded to a multiple of 8, never 10% down."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv without bias, BatchNorm, in-place ReLU6."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *[nn.ReLU6(inplace=True)] * act)


class InvertedResidual(nn.Module):
    """torchvision's InvertedResidual: 1×1 expansion, 3×3 depthwise convolution (groups =
    channels), linear 1×1 projection, ``x + conv(x)`` where the shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [_conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 with the CIFAR strides; no dropout before the classifier (the
    CIFAR variant's), so a train-mode measurement depends on the batch alone."""

    def __init__(self, in_channels: int, num_classes: int, width: float) -> None:
        super().__init__()
        c = _divisible(32 * width)
        features: list[nn.Module] = [_conv_bn(in_channels, c, 3)]
        for t, channels, n, stride in MOBILENET_V2:
            out = _divisible(channels * width)
            for i in range(n):
                features.append(InvertedResidual(c, out, stride if i == 0 else 1, t))
                c = out
        last = _divisible(1280 * max(1.0, width))
        features.append(_conv_bn(c, last, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Linear(last, num_classes)
        torchvision_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def _mobilenet_v2(input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> nn.Module:
    """MobileNetV2 (CIFAR strides); ``width`` is torchvision's ``width_mult``."""
    c, _, _ = image_shape("mobilenetv2", input_shape, min_side=8)
    if not float(width) > 0:
        raise ValueError(f"model 'mobilenetv2': width must be > 0, got {width}")
    return MobileNetV2(c, num_classes, float(width))


# ------------------------------------------------------------------------------ ViT (timm)


class Attention(nn.Module):
    """timm's Attention (``qkv`` and ``proj`` as ``nn.Linear`` on ``[N, T, D]``), with the explicit
    softmax: CPU's fused attention backward has no vmap batching rule."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, ``x + mlp(norm(x))`` (GELU MLP)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm's VisionTransformer: conv patch embedding, cls token and position embedding as root
    parameters, pre-norm blocks, final LayerNorm, cls-token head."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, patch: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.patch_embed = nn.Conv2d(c, dim, kernel_size=patch, stride=patch)
        tokens = (h // patch) * (w // patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def _vit_tiny(
    input_shape: tuple[int, ...], num_classes: int, patch: int = 4, dim: int = 192, depth: int = 12, heads: int = 3
) -> nn.Module:
    """ViT-Tiny (dim 192, depth 12, 3 heads) on ``patch × patch`` patches."""
    c, h, w = image_shape("vit-tiny", input_shape, min_side=int(patch))
    if h % patch or w % patch or dim % heads:
        raise ValueError(f"model 'vit-tiny': {h}x{w} images need patch | H, W (patch={patch}) and heads | dim")
    return VisionTransformer((c, h, w), num_classes, int(patch), int(dim), int(depth), int(heads))


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": _resnet18,
    "vgg16-bn": _vgg16_bn,
    "vit-tiny": _vit_tiny,
    "mobilenetv2": _mobilenet_v2,
}
