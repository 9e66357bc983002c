"""``input_grad`` / ``weight_grad`` / ``save`` through the modules, every impl, against the
oracle (fp64), with signed and zero router weights and a gate-scaled down bias."""

import pytest
import torch

from groupmoe import MoEBlock
from groupmoe.nn import GroupedExperts
from moe_cases import make_ids, rel_err


@pytest.mark.parametrize("impl,save", [("groupmoe", "h"), ("groupmoe", "none"), ("naive", None),
                                       ("loop", None)])
@pytest.mark.parametrize("input_grad,weight_grad", [(None, None), (False, None), (None, False),
                                                    (False, False), (True, True)])
def test_grouped_experts_options_match_oracle(impl, save, input_grad, weight_grad):
    torch.manual_seed(3)
    t, e, k = 19, 5, 2
    ref_mod = GroupedExperts(12, 6, e, "gptoss", bias=True, impl="loop", dtype=torch.float64)
    mod = GroupedExperts(12, 6, e, "gptoss", bias=True, impl=impl, save=save,
                         input_grad=input_grad, weight_grad=weight_grad, dtype=torch.float64)
    mod.load_state_dict(ref_mod.state_dict())
    ids = make_ids(t, k, e, "skewed")
    gates = torch.randn(t, k, dtype=torch.float64)
    gates[0, 0], gates[1, 1] = 0.0, -1e-30  # zero and tiny negative router weights
    x = torch.randn(t, 12, dtype=torch.float64)
    up = torch.randn(t, 12, dtype=torch.float64)
    results = []
    for m in (ref_mod, mod):
        xl, gl = x.clone().requires_grad_(True), gates.clone().requires_grad_(True)
        out = m(xl, ids, gl)
        out.backward(up)
        results.append((out, xl.grad, gl.grad, {n: p.grad for n, p in m.named_parameters()}))
    (ref, rdx, rdg, rgrads), (out, dx, dg, grads) = results
    assert rel_err(out, ref) < 1e-12
    assert rel_err(dg, rdg) < 1e-11  # the router weights always follow requires_grad
    if input_grad is False:
        assert dx is None
    else:
        assert rel_err(dx, rdx) < 1e-11
    for n, g in grads.items():
        if weight_grad is False:
            assert g is None, n
        else:
            assert rel_err(g, rgrads[n]) < 1e-11, n


def test_block_passes_options_to_experts():
    block = MoEBlock(16, 8, 4, top_k=2, save="none", input_grad=False, weight_grad=False,
                     dtype=torch.float64)
    assert (block.experts.save, block.experts.input_grad, block.experts.weight_grad) == (
        "none", False, False)
    x = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    out, _ = block(x)
    out.sum().backward()
    assert block.experts.gate_up.grad is None and block.experts.down.grad is None
    # the router still trains through the gate weights; x only through the router
    assert block.router.gate.weight.grad is not None and x.grad is not None
