"""Kernel-vs-torch cases shared by the Triton interpreter tests (run in a subprocess with
``TRITON_INTERPRET=1``, see ``test_kernels.py``) and the GPU tests.

``python tests/kernel_cases.py`` runs every case and prints ``{name: rel_err or "error: ..."}``
as JSON. Nothing here imports Triton at module import.
"""

from __future__ import annotations

import sys

import torch

from groupmoe.ops import build_routing, expert_mlp, get_activation, grouped_mm
from interp_runner import print_case_results
from moe_cases import make_case, make_ids, rel_err

SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}


def _problem(t, h, n_out, e, k, load, dtype, device):
    x = torch.randn(t, h, dtype=dtype, device=device)
    routing = build_routing(make_ids(t, k, e, load).to(device), e)
    w = (torch.randn(e, h, n_out, dtype=dtype, device=device) / h ** 0.5)
    return x, routing, w


def case_gemm(t, h, n_out, e, k, load, dtype, device="cpu", layout="in_out", bias=False,
              scatter=False, gathered=True, config=None):
    """gather_grouped_mm vs index_select + grouped_mm (+ bias * scale, scattered store)."""
    from groupmoe.kernels.grouped import gather_grouped_mm

    x, r, w = _problem(t, h, n_out, e, k, load, dtype, device)
    if layout == "transposed":  # an nn.Linear-layout stack viewed as [E, in, out]
        w = w.transpose(-1, -2).contiguous().transpose(-1, -2)
    b = torch.randn(e, n_out, dtype=dtype, device=device) if bias else None
    s = torch.rand(r.num_rows, dtype=torch.float32, device=device) if bias else None
    if not gathered:
        x = x.index_select(0, r.token_index)
    out = gather_grouped_mm(x, r.token_index if gathered else None, w, r.offsets, bias=b,
                            bias_scale=s, out_index=r.order if scatter else None, config=config)
    xs = x.index_select(0, r.token_index) if gathered else x
    ref = _ref_mm(xs, w, r.offsets)
    if bias:
        ref = ref + s[:, None] * b.float().index_select(0, r.expert_index)
    if scatter:
        ref = torch.empty_like(ref).index_copy_(0, r.order, ref)
    return rel_err(out[: r.num_rows], ref)


def _ref_mm(xs, w, offs):
    """fp32 reference product (also where torch has no bf16 grouped_mm, e.g. on CPU)."""
    return grouped_mm(xs.float(), w.float(), offs)


def case_act(t, h, inter, e, k, load, dtype, activation, bias, store_h=True, device="cpu",
             config=None):
    """gather_grouped_mm_act vs grouped_mm + bias + activation * router weight; max of h's and
    a''s errors."""
    from groupmoe.kernels.grouped import gather_grouped_mm_act

    x, r, w = _problem(t, h, 2 * inter, e, k, load, dtype, device)
    x = x * 3  # reach gpt-oss's clamp
    b = torch.randn(e, 2 * inter, dtype=dtype, device=device) if bias else None
    g = torch.randn(r.num_rows, dtype=torch.float32, device=device)
    hk, a = gather_grouped_mm_act(x, r.token_index, w, r.offsets, activation, bias=b,
                                  row_scale=g, store_h=store_h, config=config)
    href = _ref_mm(x.index_select(0, r.token_index), w, r.offsets)
    if bias:
        href = href + b.float().index_select(0, r.expert_index)
    aref = get_activation(activation)(href.to(dtype).float()) * g[:, None]
    err = rel_err(a, aref)
    if store_h:
        err = max(err, rel_err(hk, href))
    else:
        assert hk is None
    return err


def case_combine(t, hdim, k, dtype, indexed, device="cpu"):
    """combine_rows vs the fp32 sum over slots."""
    from groupmoe.kernels.grouped import combine_rows

    y = torch.randn(t * k, hdim, dtype=dtype, device=device)
    idx = torch.randperm(t * k, device=device) if indexed else None
    picked = y.index_select(0, idx) if indexed else y
    ref = picked.view(t, k, hdim).float().sum(1)
    out = combine_rows(y, k, idx, dtype)
    assert out.dtype == dtype
    return rel_err(out, ref) if t else float(out.numel())


