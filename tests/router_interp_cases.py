"""The fused router kernels (groupmoe.kernels.router) against route()'s torch path, forward
and backward, run by test_router_kernel.py under TRITON_INTERPRET=1 in a subprocess (see
interp_runner.py). Each case returns the largest relative error of weights and logits'
gradient, or 1.0 when the ids differ."""

import torch

from groupmoe.ops import backend, route
from interp_runner import print_case_results
from moe_cases import rel_err


def _run(logits, dw, top_k, kind, normalize, name):
    backend.set_backend(name)
    try:
        x = logits.detach().clone().requires_grad_(True)
        w, ids = route(x, top_k, kind, normalize)
        (w * dw).sum().backward()
        return w.detach(), ids, x.grad
    finally:
        backend.set_backend("auto")


def distinct_logits(tokens: int, experts: int, dtype: torch.dtype, device=None):
    """Random logits without ties in ``dtype`` (each row a permutation of a 1/16 grid), so
    the top-k is unique whatever the tie rule."""
    if dtype == torch.float32:
        return torch.randn(tokens, experts, device=device) * 2
    grid = torch.rand(tokens, experts, device=device).argsort(1).float() - experts / 2
    return (grid / 16).to(dtype)


def case_router(tokens, experts, top_k, kind, normalize, dtype) -> float:
    logits = distinct_logits(tokens, experts, dtype)
    dw = torch.randn(tokens, top_k).to(dtype)
    w, ids, dx = _run(logits, dw, top_k, kind, normalize, "triton")
    w0, ids0, dx0 = _run(logits, dw, top_k, kind, normalize, "torch")
    if not torch.equal(ids, ids0):
        return 1.0
    return max(rel_err(w, w0), rel_err(dx, dx0)) if tokens else 0.0


def case_ties() -> float:
    """Equal scores go to the lowest expert index; their weights are equal."""
    logits = torch.zeros(3, 6)
    logits[1, 4] = 1.0
    backend.set_backend("triton")
    try:
        w, ids = route(logits, 3, "softmax_topk")
    finally:
        backend.set_backend("auto")
    want = torch.tensor([[0, 1, 2], [4, 0, 1], [0, 1, 2]])
    return 0.0 if torch.equal(ids, want) and torch.allclose(w[0], w[0, :1]) else 1.0


CASES = {f"{kind}-T{t}-E{e}-k{k}{'-norm' if norm else ''}-{str(dt)[6:]}": (
    case_router, dict(tokens=t, experts=e, top_k=k, kind=kind, normalize=norm, dtype=dt),
    1e-5 if dt == torch.float32 else 2e-2)
    for kind in ("softmax_topk", "topk_softmax")
    for t, e, k, norm, dt in ((37, 8, 2, True, torch.float32), (70, 60, 4, False, torch.float32),
                              (5, 7, 7, True, torch.float32), (0, 8, 2, True, torch.float32),
                              (50, 128, 8, True, torch.bfloat16), (9, 3, 1, False, torch.float32))
    if kind == "softmax_topk" or norm}
CASES["ties"] = (case_ties, {}, 0.0)


if __name__ == "__main__":
    print_case_results(CASES)
