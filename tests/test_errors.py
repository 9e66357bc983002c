"""Bad input fails early with a message that names the problem."""

import pytest
import torch

from groupmoe import MoEBlock
from groupmoe.ops import (
    build_routing,
    checks,
    expert_mlp,
    flush_checks,
    grouped_mm,
    route,
    set_validation,
)
from moe_cases import make_case, spy_check_ids


def _args(case):
    return (case.x, build_routing(case.ids, case.num_experts), case.gates, case.w1, case.w2)


def test_expert_id_out_of_range():
    with pytest.raises(ValueError, match=r"out of range \[0, 4\).*\(token, slot\) = \(1, 0\)"):
        build_routing(torch.tensor([[0, 1], [4, 2]]), 4)
    with pytest.raises(ValueError, match="out of range"):
        build_routing(torch.tensor([[0, -1]]), 4)


def test_trusted_ids_skip_only_the_value_check():
    """``check_ids=False`` (ids from topk) skips the range check, not the dtype/shape checks."""
    assert build_routing(torch.tensor([[0, 3]]), 4, check_ids=False).counts.tolist() == [1, 0,
                                                                                        0, 1]
    with pytest.raises(ValueError, match="integer"):
        build_routing(torch.tensor([[0.0, 1.0]]), 4, check_ids=False)


def test_grouped_experts_checks_ids_unless_told_they_are_trusted(monkeypatch):
    """GroupedExperts range-checks caller ids; MoEBlock's own TopKRouter ids skip the check
    (and its device sync); a swapped-in router's ids are checked again."""
    block = MoEBlock(8, 4, 4, top_k=2, dtype=torch.float64)
    x, gates = torch.randn(2, 8, dtype=torch.float64), torch.full((2, 2), 0.5,
                                                                  dtype=torch.float64)
    with pytest.raises(ValueError, match="out of range"):
        block.experts(x, torch.tensor([[0, 1], [4, 2]]), gates)
    from groupmoe.nn import experts

    seen = spy_check_ids(monkeypatch, experts)
    block(torch.randn(3, 8, dtype=torch.float64))
    assert seen == [False]

    class OwnRouter(torch.nn.Module):
        def forward(self, flat):
            ids = torch.tensor([[0, 5]] * flat.shape[0])
            return flat, torch.zeros(flat.shape[0], 4), torch.full(ids.shape, 0.5), ids

    block.router = OwnRouter()
    with pytest.raises(ValueError, match="out of range"):
        block(torch.randn(3, 8, dtype=torch.float64))
    assert seen[-1] is True


def test_expert_ids_wrong_rank_or_dtype():
    with pytest.raises(ValueError, match=r"\[tokens, top_k\]"):
        build_routing(torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match="integer"):
        build_routing(torch.tensor([[0.0, 1.0]]), 4)


def test_top_k_larger_than_experts():
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and"):
        route(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match="top_k=9"):
        MoEBlock(8, 4, 4, top_k=9)


def test_nan_logits_say_where():
    logits = torch.randn(6, 4)
    logits[3, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="token 3, expert 2"):
        route(logits, 2, where="layer 7 router")
    with pytest.raises(FloatingPointError, match="layer 7 router"):
        route(logits, 2, where="layer 7 router")


def test_validation_switch_skips_data_checks():
    logits = torch.randn(6, 4)
    logits[0, 0] = float("nan")
    set_validation(False)
    try:
        route(logits, 2)
    finally:
        set_validation(True)


class _Event:
    """Stands in for a CUDA event: finished or not, and whether someone waited on it."""

    def __init__(self, finished: bool):
        self.finished, self.waited = finished, False

    def query(self) -> bool:
        return self.finished

    def synchronize(self) -> None:
        self.waited = self.finished = True


def _pending(logits, where, finished):
    peak = logits.abs().max() if logits.isfinite().all() else torch.tensor(float("nan"))
    return checks._PendingCheck(logits, where, peak, _Event(finished))


