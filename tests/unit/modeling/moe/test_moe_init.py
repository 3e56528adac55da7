"""Experts start from the dense FFN's distribution (Xavier-uniform weights, nn.Linear-default biases)."""
import math

import pytest
import torch
from scipy import stats

import gem_d2  # noqa: F401  (shims + registrations before detectron2)

# isort: split
from gem_d2.modeling.dino.transformer import build_dino_transformer
from gem_d2.modeling.moe import ExpertBank
from gem_d2.modeling.moe.context import MoESpec

C, FH, E = 64, 256, 4


@pytest.fixture(scope="module")
def moe_and_dense():
    torch.manual_seed(0)
    tr = build_dino_transformer(d_model=C, n_heads=4, d_ffn=FH, enc_layers=1, dec_layers=2, num_levels=1,
                                num_queries=4, num_classes=3, moe=MoESpec(["decoder.0"], E, "topk"))
    return tr.decoder.layers[0].ffn, tr.decoder.layers[1].ffn


def test_experts_and_dense_ffn_have_the_same_initial_distribution(moe_and_dense):
    moe, dense = moe_and_dense
    bank = moe.experts
    xavier = math.sqrt(6 / (C + FH))
    pairs = {"w1": (bank.w1, dense.linear1.weight, xavier), "w2": (bank.w2, dense.linear2.weight, xavier),
             "b1": (bank.b1, dense.linear1.bias, 1 / math.sqrt(C)), "b2": (bank.b2, dense.linear2.bias,
                                                                          1 / math.sqrt(FH))}
    for name, (experts, ref, bound) in pairs.items():
        ref = ref.detach().flatten().double()
        assert ref.abs().max() <= bound and ref.abs().max() > 0.95 * bound, name
        for e in range(E):
            x = experts[e].detach().flatten().double()
            assert x.abs().max() <= bound and x.abs().max() > 0.95 * bound, (name, e)
            # uniform on (-b, b): variance b^2 / 3
            assert x.var().item() == pytest.approx(bound ** 2 / 3, rel=0.1 if x.numel() < 1000 else 0.03)
            assert stats.ks_2samp(x.numpy(), ref.numpy()).pvalue > 0.01, (name, e)
        # the experts are independent draws, not copies
        assert not torch.equal(experts[0], experts[1])


def test_the_ks_check_tells_the_old_linear_default_apart(moe_and_dense):
    """Control: nn.Linear's default weight init (bound 1/sqrt(F) for w2) is rejected by the same test."""
    _, dense = moe_and_dense
    linear_default = torch.empty(C, FH).uniform_(-1 / math.sqrt(FH), 1 / math.sqrt(FH))
    assert stats.ks_2samp(linear_default.flatten().numpy(), dense.linear2.weight.detach().flatten().numpy()
                          ).pvalue < 1e-6


def test_expert_bank_alone_uses_per_expert_fans():
    torch.manual_seed(1)
    bank = ExpertBank(8, 16, 48)  # fans of one expert matrix, not of the stacked (8, 48, 16) tensor
    bound = math.sqrt(6 / (16 + 48))
    assert bank.w1.abs().max() <= bound and bank.w1.abs().max() > 0.95 * bound
    assert bank.w2.abs().max() <= bound and bank.w2.abs().max() > 0.95 * bound
