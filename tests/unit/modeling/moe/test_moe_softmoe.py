"""SoftMoE: formula against a float64 reference, isolation of segments and images, padding invariance."""
import torch

import gem_d2  # noqa: F401  (shims before detectron2)
from gem_d2.modeling.moe import MoEFFN
from gem_d2.modeling.moe.context import MoESpec, RoutingContext

C, FH, E, P = 6, 12, 3, 2


def make_moe(seed=0):
    torch.manual_seed(seed)
    spec = MoESpec(["decoder.1"], E, "softmoe", dict(slots_per_expert=P))
    moe = MoEFFN("decoder.1", C, FH, 0.0, "relu", spec).double()
    with torch.no_grad():
        moe.router.scale.fill_(3.0)
    return moe


def expert_ref(moe, e, x):
    b = moe.experts
    return torch.relu(x @ b.w1[e].T + b.b1[e]) @ b.w2[e].T + b.b2[e]


def reference_group(moe, xg):
    """One image's group of valid tokens xg (n, C): explicit dispatch/combine softmaxes, float64."""
    phi = moe.router.phi.detach()
    phi = moe.router.scale.detach() * phi / phi.norm(dim=0, keepdim=True)
    logits = (xg / xg.norm(dim=1, keepdim=True)) @ phi  # (n, S)
    dispatch = torch.exp(logits) / torch.exp(logits).sum(0, keepdim=True)
    combine = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    slots = dispatch.T @ xg  # (S, C)
    slot_out = torch.stack([expert_ref(moe, s // P, slots[s]) for s in range(E * P)])
    return combine @ slot_out, combine.reshape(-1, E, P).sum(-1)


def test_softmoe_matches_reference_per_segment():
    moe = make_moe()
    segments = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])  # two DN groups, then matching queries
    x = torch.randn(2, 11, C, dtype=torch.float64)
    ctx = RoutingContext(dataset_ids=torch.tensor([0, 1]), segments=segments)
    out = moe(x, ctx)
    stats = torch.zeros(2, E, dtype=torch.float64)
    with torch.no_grad():
        for n in range(2):
            for s in range(3):
                idx = (segments == s).nonzero().squeeze(1)
                want, load = reference_group(moe, x[n, idx])
                torch.testing.assert_close(out[n, idx], want)
                stats[n] += load.sum(0)
    assert ctx.aux_losses == {}
    torch.testing.assert_close(ctx.stats["decoder.1/tokens_per_expert"], stats.float())
    torch.testing.assert_close(stats.sum(1), torch.full((2,), 11.0, dtype=torch.float64))
    out.sum().backward()
    assert moe.router.phi.grad.abs().sum() > 0 and moe.router.scale.grad is not None


def test_softmoe_never_mixes_segments_or_images():
    moe = make_moe(1)
    segments = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    x = torch.randn(2, 7, C, dtype=torch.float64)
    ctx = lambda: RoutingContext(dataset_ids=torch.tensor([0, 0]), segments=segments)  # noqa: E731
    base = moe(x, ctx())
    x2 = x.clone()
    x2[0, 2:4] += 5 * torch.randn(2, C, dtype=torch.float64)  # perturb segment 1 of image 0
    out = moe(x2, ctx())
    others = segments != 1
    torch.testing.assert_close(out[0, others], base[0, others], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1], base[1], rtol=0, atol=1e-12)  # the other image
    assert not torch.allclose(out[0, 2:4], base[0, 2:4])
    # without segments the whole image is one group: the same perturbation now reaches every token of image 0
    whole = moe(x, RoutingContext(dataset_ids=torch.tensor([0, 0])))
    whole2 = moe(x2, RoutingContext(dataset_ids=torch.tensor([0, 0])))
    assert not torch.allclose(whole2[0, 0], whole[0, 0])


def test_softmoe_padded_tokens_do_not_affect_valid_outputs():
    moe = make_moe(2)
    x = torch.randn(2, 9, C, dtype=torch.float64)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 6:] = True
    pad[1, 4:] = True
    out = moe(x, RoutingContext(dataset_ids=torch.tensor([0, 1]), key_padding_mask=pad))
    x2 = x.clone()
    x2[pad] = 100 * torch.randn(int(pad.sum()), C, dtype=torch.float64)
    ctx = RoutingContext(dataset_ids=torch.tensor([0, 1]), key_padding_mask=pad)
    out2 = moe(x2, ctx)
    torch.testing.assert_close(out2[~pad], out[~pad], rtol=0, atol=1e-12)
    assert torch.equal(out2[pad], torch.zeros_like(out2[pad]))
    with torch.no_grad():
        want, _ = reference_group(moe, x[1, :4])  # same as running the valid tokens alone
    torch.testing.assert_close(out[1, :4], want)
    torch.testing.assert_close(ctx.stats["decoder.1/tokens_per_expert"].sum(1), torch.tensor([6.0, 4.0]))


def test_softmoe_fully_padded_image_is_finite_and_zero():
    moe = make_moe(3)
    x = torch.randn(2, 4, C, dtype=torch.float64)
    pad = torch.zeros(2, 4, dtype=torch.bool)
    pad[1] = True
    out = moe(x, RoutingContext(dataset_ids=torch.tensor([0, 1]), key_padding_mask=pad))
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in moe.parameters())