def case_expert_mlp(t, h, inter, e, k, load, dtype, activation, bias, save, device="cpu"):
    """expert_mlp backend='triton' vs backend='torch', output and every gradient (max)."""
    case = make_case(t, h, inter, e, k, dtype, bias, activation, load, device=device,
                     scale=3.0 if activation == "gptoss" else 1.0)
    routing = build_routing(case.ids, e)
    results = []
    up = torch.randn(t, h, dtype=dtype, device=device)
    for backend in ("torch", "triton"):
        for leaf in case.leaves():
            leaf.grad = None
        out = expert_mlp(case.x, routing, case.gates, case.w1, case.w2, case.b1, case.b2,
                         activation, save=save, backend=backend)
        out.backward(up)
        results.append([out.detach()] + [leaf.grad.clone() for leaf in case.leaves()])
    return max(rel_err(a, b) for a, b in zip(results[1], results[0]))


F32, BF16 = torch.float32, torch.bfloat16

# name: (function, kwargs, tolerance); sizes tiny: the interpreter emulates every program.
# bf16 activations get 3e-2: the interpreter truncates fp32 -> bf16 (the reference rounds), and
# an ulp of h moves silu(gate) * up by more than an ulp of the result.
CASES = {
    "gemm-f32": (case_gemm, dict(t=13, h=32, n_out=48, e=5, k=2, load="random", dtype=F32,
                                 config=SMALL), 1e-5),
    "gemm-f32-oddK-multitile": (case_gemm, dict(t=40, h=40, n_out=40, e=5, k=2, load="skewed",
                                                dtype=F32, config=SMALL), 1e-5),
    "gemm-f32-transposed-w": (case_gemm, dict(t=13, h=32, n_out=48, e=5, k=2, load="random",
                                              dtype=F32, layout="transposed", config=SMALL), 1e-5),
    "gemm-f32-bias-scale-scatter": (case_gemm, dict(t=13, h=32, n_out=48, e=5, k=2,
                                                    load="skewed", dtype=F32, bias=True,
                                                    scatter=True, config=SMALL), 1e-5),
    "gemm-f32-no-index-default-config": (case_gemm, dict(t=13, h=32, n_out=48, e=5, k=2,
                                                         load="random", dtype=F32,
                                                         gathered=False), 1e-5),
    "gemm-bf16-single-expert": (case_gemm, dict(t=13, h=32, n_out=48, e=5, k=2, load="single",
                                                dtype=BF16, config=SMALL), 1e-2),
    "gemm-f32-T1": (case_gemm, dict(t=1, h=32, n_out=32, e=5, k=2, load="random", dtype=F32,
                                    config=SMALL), 1e-5),
    "swiglu-f32": (case_act, dict(t=13, h=32, inter=16, e=5, k=2, load="random", dtype=F32,
                                  activation="swiglu", bias=False, config=SMALL), 1e-5),
    "swiglu-f32-bias-oddI-multitile": (case_act, dict(t=40, h=40, inter=24, e=5, k=2,
                                                      load="skewed", dtype=F32,
                                                      activation="swiglu", bias=True,
                                                      config=SMALL), 1e-5),
    "swiglu-bf16-no-h": (case_act, dict(t=13, h=32, inter=16, e=5, k=2, load="skewed",
                                        dtype=BF16, activation="swiglu", bias=True,
                                        store_h=False, config=SMALL), 3e-2),
    "gptoss-f32-bias": (case_act, dict(t=13, h=32, inter=16, e=5, k=2, load="random",
                                       dtype=F32, activation="gptoss", bias=True,
                                       config=SMALL), 1e-5),
    "gptoss-f32-oddI-multitile": (case_act, dict(t=40, h=40, inter=24, e=5, k=2, load="skewed",
                                                 dtype=F32, activation="gptoss", bias=True,
                                                 config=SMALL), 1e-5),
    "gptoss-bf16": (case_act, dict(t=13, h=32, inter=16, e=5, k=2, load="random", dtype=BF16,
                                   activation="gptoss", bias=True, config=SMALL), 1e-2),
    "combine-f32-index-k2": (case_combine, dict(t=13, hdim=40, k=2, dtype=F32, indexed=True),
                             1e-6),
    "combine-bf16-k3": (case_combine, dict(t=13, hdim=300, k=3, dtype=BF16, indexed=False),
                        1e-2),
    "combine-empty": (case_combine, dict(t=0, hdim=16, k=2, dtype=F32, indexed=True), 0.0),
    "expert_mlp-swiglu-f32": (case_expert_mlp, dict(t=13, h=32, inter=16, e=5, k=2,
                                                    load="skewed", dtype=F32,
                                                    activation="swiglu", bias=False, save="h"),
                              1e-5),
    "expert_mlp-gptoss-f32-bias-save-none": (case_expert_mlp, dict(
        t=13, h=32, inter=16, e=5, k=2, load="random", dtype=F32, activation="gptoss",
        bias=True, save="none"), 1e-5),
}


if __name__ == "__main__":
    print_case_results(CASES, sys.argv[1:] or None)
