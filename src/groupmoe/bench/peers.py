"""Peer libraries' fused MoE expert ops, timed on the same problems as groupmoe's impls.

``liger``: liger-kernel's ``LigerFusedMoEFunction`` (Triton: gather fused into the gate_up
GEMM, SwiGLU epilogue, recompute-based backward). It takes transformers 5's ``[E, out, in]``
stacks, so the bench holds a contiguous copy of the weights in that layout (made once, outside
the timed step). SwiGLU without biases only; unavailable peers are reported, not faked.
"""

from __future__ import annotations

import importlib.util

import torch

PEERS = ("liger",)


def unavailable(impl: str, shape, device: torch.device) -> str | None:
    """Why ``impl`` cannot run this shape here, or None."""
    if device.type != "cuda":
        return "needs CUDA"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    if shape.activation != "swiglu" or shape.bias:
        return "liger's fused MoE supports SwiGLU experts without biases only"
    return None


def liger_step(prob):
    """A step function for ``LayerProblem`` running liger's fused MoE op."""
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    train = prob.mode == "train"
    w1 = prob.w1.detach().transpose(1, 2).contiguous().requires_grad_(train)
    w2 = prob.w2.detach().transpose(1, 2).contiguous().requires_grad_(train)
    prob.peer_weights += [w1, w2]  # so clear_grads() frees their grads before a peak reading
    ids32 = [ids.to(torch.int32) for _, ids, _, _, _ in prob.inputs]

    def step(it: int) -> None:
        x, _, gates, dout, _ = prob.inputs[it % len(prob.inputs)]
        for t in (x, gates, w1, w2):
            t.grad = None
        out = LigerFusedMoEFunction.apply(x, w1, w2, ids32[it % len(ids32)], gates)
        out.backward(dout)

    return step
