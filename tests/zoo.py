"""Tiny float64 models the BackPACK engine cannot run, written the way torchvision/timm write them.

:data:`ZOO` maps a name to a model factory and an input factory; :func:`make` builds a model,
a batch and targets.  Sizes are minimal so that dense torch.func references stay
cheap.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.attention import kronecker_attention

CLASSES = 3


# --- ResNet (torchvision.models.resnet, shrunk) ---------------------------------------------

def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class TinyResNet(nn.Module):
    """Stem, one plain BasicBlock, one downsampling BasicBlock (1x1 conv + norm shortcut)."""

    def __init__(self, num_classes: int = CLASSES, width: int = 2,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d, in_channels: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(width, width, norm_layer=norm_layer)
        downsample = nn.Sequential(conv1x1(width, 2 * width, stride=2), norm_layer(2 * width))
        self.layer2 = BasicBlock(width, 2 * width, stride=2, downsample=downsample, norm_layer=norm_layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(2, channels)


# --- VGG (torchvision.models.vgg, shrunk) ----------------------------------------------------

def make_layers(cfg: list, batch_norm: bool = True, in_channels: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)] if batch_norm else [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


class TinyVGG(nn.Module):
    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.features = make_layers([3, "M", 4, "M"])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Linear(4, 5), nn.ReLU(True), nn.Linear(5, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# --- ViT (timm VisionTransformer, shrunk) -------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 2, fused: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int = 2, fused: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, fused)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int = 4, patch_size: int = 2, in_chans: int = 2, embed_dim: int = 4) -> None:
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # B, T, D


class TinyViT(nn.Module):
    """Patch embedding, cls token and position embedding on the root, one block, cls-token head."""

    def __init__(self, num_classes: int = CLASSES, embed_dim: int = 4, fused: bool = True) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(embed_dim=embed_dim)
        self.cls_token = nn.Parameter(0.1 * torch.randn(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.Sequential(Block(embed_dim, fused=fused))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0])


class TorchTransformer(nn.Module):
    """torch's own layers, batch-first: an ``nn.TransformerEncoderLayer`` (self-attention) on the
    patches, an ``nn.TransformerDecoderLayer`` (its learned queries' self-attention, then
    cross-attention to the encoder's output), their ``nn.MultiheadAttention`` modules converted
    by :func:`curvlab.kronecker_attention` (``cross=False``: the encoder alone)."""

    def __init__(self, num_classes: int = CLASSES, embed_dim: int = 4, cross: bool = True) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(embed_dim=embed_dim)
        layer = dict(d_model=embed_dim, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoderLayer(**layer)
        self.decoder = nn.TransformerDecoderLayer(**layer, norm_first=True) if cross else None
        self.queries = nn.Parameter(0.3 * torch.randn(1, 2, embed_dim)) if cross else None
        self.head = nn.Linear(embed_dim, num_classes)
        kronecker_attention(self)

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(self.patch_embed(x))
        if self.decoder is not None:
            h = self.decoder(self.queries.expand(x.shape[0], -1, -1), h)
        return self.head(h.mean(1))


class OddAttention(nn.Module):
    """Cross-attention with torch's less common options, converted: key and value of other widths
    (``kdim``, ``vdim``: separate q, k, v weights with one packed bias), ``add_bias_kv`` and
    ``add_zero_attn``."""

    def __init__(self, num_classes: int = CLASSES, embed_dim: int = 4) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(embed_dim=embed_dim)
        self.keys, self.values = nn.Linear(embed_dim, 3), nn.Linear(embed_dim, 5)
        self.attn = nn.MultiheadAttention(embed_dim, 2, kdim=3, vdim=5, add_bias_kv=True, add_zero_attn=True,
                                          batch_first=True)
        self.head = nn.Linear(embed_dim, num_classes)
        kronecker_attention(self)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch_embed(x)
        out, _ = self.attn(h, torch.tanh(self.keys(h)), self.values(h), need_weights=False)
        return self.head(out.mean(1))


# --- functional forward, tied weights, text --------------------------------------------------

class FunctionalMLP(nn.Module):
    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


class TiedMLP(nn.Module):
    """``shared`` is called twice: its weight is used at two depths."""

    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


class TextCNN(nn.Module):
    """Token ids ``[N, L]`` → Embedding → Conv1d over time → max over time → Linear."""

    def __init__(self, vocab: int = 6, dim: int = 3, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=0)
        self.conv = nn.Conv1d(dim, 4, kernel_size=3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embedding(ids).transpose(1, 2)  # N, dim, L
        x = F.relu(self.conv(x))
        x = x.amax(dim=-1)
        return self.fc(x)


class TinyTagger(nn.Module):
    """Per-token classification: logits ``[N, C, T]`` for ``nn.CrossEntropyLoss`` with ``[N, T]``
    targets; attention mixes the tokens of an example."""

    def __init__(self, vocab: int = 5, dim: int = 4, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.block = Block(dim, fused=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.block(self.embedding(ids))
        return self.head(x).transpose(1, 2)


class TiedLM(nn.Module):
    """A language model whose decoder is tied to its embedding (``decoder.weight =
    encoder.weight``, as GPT-2 and PyTorch's word_language_model): per-token logits over the
    vocabulary, ``[N, V, T]``; the tied matrix is one parameter block, the decoder's bias another."""

    def __init__(self, vocab: int = 5, dim: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, dim)
        self.h = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = self.encoder.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.decoder(self.norm(torch.tanh(self.h(self.encoder(ids))))).transpose(1, 2)


class TiedBiasMLP(nn.Module):
    """Two layers sharing their bias (``b.bias = a.bias``): the bias is a parameter block, each
    layer's Kronecker block its weight alone."""

    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(num_classes, num_classes), nn.Linear(num_classes, num_classes)
        self.b.bias = self.a.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


class TinyVolumeNet(nn.Module):
    """Conv3d on ``[N, 2, 3, 3, 3]`` volumes, strided and padded, then a Linear head."""

    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 2, kernel_size=2, stride=(1, 2, 1), padding=(0, 1, 0))
        self.fc = nn.Linear(2 * 2 * 2 * 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(torch.sigmoid(self.conv(x)), 1))


class TinyUNet(nn.Module):
    """A U-Net's down and up path on ``[N, 2, 4, 4]`` images: a strided convolution, a transposed
    one back up (stride, padding, output_padding) joined with the skip connection, a 1-D transposed
    convolution with dilation and no bias, then a Linear head."""

    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.down = nn.Conv2d(2, 3, 3, stride=2, padding=1)  # → 3×2×2
        self.up = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)  # → 2×4×4
        self.line = nn.ConvTranspose1d(4, 2, 2, stride=2, dilation=2, bias=False)  # 16 → 2×33
        self.fc = nn.Linear(66, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([x, torch.tanh(self.up(torch.tanh(self.down(x))))], 1)  # 4×4×4
        return self.fc(torch.sigmoid(self.line(h.flatten(2))).flatten(1))


class TinyMobileNet(nn.Module):
    """MobileNetV2's inverted residual (torchvision's, shrunk): 1×1 expansion, 3×3 depthwise
    convolution (groups = channels), linear 1×1 projection, ``x + conv(x)``; then ResNeXt's
    grouped 3×3 convolution (groups=2, strided, with a bias) before the head."""

    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()

        def conv_bn(cin: int, cout: int, kernel: int, groups: int = 1, act: bool = True) -> nn.Sequential:
            layers = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
            return nn.Sequential(*layers, *[nn.ReLU6(inplace=True)] * act)

        self.stem = conv_bn(2, 2, 3)
        self.expand, self.depthwise, self.project = conv_bn(2, 4, 1), conv_bn(4, 4, 3, groups=4), conv_bn(4, 2, 1, act=False)
        self.grouped = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = x + self.project(self.depthwise(self.expand(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.grouped(x), 1), 1))


def _images(n: int, channels: int, size: int, gen: torch.Generator) -> Tensor:
    return torch.randn(n, channels, size, size, generator=gen, dtype=torch.float64)


def _tokens(n: int, length: int, vocab: int, gen: torch.Generator) -> Tensor:
    return torch.randint(0, vocab, (n, length), generator=gen)


#: name → (model factory, input factory ``(n, generator) → inputs``).
ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[int, torch.Generator], Tensor]]] = {
    "resnet_bn": (TinyResNet, lambda n, g: _images(n, 2, 4, g)),
    "resnet_gn": (partial(TinyResNet, norm_layer=group_norm), lambda n, g: _images(n, 2, 4, g)),
    "vgg_bn": (TinyVGG, lambda n, g: _images(n, 2, 4, g)),
    "vit": (TinyViT, lambda n, g: _images(n, 2, 4, g)),
    "torch_transformer": (TorchTransformer, lambda n, g: _images(n, 2, 4, g)),
    "torch_encoder": (partial(TorchTransformer, cross=False), lambda n, g: _images(n, 2, 4, g)),
    "odd_attention": (OddAttention, lambda n, g: _images(n, 2, 4, g)),
    "functional_mlp": (FunctionalMLP, lambda n, g: torch.randn(n, 2, 3, generator=g, dtype=torch.float64)),
    "tied": (TiedMLP, lambda n, g: torch.randn(n, 3, generator=g, dtype=torch.float64)),
    "textcnn": (TextCNN, lambda n, g: _tokens(n, 5, 6, g)),
    "tagger": (TinyTagger, lambda n, g: _tokens(n, 3, 5, g)),
    "tied_lm": (TiedLM, lambda n, g: _tokens(n, 3, 5, g)),
    "tied_bias": (TiedBiasMLP, lambda n, g: torch.randn(n, CLASSES, generator=g, dtype=torch.float64)),
    "mobilenet": (TinyMobileNet, lambda n, g: _images(n, 2, 4, g)),
    "conv3d": (TinyVolumeNet, lambda n, g: torch.randn(n, 2, 3, 3, 3, generator=g, dtype=torch.float64)),
    "unet": (TinyUNet, lambda n, g: _images(n, 2, 4, g)),
}


