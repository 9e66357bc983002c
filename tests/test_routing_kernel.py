"""build_routing's Triton kernels (groupmoe.kernels.routing): the same six tensors as the torch
path, bit for bit, under the CPU interpreter and on CUDA."""

import pytest
import torch

from groupmoe.ops import backend, build_routing
from interp_runner import assert_case, run_interpreted
from routing_interp_cases import CASES


@pytest.fixture(scope="module")
def interp_results():
    return run_interpreted("routing_interp_cases.py")


@pytest.mark.parametrize("name", list(CASES))
def test_routing_kernels_interpreter(name, interp_results):
    assert_case(interp_results, CASES, name)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,top_k,experts", [(8192, 8, 128), (8192, 6, 256), (1, 1, 1),
                                                  (3000, 4, 4096), (20000, 2, 8), (77, 8, 64)])
def test_routing_kernels_cuda(tokens, top_k, experts):
    torch.manual_seed(0)
    logits = torch.randn(tokens, experts, device="cuda")
    logits[: tokens // 3, :2] += 20  # a third of the tokens on two experts
    ids = logits.topk(top_k).indices
    assert backend.use_triton(ids)
    got = build_routing(ids, experts, check_ids=False)
    backend.set_backend("torch")
    try:
        want = build_routing(ids, experts, check_ids=False)
    finally:
        backend.set_backend("auto")
    for a, b in zip(got.tensors(), want.tensors()):
        assert a.dtype == b.dtype and torch.equal(a, b)
