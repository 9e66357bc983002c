"""route()'s fused Triton kernels (groupmoe.kernels.router), forward and backward, against its
torch path: under the CPU interpreter in CI, and on CUDA."""

import pytest
import torch

from groupmoe.ops import backend, route
from interp_runner import assert_case, run_interpreted
from moe_cases import rel_err
from router_interp_cases import CASES, distinct_logits


@pytest.fixture(scope="module")
def interp_results():
    return run_interpreted("router_interp_cases.py")


@pytest.mark.parametrize("name", list(CASES))
def test_router_kernels_interpreter(name, interp_results):
    assert_case(interp_results, CASES, name)


def _grads(logits, dw, top_k, kind, name):
    backend.set_backend(name)
    try:
        x = logits.detach().clone().requires_grad_(True)
        w, ids = route(x, top_k, kind)
        (w.float() * dw).sum().backward()
        return w.detach(), ids, x.grad
    finally:
        backend.set_backend("auto")


@pytest.mark.gpu
@pytest.mark.parametrize("kind,tokens,experts,top_k,dtype", [
    ("softmax_topk", 8192, 128, 8, torch.float32), ("softmax_topk", 8192, 128, 8, torch.bfloat16),
    ("softmax_topk", 1000, 256, 6, torch.float32), ("topk_softmax", 4096, 32, 4, torch.float32),
    ("topk_softmax", 4096, 32, 4, torch.bfloat16), ("softmax_topk", 33, 1024, 2, torch.float32),
    ("softmax_topk", 100, 60, 60, torch.float32)])
def test_router_kernels_cuda(kind, tokens, experts, top_k, dtype):
    torch.manual_seed(0)
    logits = distinct_logits(tokens, experts, dtype, "cuda")
    dw = torch.randn(tokens, top_k, device="cuda")
    w, ids, dx = _grads(logits, dw, top_k, kind, "auto")
    w0, ids0, dx0 = _grads(logits, dw, top_k, kind, "torch")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.equal(ids, ids0)
    assert rel_err(w, w0) < tol and rel_err(dx, dx0) < tol
