"""Run by test_kernels.py in a subprocess with TRITON_INTERPRET=1 and
GROUPMOE_BACKEND=triton: the Triton kernels against the torch path and the oracle."""

import torch

from groupmoe.ops import Activation, backend, get_activation
from groupmoe.ops.activations import scaled_backward, scaled_forward
from moe_cases import make_case, rel_err, run

assert backend.get_backend() == "triton"
torch.manual_seed(0)
# the standalone activation kernel: every function, gate layout, clamp and offset
ACTS = {name: get_activation(name) for name in ("swiglu", "gptoss", "geglu", "relu2")}
ACTS.update({
    "gelu-erf": Activation("gelu"), "relu-gated": Activation("relu"),
    "silu-clamped": Activation(gate_limit=7.0, up_limit=7.0),  # deepseek-v4's
    "sigmoid-alpha-interleaved": Activation("sigmoid_alpha", layout="interleaved", alpha=1.5),
    "gelu-tanh-plain-fp32": Activation("gelu_tanh", gated=False, gate_limit=7.0, fp32=True),
})
for name, act in ACTS.items():
    for m, i in ((37, 13), (5, 130), (0, 8)):
        h = torch.randn(m, (2 if act.gated else 1) * i) * 4
        if m:
            h[0, :4] = 7.0  # on the clamp limit
            h[1, :4] = -7.0
        g = torch.randn(m)
        da = torch.randn(m, i)
        assert backend.use_triton(h)
        out = scaled_forward(act, h, g)
        backend.set_backend("torch")
        ref = scaled_forward(act, h, g)
        ref_dh, ref_a, ref_dg = scaled_backward(act, h, g, da.clone(), True, True)
        backend.set_backend("triton")
        dh, a, dg = scaled_backward(act, h, g, da.clone(), True, True)
        if m:
            assert rel_err(out, ref) < 1e-6, (name, m, i)
            assert rel_err(dh, ref_dh) < 1e-6 and rel_err(a, ref_a) < 1e-6
            assert rel_err(dg, ref_dg) < 1e-5, (name, rel_err(dg, ref_dg))
    if name not in ("swiglu", "gptoss"):
        continue
    for save in ("h", "none"):
        case = make_case(29, 16, 12, 5, 2, torch.float32, bias=name == "gptoss",
                         activation=name, load="skewed", signed_gates=True)
        backend.set_backend("torch")
        ref, ref_grads, up = run(case, "loop")
        backend.set_backend("triton")
        out, grads, _ = run(case, "groupmoe", save, upstream=up)
        assert rel_err(out, ref) < 1e-5
        for k in ref_grads:
            assert rel_err(grads[k], ref_grads[k]) < 1e-5, (name, save, k)
from groupmoe.ops import build_routing, gather_sum  # noqa: E402
from groupmoe.ops.routing import combine  # noqa: E402

for t, k, h in ((13, 3, 20), (1, 1, 5), (40, 2, 300)):
    ids = torch.stack([torch.randperm(6)[:k] for _ in range(t)])
    r = build_routing(ids, 6)
    rows = torch.randn(t * k, h)
    backend.set_backend("triton")
    assert rel_err(gather_sum(rows, r, torch.float32), combine(rows, r)) < 1e-6
from groupmoe.ops import bias_prob_grads  # noqa: E402

for t, k, e, h in ((13, 2, 5, 13), (30, 3, 8, 100), (1, 1, 4, 7)):
    ids = torch.stack([torch.randperm(e // 2 + 1)[:k] for _ in range(t)])  # empty experts
    r = build_routing(ids, e)
    dy, prob, bias = torch.randn(t * k, h), torch.randn(t * k), torch.randn(e, h)
    backend.set_backend("triton")
    db, dp = bias_prob_grads(dy, prob, bias, r)
    backend.set_backend("torch")
    rdb, rdp = bias_prob_grads(dy, prob, bias, r)
    assert db.dtype == dp.dtype == torch.float32
    assert rel_err(db, rdb) < 1e-6 and rel_err(dp, rdp) < 1e-6
    assert torch.count_nonzero(db[e // 2 + 1:]) == 0
    # dy read in place through a row index (the fused backward's [T, H] output gradient)
    backend.set_backend("triton")
    db_i, dp_i = bias_prob_grads(dy[:t], prob, bias, r, r.token_index)
    backend.set_backend("torch")
    rdb_i, rdp_i = bias_prob_grads(dy[:t].index_select(0, r.token_index), prob, bias, r)
    assert rel_err(db_i, rdb_i) < 1e-6 and rel_err(dp_i, rdp_i) < 1e-6
print("interp-ok")
