"""Modules: the three implementations agree, block semantics per model family."""

import pytest
import torch

from groupmoe import MoEBlock
from moe_cases import rel_err


def _grads(block, x):
    block.zero_grad()
    x = x.clone().requires_grad_(True)
    out, logits = block(x)
    (out.pow(2).sum() + logits.sum()).backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    return out.detach(), logits.detach(), x.grad, grads


CONFIGS = {
    "qwen3": dict(router="softmax_topk", normalize=True),
    "mixtral-no-renorm": dict(router="softmax_topk", normalize=False),
    "gpt-oss": dict(router="topk_softmax", router_bias=True, activation="gptoss",
                    expert_bias=True),
    "qwen2-shared": dict(router="softmax_topk", normalize=False, shared_intermediate_size=12),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_block_impls_agree(name):
    torch.manual_seed(1)
    block = MoEBlock(16, 8, 6, top_k=2, dtype=torch.float64, **CONFIGS[name])
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    results = {}
    for impl in ("loop", "naive", "groupmoe"):
        block.experts.impl = impl
        results[impl] = _grads(block, x)
    ref = results["loop"]
    for impl in ("naive", "groupmoe"):
        out, logits, dx, grads = results[impl]
        assert out.shape == x.shape and logits.shape == (33, 6)
        assert rel_err(out, ref[0]) < 1e-12 and torch.equal(logits, ref[1])
        assert rel_err(dx, ref[2]) < 1e-11
        assert grads.keys() == ref[3].keys()
        for n in grads:
            assert rel_err(grads[n], ref[3][n]) < 1e-11, (impl, n)


def test_router_gets_gradient_through_gate_weights():
    block = MoEBlock(16, 8, 4, top_k=2, dtype=torch.float64)
    _, _, _, grads = _grads(block, torch.randn(10, 16, dtype=torch.float64))
    assert grads["router.gate.weight"].abs().sum() > 0


def test_mixtral_jitter_only_in_training():
    block = MoEBlock(16, 8, 4, top_k=2, jitter=0.5, dtype=torch.float64)
    x = torch.randn(10, 16, dtype=torch.float64)
    block.eval()
    assert torch.equal(block(x)[0], block(x)[0])
    block.train()
    a, la = block(x)
    b, lb = block(x)
    assert not torch.equal(la, lb)  # jittered router input
    # jitter scales the experts' input too, as Mixtral does
    torch.manual_seed(5)
    out, _ = block(x)
    torch.manual_seed(5)
    xj = x * torch.empty_like(x).uniform_(0.5, 1.5)
    block.eval()
    ref, _ = block(xj)
    assert rel_err(out, ref) < 1e-12


def test_router_logits_keep_model_dtype():
    block = MoEBlock(16, 8, 4, top_k=2, dtype=torch.bfloat16)
    out, logits = block(torch.randn(5, 16, dtype=torch.bfloat16))
    assert out.dtype == logits.dtype == torch.bfloat16
