"""The two networks of the MAML paper, a batch norm that is safe under ``vmap``, and the task loss.

* :class:`SinusoidMLP` — 1-40-40-1 ReLU network for sinusoid regression.
* :class:`ConvNet` — four blocks of 3×3 convolution (64 filters), batch norm and ReLU, each
  halving the image (2×2 max pooling, or a stride-2 convolution), then a linear N-way head; for
  28×28×1 Omniglot images. :func:`finn_omniglot_net` builds it as Finn et al.'s reference code
  does for Omniglot: strided convolutions, a spatial mean, batch norm with a shift only, Xavier
  initialisation; :func:`rajeswaran_omniglot_net` as Rajeswaran et al.'s iMAML code does:
  strided convolutions whose maps are flattened into the head, batch norm with scale and shift.
* :class:`CompositeBatchNorm2d` — batch norm written with elementary tensor operations.
  ``nn.BatchNorm2d`` goes through a fused kernel whose ``vmap`` rule gives *wrong second-order
  gradients*: with ``track_running_stats=False`` the MAML meta-gradient computed as
  ``grad(lambda p: vmap(task_loss)(p, ...).sum())`` differs from a per-task loop by about 1%
  (we measured 0.96% relative error in float64 on torch 2.14 CPU). Written out by hand, autograd
  differentiates plain means and variances and the batched result matches the loop to 1e-15.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from gbml.errors import check_positive_integer
from gbml.params import Params


class CompositeBatchNorm2d(nn.Module):
    """Batch norm over (N, H, W) for each channel, always with the batch's own statistics.

    This is the transductive batch norm MAML uses: statistics come from the images at hand (the
    support set while adapting, the query set when evaluating), and no running averages are kept,
    so there is no state for ``functional_call`` or ``vmap`` to mishandle.

    With ``scale=False`` there is no learned scale γ, only the shift β (TensorFlow's
    ``batch_norm`` default, which the MAML reference code uses).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.register_parameter("weight", nn.Parameter(torch.ones(num_channels)) if scale else None)
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        x_hat = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            x_hat = x_hat * self.weight.view(1, -1, 1, 1)
        return x_hat + self.bias.view(1, -1, 1, 1)


class UnfoldConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same results) computed as im2col followed by a matrix product.

    Under ``vmap`` with a different weight per task, a native convolution becomes a grouped
    convolution, which GPUs run far below their matrix-multiply rate. Written as ``unfold`` and
    ``@``, the per-task weights turn it into one batched matrix product instead. Supports the
    options the conv nets use (any stride, no dilation, one group, zero padding).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.dilation != (1, 1) or self.groups != 1 or self.padding_mode != "zeros":
            raise ValueError("UnfoldConv2d supports dilation 1, one group and zero padding only")

    def forward(self, x: Tensor) -> Tensor:
        n, _, height, width = x.shape
        columns = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # (n, C·k·k, H'·W')
        out = self.weight.reshape(self.out_channels, -1) @ columns
        if self.bias is not None:
            out = out + self.bias.reshape(-1, 1)
        (pad_h, pad_w), (k_h, k_w), (s_h, s_w) = self.padding, self.kernel_size, self.stride
        out_height = (height + 2 * pad_h - k_h) // s_h + 1
        out_width = (width + 2 * pad_w - k_w) // s_w + 1
        return out.reshape(n, self.out_channels, out_height, out_width)


class SinusoidMLP(nn.Module):
    """The sinusoid regressor of Finn et al. (2017): 1 → 40 → 40 → 1 with ReLU."""

    def __init__(self, hidden: tuple[int, ...] = (40, 40)) -> None:
        super().__init__()
        widths = (1, *hidden)
        layers: list[nn.Module] = []
        for fan_in, fan_out in pairwise(widths):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[-1] != 1:
            raise ValueError(f"SinusoidMLP expects inputs of shape (N, 1), got {tuple(x.shape)}")
        return self.net(x)


