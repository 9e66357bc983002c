"""The routing-metadata Triton kernels against the torch path, run by test_routing_kernel.py
under TRITON_INTERPRET=1 in a subprocess (see interp_runner.py). Each case returns the number
of tensors that differ (all six must be identical)."""

import torch

from groupmoe.kernels.routing import routing_metadata
from groupmoe.ops.routing import _build_routing_op
from interp_runner import print_case_results


def case_routing(tokens: int, top_k: int, experts: int, skew: bool) -> int:
    ids = torch.randint(0, experts, (tokens, top_k))
    if skew:  # half the tokens on three experts: runs that cross tiles, empty experts
        ids[: tokens // 2] %= min(3, experts)
    got = routing_metadata(ids, experts)
    want = _build_routing_op._init_fn(ids, experts, False)
    return sum(not (torch.equal(a, b) and a.dtype == b.dtype) for a, b in zip(got, want))


CASES = {f"T{t}-k{k}-E{e}{'-skew' if skew else ''}": (
    case_routing, dict(tokens=t, top_k=k, experts=e, skew=skew), 0)
    for t, k, e, skew in ((5, 2, 4, False), (150, 8, 128, True), (1000, 3, 7, True),
                          (0, 2, 4, False), (64, 1, 1, False), (100, 4, 3000, False),
                          (37, 5, 9, False))}


if __name__ == "__main__":
    print_case_results(CASES)
