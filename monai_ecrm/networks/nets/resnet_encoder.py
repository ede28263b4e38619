"""A torchvision-layout ResNet encoder for the FlexibleUNet-style networks of this package."""

from __future__ import annotations

from monai.networks.nets.resnet import ResNet, ResNetEncoder, get_inplanes, resnet_params

__all__ = ["TorchvisionResNetEncoder"]


class TorchvisionResNetEncoder(ResNetEncoder):
    """MONAI's ``ResNetEncoder`` with the torchvision (and DCRNet) layout for every depth: projection shortcuts
    (1x1 convolution + BatchNorm, no bias; "shortcut B") wherever the shape changes.

    Why not MONAI's encoder as registered: for resnet10/18/34 it uses MedicalNet's parameter-free "shortcut A",
    built with a ``functools.partial`` that ``torch.jit.script`` rejects and whose state dict has no
    ``downsample.*`` keys, so torchvision ImageNet ResNet weights cannot be loaded into it. Keys, shapes and
    feature maps otherwise equal MONAI's encoder (``conv1, bn1, layer1..layer4``; five feature maps).

    Args:
        model_name: ``resnet10`` .. ``resnet200``.
        pretrained: must be False (MONAI's pretrained ResNets are downloaded; use ``pretrained_weights=PATH``).
        spatial_dims: 2 or 3.
        in_channels: input channels.
    """

    def __init__(self, model_name: str, pretrained: bool = False, spatial_dims: int = 3, in_channels: int = 1) -> None:
        if model_name not in resnet_params:
            raise ValueError(
                f"TorchvisionResNetEncoder: unknown model_name {model_name!r}; one of {list(resnet_params)}."
            )
        if pretrained:
            raise ValueError(
                "TorchvisionResNetEncoder: pretrained weights are never downloaded; pass pretrained_weights=PATH "
                "(a local torchvision or MONAI ResNet state dict) to the network instead."
            )
        block, layers, _, _, _ = resnet_params[model_name]
        ResNet.__init__(
            self,
            block=block,
            layers=layers,
            block_inplanes=get_inplanes(),
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_stride=2,
            shortcut_type="B",
            feed_forward=False,
            bias_downsample=False,
        )
