"""``ExplainingInferer``: the plain forward's logits, the memory shares of the same forward, and a plain forward for
a network that cannot give shares (the bundle's explain switch relies on all three)."""

from __future__ import annotations

import torch

from monai_ecrm.inferers import ExplainingInferer
from monai_ecrm.networks.nets import ECRMUNet

SMALL = {"backbone": "resnet10", "bank_size": 4, "key_channels": 8, "decoder_channels": (16, 16, 16, 16, 16)}


def _filled(**kwargs) -> ECRMUNet:
    torch.manual_seed(0)
    net = ECRMUNet(**SMALL, **kwargs)
    net.train()
    with torch.no_grad():
        labels = (torch.rand(2, 1, 64, 64) > 0.5).float()
        net(torch.randn(2, 3, 64, 64), labels=labels, sources=torch.tensor([0, 1]))
    return net.eval()


def test_explaining_inferer_keeps_the_shares_of_the_plain_forward():
    net = _filled()
    x = torch.randn(3, 3, 64, 64)
    inferer = ExplainingInferer(explain=True, enabled=False)
    logits = inferer(x, net)
    with torch.no_grad():
        assert torch.equal(logits, net(x)), "the explained logits are the plain forward's"
    assert inferer.shares is not None and inferer.shares.shape == (3, 4)
    torch.testing.assert_close(inferer.shares.sum(dim=1), torch.ones(3))
    torch.testing.assert_close(inferer.shares, net.memory_attention(x))
    inferer(x, torch.nn.DataParallel(net))  # the shares come through a wrapper too
    assert inferer.shares is not None


def test_explaining_inferer_runs_plainly_when_off_or_without_memory():
    x = torch.randn(1, 3, 64, 64)
    net = _filled()
    off = ExplainingInferer(explain=False, enabled=False)
    with torch.no_grad():
        assert torch.equal(off(x, net), net(x)) and off.shares is None
    plain = ECRMUNet(**SMALL, use_ecrm=False).eval()
    inferer = ExplainingInferer(explain=True, enabled=False)
    with torch.no_grad():
        assert torch.equal(inferer(x, plain), plain(x))
    assert inferer.shares is None, "a network without ECRM gives no shares"
