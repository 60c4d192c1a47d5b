"""A small model's loss falls with each optimizer."""

import pytest
import torch

from conftest import TinyGPT, lm_loss
from reg_dist import REG, Muon, MuonEq


@pytest.mark.parametrize("cls,lr", [(REG, 3e-2), (Muon, 3e-2), (MuonEq, 3e-2)])
def test_loss_falls_on_a_small_gpt(cls, lr):
    torch.manual_seed(0)
    model = TinyGPT(vocab=32, width=32, depth=2, seq=16)
    data = torch.randint(0, 32, (64, 17), generator=torch.Generator().manual_seed(1))
    opt = cls(model, lr=lr, weight_decay=0.01)
    losses = []
    for step in range(40):
        batch = data[(step * 8) % 64:(step * 8) % 64 + 8]
        opt.zero_grad()
        loss = lm_loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