def test_deferred_logits_check_raises_at_a_later_check_or_flush(monkeypatch):
    """The CUDA path's bookkeeping, on CPU: a finished failed check raises (late, naming its
    layer and token) at the next look; an unfinished one waits for flush_checks; finished
    good checks are dropped; a failure drops the checks queued after it."""
    monkeypatch.setattr(checks, "_PENDING", checks.deque())
    good, bad = torch.randn(5, 4), torch.randn(5, 4)
    bad[2, 1] = float("inf")
    checks._PENDING.extend([_pending(good, "layer 0 router", True),
                            _pending(bad, "layer 1 router", False),
                            _pending(bad, "layer 2 router", True)])
    checks._resolve_pending(wait=False)  # layer 0 passed; layer 1 is still running
    assert [p.where for p in checks._PENDING] == ["layer 1 router", "layer 2 router"]
    with pytest.raises(FloatingPointError, match=r"layer 1 router.*token 2, expert 1.*after"):
        flush_checks()
    assert not checks._PENDING
    checks._PENDING.append(_pending(good, "layer 3 router", False))
    flush_checks()  # waits, passes
    assert not checks._PENDING


def test_validation_modes():
    logits = torch.randn(6, 4)
    logits[1, 3] = float("nan")
    for mode in (True, "sync"):  # on CPU both raise inside the call
        set_validation(mode)
        try:
            with pytest.raises(FloatingPointError, match="token 1, expert 3"):
                route(logits, 2)
        finally:
            set_validation(True)
    with pytest.raises(ValueError, match="True, False or 'sync'"):
        set_validation("later")


def test_shape_mismatches():
    case = make_case(8, 16, 8, 4, 2, torch.float32)
    x, r, g, w1, w2 = _args(case)
    with pytest.raises(ValueError, match="hidden size is 16"):
        expert_mlp(x, r, g, w1[:, :8], w2)
    with pytest.raises(ValueError, match=r"down weight must be \[E, 8, 16\]"):
        expert_mlp(x, r, g, w1, w2[:, :4])
    with pytest.raises(ValueError, match=r"router weights must be \[8, 2\]"):
        expert_mlp(x, r, g[:, :1], w1, w2)
    with pytest.raises(ValueError, match="routing has 4"):
        expert_mlp(x, r, g, w1[:3], w2[:3])
    with pytest.raises(ValueError, match="routing is for 8 tokens"):
        expert_mlp(x[:4], r, g[:4], w1, w2)
    with pytest.raises(ValueError, match=r"gate_up bias must be \[4, 16\]"):
        expert_mlp(x, r, g, w1, w2, b_gate_up=torch.zeros(4, 8))
    with pytest.raises(ValueError, match="save must be"):
        expert_mlp(x, r, g, w1, w2, save="y")


def test_dtype_mismatch():
    case = make_case(8, 16, 8, 4, 2, torch.float32)
    x, r, g, w1, w2 = _args(case)
    with pytest.raises(ValueError, match="share one dtype.*x=torch.float64"):
        expert_mlp(x.double(), r, g, w1, w2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_device_mismatch():
    case = make_case(8, 16, 8, 4, 2, torch.float32)
    x, r, g, w1, w2 = _args(case)
    with pytest.raises(ValueError, match="share one device"):
        expert_mlp(x.cuda(), r, g, w1, w2)


def test_device_mismatch_meta():
    """Same check without a GPU: a meta-device weight next to CPU activations."""
    case = make_case(8, 16, 8, 4, 2, torch.float32)
    x, r, g, w1, w2 = _args(case)
    with pytest.raises(ValueError, match="share one device"):
        expert_mlp(x, r, g, w1.detach().to("meta"), w2)


def test_grouped_mm_offsets_checked():
    a, b = torch.randn(8, 4), torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="int32"):
        grouped_mm(a, b, torch.tensor([4, 8]))
    with pytest.raises(ValueError, match=r"offs must be \[2\]"):
        grouped_mm(a, b, torch.tensor([8], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"want a \[M, K\]"):
        grouped_mm(a, torch.randn(2, 5, 3), torch.tensor([4, 8], dtype=torch.int32))


def test_block_hidden_size_mismatch():
    block = MoEBlock(8, 4, 4, top_k=2)
    with pytest.raises(ValueError, match="input hidden size 6"):
        block(torch.randn(3, 6))


def test_block_input_dtype_or_device_mismatch():
    """A float64 input to a float32 block: groupmoe's message naming both, not torch's raw
    matmul error from the router."""
    block = MoEBlock(8, 4, 4, top_k=2)
    with pytest.raises(ValueError, match=r"TopKRouter: tensors must share one dtype, got "
                                         r"x=torch.float64, router_weight=torch.float32"):
        block(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="TopKRouter: tensors must share one device"):
        block(torch.randn(3, 8, device="meta"))
