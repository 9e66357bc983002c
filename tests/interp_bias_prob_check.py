"""Run by test_bias_prob.py in a subprocess with TRITON_INTERPRET=1 (set before triton is
imported): the dbias/dprob kernel and the segment-sum kernel on CPU tensors against the torch
formula in fp64."""

import torch

from groupmoe.kernels.bias_prob import bias_prob_grads as kernel
from groupmoe.kernels.bias_prob import segment_sum
from groupmoe.ops import build_routing
from moe_cases import make_ids, rel_err


def reference(dy, prob, bias, expert_index):
    dyd = dy.double()
    dbias = torch.zeros(bias.shape, dtype=torch.float64).index_add_(
        0, expert_index, dyd * prob.double().unsqueeze(1))
    return dbias, (dyd * bias.double()[expert_index]).sum(1)


torch.manual_seed(0)
cases = [  # t, k, e, h, load, dy dtype
    (13, 2, 5, 13, "skewed", torch.float32),
    (30, 3, 8, 100, "random", torch.bfloat16),
    (21, 2, 6, 37, "single", torch.float16),  # two experts hold every row
    (1, 1, 4, 7, "random", torch.float32),
    (0, 2, 3, 9, "random", torch.float32),  # no rows at all
]
for t, k, e, h, load, dtype in cases:
    r = build_routing(make_ids(t, k, e, load), e)
    m = t * k
    # non-contiguous views of every input: a column slice of dy, strided prob and bias
    dy = torch.randn(m, h + 5).to(dtype)[:, 2:h + 2]
    prob = torch.randn(2 * m)[::2]
    bias = torch.randn(h, e).to(dtype).t()
    for offsets in (r.offsets, r.offsets.long()):
        db, dp = kernel(dy, prob, bias, offsets, r.expert_index)
        rdb, rdp = reference(dy, prob, bias, r.expert_index)
        assert db.dtype == dp.dtype == torch.float32 and db.shape == (e, h) and dp.shape == (m,)
        tol = 1e-6
        assert rel_err(db, rdb) < tol if rdb.norm() else not db.any(), (t, h, dtype)
        assert rel_err(dp, rdp) < tol if rdp.norm() else not dp.any(), (t, h, dtype)
        empty = r.counts == 0
        assert not db[empty].any(), "empty experts must get exact zeros"
        # the gate_up bias gradient: the same walk without prob, read in place
        ss = segment_sum(dy, offsets)
        ref = torch.zeros(e, h, dtype=torch.float64).index_add_(0, r.expert_index, dy.double())
        assert ss.dtype == torch.float32 and ss.shape == (e, h)
        assert rel_err(ss, ref) < tol if ref.norm() else not ss.any(), (t, h, dtype)
        assert not ss[empty].any(), "empty experts must get exact zeros"
print("interp-ok")
