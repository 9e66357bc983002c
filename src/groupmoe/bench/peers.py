"""Peer libraries' MoE ops, timed on the same problems as groupmoe's impls.

``liger``: liger-kernel's ``LigerFusedMoEFunction`` (Triton: gather fused into the gate_up
GEMM, SwiGLU epilogue, recompute-based backward), experts only, handed groupmoe's routing. It
takes transformers 5's ``[E, out, in]`` stacks, so the bench holds a contiguous copy of the
weights in that layout (made once, outside the timed step).

``sonicmoe``: SonicMoE's ``sonicmoe.MoE`` (CuTe DSL kernels, Hopper), the whole layer with its
own softmax top-k router on the hidden states: compare it with groupmoe's ``block``. It
compiles its kernels on the first step of a shape (minutes for the first backward) and needs
a contiguous output gradient. Offline kit: ``../shared/peers/sonicmoe.sh``.

SwiGLU experts without biases only; unavailable peers are reported, not faked.
"""

from __future__ import annotations

import importlib.util

import torch

PEERS = ("liger", "sonicmoe")
_MODULES = {"liger": "liger_kernel", "sonicmoe": "sonicmoe"}


def unavailable(impl: str, shape, device: torch.device) -> str | None:
    """Why ``impl`` cannot run this shape here, or None."""
    if device.type != "cuda":
        return "needs CUDA"
    if importlib.util.find_spec(_MODULES[impl]) is None:
        return f"{_MODULES[impl]} is not installed"
    if shape.activation != "swiglu" or shape.bias:
        return f"{impl} runs SwiGLU experts without biases only"
    return None


def liger_forward(prob):
    """A forward for ``LayerProblem`` running liger's fused MoE op."""
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    train = prob.mode != "frozen"
    w1 = prob.w1.detach().transpose(1, 2).contiguous().requires_grad_(train)
    w2 = prob.w2.detach().transpose(1, 2).contiguous().requires_grad_(train)
    prob.peer_weights += [w1, w2]  # so clear_grads() frees their grads before a peak reading
    ids32 = [ids.to(torch.int32) for _, ids, _, _, _ in prob.inputs]

    def forward(it: int):
        x, _, gates, dout, _ = prob.inputs[it % len(prob.inputs)]
        for t in (x, gates, w1, w2):
            t.grad = None
        return LigerFusedMoEFunction.apply(x, w1, w2, ids32[it % len(ids32)], gates), dout

    return forward


def sonicmoe_forward(prob):
    """A forward for ``LayerProblem`` running SonicMoE's whole layer (router included)."""
    from sonicmoe import MoE
    from sonicmoe.enums import ActivationType

    s = prob.shape
    moe = MoE(s.experts, s.top_k, s.hidden, s.intermediate, ActivationType.SWIGLU,
              add_bias=False, std=0.02).to(device=prob.device, dtype=prob.w1.dtype)
    moe.requires_grad_(prob.mode != "frozen")
    prob.peer_weights += list(moe.parameters())

    def forward(it: int):
        x, _, _, dout, _ = prob.inputs[it % len(prob.inputs)]
        x.grad = None
        for p in moe.parameters():
            p.grad = None
        return moe(x)[0], dout.contiguous()  # its backward asserts on expanded gradients

    return forward