def oracle(model: nn.Module) -> nn.Module:
    """A copy computing the same function whose train-mode BatchNorms keep no running statistics
    (same batch statistics, no in-place buffer update, which torch.func refuses); the model
    itself when it has none (torch.nn.utils.weight_norm's module cannot be copied)."""
    if not any(isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.training for bn in model.modules()):
        return model
    m = copy.deepcopy(model)
    for bn in m.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.training:
            bn.track_running_stats = False
            bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    return m


def make(name: str, n: int = 3, seed: int = 0, loss_fn: nn.Module | None = None) -> tuple[nn.Module, Tensor, Tensor]:
    """Model (float64, train mode), inputs and targets for ``loss_fn`` (default CE)."""
    model_fn, input_fn = ZOO[name]
    torch.manual_seed(seed)
    model = model_fn().double().train()
    gen = torch.Generator().manual_seed(seed + 1)
    x = input_fn(n, gen)
    with torch.no_grad():
        shape = model(x).shape  # (a train-mode forward: BatchNorm running statistics move once)
    if isinstance(loss_fn, nn.MSELoss):
        y = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif isinstance(loss_fn, nn.BCEWithLogitsLoss):
        y = torch.rand(shape, generator=gen, dtype=torch.float64)
    else:
        y = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=gen)
    return model, x, y
