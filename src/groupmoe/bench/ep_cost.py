"""A cost model of one expert-parallel MoE layer step (``python -m groupmoe.bench.ep_cost``).

Per rank, with ``T`` tokens per rank routed to ``k`` of ``E`` experts uniformly:

* compute: the expert GEMMs of ``T * k`` rows (the same rows and FLOPs at every EP size when
  the tokens per rank are fixed), taken from a measured one-GPU step;
* communication: four all-to-alls per training step (dispatch and combine forward, their
  reverses backward), each moving ``T * k * H * bytes`` rows, of which ``(N - 1) / N`` leave
  the rank; inside a node they cross NVLink at ``nvlink_gbps`` per GPU, between nodes
  ``(N - G) / N`` of them cross the network at ``network_gbps`` per GPU (``G`` GPUs per node),
  the two links in parallel;
* a fixed cost per step (the count exchange and its host sync, the permutations) calibrated on
  the measured EP=2 point.

Without overlap the step is ``compute + comm + fixed``; pipelined over ``c`` chunks (dispatch
of chunk i+1 and combine of chunk i-1 on a communication stream while chunk i computes) it is
``max(compute, comm) + min(compute, comm) / c + fixed``: communication hides until it exceeds
compute, past which the layer is bound by the link. Per-GPU efficiency is the one-GPU step over
the EP step (the same tokens per GPU).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# Measured here (benchmarks/RESULTS.md, 2x H200, torch 2.11, 2026-11-29): qwen3-30b-a3b expert
# layer, 8192 tokens per rank, bf16, train: 4.82 ms on one GPU, 7.46 ms at EP=2 (no overlap);
# NCCL all-gather bus bandwidth between the two GPUs 270 GB/s.
MEASURED = {"one_gpu_ms": 4.82, "ep2_ms": 7.46, "nvlink_gbps": 270.0}
# Between nodes: DeepEP (deepseek-ai/DeepEP README, V2) reports 61-90 GB/s "bottleneck
# bandwidth" per Hopper GPU over ConnectX-7 RDMA for EP 8x4 and 8x2 (logical, local traffic
# included); a 400 Gb/s NIC per GPU is 50 GB/s on the wire. 50 GB/s is the default here.
NETWORK_GBPS = 50.0


@dataclass(frozen=True)
class Layer:
    hidden: int
    top_k: int
    tokens: int  # per rank
    bytes_per_value: int = 2  # bf16 rows

    def rows_bytes(self) -> float:
        """Bytes of one all-to-all's rows before the split across ranks."""
        return self.tokens * self.top_k * self.hidden * self.bytes_per_value


def comm_ms(layer: Layer, ep: int, nvlink_gbps: float, network_gbps: float,
            gpus_per_node: int = 8, all_to_alls: int = 4) -> float:
    """Milliseconds of a training step's all-to-alls at EP size ``ep``."""
    if ep <= 1:
        return 0.0
    total = layer.rows_bytes()
    in_node = min(ep, gpus_per_node)
    intra = total * (in_node - 1) / ep
    inter = total * max(ep - gpus_per_node, 0) / ep
    per_a2a = max(intra / (nvlink_gbps * 1e6),
                  inter / (network_gbps * 1e6) if inter else 0.0)
    return all_to_alls * per_a2a


MEASURED_LAYER = Layer(hidden=2048, top_k=8, tokens=8192)  # what MEASURED was measured on


def fixed_ms(ep2_ms: float, nvlink_gbps: float) -> float:
    """The per-step cost that is neither GEMM nor bandwidth: the measured EP=2 step less its
    compute and all-to-alls (taken as the same for any modelled layer)."""
    comm = comm_ms(MEASURED_LAYER, 2, nvlink_gbps, NETWORK_GBPS)
    return max(ep2_ms - MEASURED["one_gpu_ms"] - comm, 0.0)


def step_ms(compute: float, comm: float, fixed: float, chunks: int = 1) -> float:
    """One EP step; ``chunks=1``: no overlap."""
    if chunks <= 1:
        return compute + comm + fixed
    return max(compute, comm) + min(compute, comm) / chunks + fixed


def table(layer: Layer, eps=(1, 2, 4, 8, 16, 64), chunks: int = 4,
          one_gpu_ms: float = MEASURED["one_gpu_ms"], ep2_ms: float = MEASURED["ep2_ms"],
          nvlink_gbps: float = MEASURED["nvlink_gbps"], network_gbps: float = NETWORK_GBPS,
          gpus_per_node: int = 8) -> list[dict]:
    """One row per EP size: communication, step without and with overlap, efficiency."""
    fixed = fixed_ms(ep2_ms, nvlink_gbps)
    rows = []
    for ep in eps:
        comm = comm_ms(layer, ep, nvlink_gbps, network_gbps, gpus_per_node)
        extra = fixed if ep > 1 else 0.0
        serial = step_ms(one_gpu_ms, comm, extra)
        overlapped = step_ms(one_gpu_ms, comm, extra, chunks) if ep > 1 else serial
        rows.append({"ep": ep, "comm_ms": comm, "step_ms": serial, "overlap_ms": overlapped,
                     "efficiency": one_gpu_ms / serial,
                     "overlap_efficiency": one_gpu_ms / overlapped,
                     "bound": "link" if comm > one_gpu_ms else "compute"})
    return rows


def format_table(rows: list[dict], chunks: int) -> str:
    lines = [f"| EP | all-to-all ms | step ms, serial | step ms, {chunks} chunks | "
             "per-GPU efficiency, serial | overlapped | bound by |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ep']} | {r['comm_ms']:.2f} | {r['step_ms']:.2f} | "
                     f"{r['overlap_ms']:.2f} | {r['efficiency']:.2f} | "
                     f"{r['overlap_efficiency']:.2f} | {r['bound']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    p.add_argument("--one-gpu-ms", type=float, default=MEASURED["one_gpu_ms"])
    p.add_argument("--ep2-ms", type=float, default=MEASURED["ep2_ms"],
                   help="the qwen3-30b-a3b EP=2 step at 8192 tokens per rank without overlap "
                        "(calibrates the fixed cost; 4.82 models it gone)")
    p.add_argument("--nvlink-gbps", type=float, default=MEASURED["nvlink_gbps"])
    p.add_argument("--network-gbps", type=float, default=NETWORK_GBPS)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--eps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    args = p.parse_args(argv)
    layer = Layer(args.hidden, args.top_k, args.tokens)
    rows = table(layer, args.eps, args.chunks, args.one_gpu_ms, args.ep2_ms, args.nvlink_gbps,
                 args.network_gbps, args.gpus_per_node)
    fixed = fixed_ms(args.ep2_ms, args.nvlink_gbps)
    print(f"one all-to-all's rows: {layer.rows_bytes() / 1e6:.0f} MB per rank; fixed cost "
          f"{fixed:.2f} ms per step (calibrated at EP=2)")
    print(format_table(rows, args.chunks))


if __name__ == "__main__":
    main()
