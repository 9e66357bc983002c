"""Helpers for the multi-process (gloo) tests and their worker scripts."""

import socket

import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_grads_match(named_params, ref_grads: dict, tol: float, where) -> None:
    """Every parameter has a gradient within ``tol`` relative norm of ``ref_grads[name]``."""
    for n, p in named_params:
        assert p.grad is not None, (where, n)
        err = float((p.grad - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-300))
        assert err < tol, (where, n, err)


def finish(rank: int) -> None:
    """Tear gloo down only once every rank is done, then report success."""
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} ok")