class ConvNet(nn.Module):
    """The MAML paper's few-shot classifier ("conv4").

    ``blocks`` × [3×3 conv with ``hidden`` filters, :class:`CompositeBatchNorm2d`, ReLU], each
    block halving the feature maps, then a linear layer to ``ways`` logits. Two ways to halve:

    * ``downsample="max_pool"`` (default): stride-1 convolutions, then 2×2 max pooling
      (28 → 14 → 7 → 3 → 1); the head sees the flattened maps. Finn et al. use this variant for
      miniImageNet.
    * ``downsample="stride"``: stride-2 convolutions (28 → 14 → 7 → 4 → 2), then the mean over
      the remaining positions; the head sees ``hidden`` features. This is the network of Finn et
      al.'s Omniglot experiments (built with their initialisation by :func:`finn_omniglot_net`),
      about 3.7× fewer FLOPs per image.

    ``readout`` says what the head sees: ``"flatten"``, every position of the last maps, or
    ``"mean"``, their mean over positions. The default (None) is each variant's: ``"flatten"``
    after max pooling, ``"mean"`` after strided convolutions. (Nichol et al.'s and Rajeswaran et
    al.'s Omniglot networks flatten the 2×2 maps of strided convolutions.)

    ``batch_norm_scale=False`` keeps batch norm's shift β but drops its scale γ, as Finn et al.'s
    reference code does. ``conv="unfold"`` computes the convolutions as :class:`UnfoldConv2d` (same
    parameters and results; faster batched over tasks on some GPUs, see the Performance appendix).
    """

    def __init__(
        self,
        ways: int,
        in_channels: int = 1,
        hidden: int = 64,
        blocks: int = 4,
        image_size: int = 28,
        conv: str = "native",
        downsample: str = "max_pool",
        batch_norm_scale: bool = True,
        readout: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("ways", ways),
            ("in_channels", in_channels),
            ("hidden", hidden),
            ("blocks", blocks),
        ):
            check_positive_integer(name, value)
        convolutions = {"native": nn.Conv2d, "unfold": UnfoldConv2d}
        if conv not in convolutions:
            raise ValueError(f"conv must be 'native' or 'unfold', got {conv!r}")
        if downsample not in ("max_pool", "stride"):
            raise ValueError(f"downsample must be 'max_pool' or 'stride', got {downsample!r}")
        if readout is None:
            readout = "flatten" if downsample == "max_pool" else "mean"
        if readout not in ("flatten", "mean"):
            raise ValueError(f"readout must be 'flatten' or 'mean', got {readout!r}")
        side = image_size
        for _ in range(blocks):
            side = side // 2 if downsample == "max_pool" else (side + 1) // 2
        if side < 1:
            raise ValueError(f"{blocks} poolings leave nothing of a {image_size}×{image_size} image")
        self.in_channels, self.image_size, self.readout = in_channels, image_size, readout
        stride = 2 if downsample == "stride" else 1
        layers: list[nn.Module] = []
        for b in range(blocks):
            layers += [
                convolutions[conv](
                    in_channels if b == 0 else hidden, hidden, kernel_size=3, padding=1, stride=stride
                ),
                CompositeBatchNorm2d(hidden, scale=batch_norm_scale),
                nn.ReLU(),
            ]
            if downsample == "max_pool":
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        features = hidden * side * side if readout == "flatten" else hidden
        self.head = nn.Linear(features, ways)

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"ConvNet expects images of shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )
        maps = self.features(x)
        if self.readout == "mean":
            return self.head(maps.mean(dim=(2, 3)))
        return self.head(maps.flatten(start_dim=1))


def finn_omniglot_net(ways: int, hidden: int = 64, conv: str = "native") -> ConvNet:
    """Finn et al.'s Omniglot network, initialised as their reference code (cbfinn/maml) does.

    Stride-2 convolutions and a spatial mean (``downsample="stride"``), batch norm with β only,
    Xavier-uniform (Glorot) convolution weights, zero biases, and a head whose weights are drawn
    from N(0, 1) (the reference code's ``tf.random_normal``), and batch norm's ε = 10⁻³
    (TensorFlow's default). Seed with ``torch.manual_seed``.
    """
    model = ConvNet(ways, hidden=hidden, conv=conv, downsample="stride", batch_norm_scale=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CompositeBatchNorm2d):
                module.eps = 1e-3
        for module in model.features:
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(model.head.weight, mean=0.0, std=1.0)
        nn.init.zeros_(model.head.bias)
    return model


def rajeswaran_omniglot_net(ways: int, hidden: int = 64, conv: str = "native") -> ConvNet:
    """Rajeswaran et al.'s Omniglot network for iMAML, initialised as their released code
    (aravindr93/imaml_dev) does.

    Stride-2 convolutions (28 → 14 → 7 → 4 → 2) whose 2×2×64 maps are flattened into the head
    (``readout="flatten"``), batch norm with scale and shift (γ = 1, β = 0 at the start, ε =
    10⁻⁵), and every convolution and the head Xavier-uniform with gain 1.73 and biases uniform
    on [0, 0.05]. (Their code pads the 7×7 maps to 8×8 on one side before the third convolution;
    with stride 2 and padding 1 that reads the same windows, so it is left out.) Seed with
    ``torch.manual_seed``.
    """
    model = ConvNet(ways, hidden=hidden, conv=conv, downsample="stride", readout="flatten")
    with torch.no_grad():
        for module in [*model.features, model.head]:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight, gain=1.73)
                nn.init.uniform_(module.bias, 0.0, 0.05)
    return model


Criterion = Callable[[Tensor, Tensor], Tensor]


class ModelLoss:
    """``ℓ(params; x, y)``: a model applied with the given parameters, then a criterion.

    This is the only way ``gbml``'s algorithms see a network: a function of a parameter
    dictionary and a batch. The model is kept so that the meta-step can check it (see
    :func:`gbml.meta.meta_gradient` on batch norm).
    """

    def __init__(self, model: nn.Module, criterion: Criterion) -> None:
        self.model = model
        self.criterion = criterion

    def __call__(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.criterion(functional_call(self.model, params, (x,)), y)


def make_loss(model: nn.Module, criterion: Criterion = F.mse_loss) -> ModelLoss:
    """The task loss of ``model`` under ``criterion`` (mean squared error by default; pass
    ``F.cross_entropy`` for classification)."""
    return ModelLoss(model, criterion)


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a batch norm layer, gbml's or ``torch.nn``'s."""
    return isinstance(module, (CompositeBatchNorm2d, nn.modules.batchnorm._BatchNorm))


def has_native_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` contains a ``torch.nn`` batch norm (unsafe for second order under vmap)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def has_running_statistics(model: nn.Module) -> bool:
    """Whether ``model`` has a ``torch.nn`` batch norm that would update its running statistics
    in place when called (training mode with ``track_running_stats=True``)."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
        for m in model.modules()
    )


def has_convolutions(model: nn.Module) -> bool:
    """Whether ``model`` contains a convolution (slow batched over tasks on CPUs)."""
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
