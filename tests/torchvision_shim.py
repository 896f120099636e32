"""A stand-in `torchvision` so the real `lpips` package can be imported in tests.

torchvision cannot be installed here, and lpips touches exactly one thing in it:
`torchvision.models.vgg16(pretrained=...).features` (lpips/pretrained_networks.py; its alexnet,
squeezenet and resnet classes are only looked up when chosen). This shim provides only that:
a VGG16 whose `features` Sequential has torchvision's exact layer layout (conv 3x3 pad 1, ReLU
in place, 2x2 max-pools; indices 0..30), so state-dict keys such as `features.28.weight` are the
real ones, and torchvision's init (Kaiming-normal fan_out, zero bias). No weights are ever
downloaded: `pretrained=True` raises. Use it as `with installed(): lpips.LPIPS(...)`.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import types
from collections.abc import Iterator

from torch import nn

_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                conv = nn.Conv2d(cin, v, kernel_size=3, padding=1)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
                layers += [conv, nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)


def vgg16(pretrained: bool = False, weights: object = None, **_: object) -> VGG16:
    if pretrained or weights is not None:
        raise RuntimeError("torchvision shim: pretrained weights are not available in tests")
    return VGG16()


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """`torchvision` / `torchvision.models` stand-ins in sys.modules for the duration only.

    Scoped (and restoring whatever was there, e.g. another test file's stand-in) because other
    libraries probe for torchvision: a leftover shim would change their behaviour.
    """
    models = types.ModuleType("torchvision.models")
    models.vgg16 = vgg16
    tv = types.ModuleType("torchvision")
    tv.models = models
    for m in (tv, models):  # importlib.util.find_spec() raises on modules without a spec
        m.__spec__ = importlib.machinery.ModuleSpec(m.__name__, None)
    saved = {name: sys.modules.get(name) for name in ("torchvision", "torchvision.models")}
    sys.modules.update({"torchvision": tv, "torchvision.models": models})
    try:
        import lpips.pretrained_networks as pn  # binds `tv` at import: point it at the shim

        saved_tv, pn.tv = pn.tv, models
        try:
            yield
        finally:
            pn.tv = saved_tv
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
