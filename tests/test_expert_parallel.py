"""Expert parallelism over gloo: 2 and 4 processes against the single-process oracle."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from groupmoe.nn import GroupedExperts
from groupmoe.parallel.expert_parallel import ExpertParallel, shard_experts

HERE = Path(__file__).parent


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_oracle(world):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE),
                                                       os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(HERE / "ep_worker.py"), str(r), str(world),
                               str(port)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    outs = [p.communicate(timeout=180) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"rank {r} ok" in out, err[-3000:]


def test_errors_without_distributed_setup():
    with pytest.raises(ValueError, match="do not divide"):
        shard_experts(GroupedExperts(8, 4, 6), 0, 4)
    assert not dist.is_initialized()
    with pytest.raises((ValueError, RuntimeError)):
        ExpertParallel(GroupedExperts(8, 4, 2), 4)  # no process group


def test_shard_is_a_slice():
    full = GroupedExperts(8, 4, 6, bias=True)
    part = shard_experts(full, 1, 3)
    assert torch.equal(part.gate_up, full.gate_up[2:4])
    assert torch.equal(part.down_bias, full.down_bias[2:4])
