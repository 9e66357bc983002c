"""The README's main job and the benchmark run end to end (CPU smoke sizes)."""

import json
import subprocess
import sys

import torch

from groupmoe.bench.layer import DEFAULT_IMPLS, IMPLS, bench_layer
from groupmoe.bench.shapes import SHAPES, SMOKE_SHAPE
from groupmoe.demo import run_demo


def test_demo_losses_match_and_decrease():
    lines = []
    result = run_demo("cpu", steps=4, log=lines.append)
    assert result["max_loss_diff"] < 1e-4
    losses = result["groupmoe"][0]
    assert losses[-1] < losses[0]
    assert sum("] step" in line for line in lines) == 8  # progress per step, both runs
    assert any("tokens/s" in line for line in lines)


def test_bench_smoke_rows():
    rows = bench_layer([SMOKE_SHAPE], 32, repeat=2, device="cpu", log=lambda s: None)
    assert {(r.mode, r.impl) for r in rows} == {(m, i) for m in ("train", "frozen")
                                                for i in DEFAULT_IMPLS}
    assert all(r.ms > 0 and r.tflops > 0 for r in rows)
    dense = [r for r in rows if r.impl == "dense"]
    assert all(r.x_dense == 1.0 for r in dense)


def test_bench_flops_formula():
    s = SHAPES["qwen3-30b-a3b"]
    assert s.flops_per_pass(8192) == 2 * 8192 * 8 * 3 * 2048 * 768


def test_cli_bench_writes_json(tmp_path):
    out = tmp_path / "b.json"
    subprocess.run([sys.executable, "-m", "groupmoe", "bench", "--smoke", "--repeat", "2",
                    "--impls", "naive", "groupmoe", "--modes", "frozen", "--out", str(out)],
                   check=True, capture_output=True)
    data = json.loads(out.read_text())
    assert [r["impl"] for r in data["rows"]] == ["naive", "groupmoe"]
    assert data["env"]["torch"]


def test_cli_rejects_unknown_shape():
    proc = subprocess.run([sys.executable, "-m", "groupmoe", "bench", "--shapes", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown shapes" in proc.stderr


def test_bench_recompute_impl_runs():
    rows = bench_layer([SMOKE_SHAPE], 16, modes=("train",),
                       impls=("groupmoe", "groupmoe-recompute", "groupmoe-torch",
                              "groupmoe-fp8"),
                       repeat=1, device="cpu", log=lambda s: None)
    assert [r.impl for r in rows] == ["groupmoe", "groupmoe-recompute", "groupmoe-torch",
                                      "groupmoe-fp8"]
    assert "groupmoe-triton" in IMPLS


def test_bench_peer_unavailable_is_reported_not_timed():
    logs = []
    rows = bench_layer([SMOKE_SHAPE], 16, modes=("train",), impls=("liger", "sonicmoe", "dense"),
                       repeat=2, device="cpu", log=logs.append)
    assert [r.impl for r in rows] == ["dense"]
    for peer in ("liger", "sonicmoe"):
        assert any(peer in line and "skipped: needs CUDA" in line for line in logs)


def test_bench_whole_layer_block_and_forward_mode():
    """``block`` (MoEBlock with its router) in every mode; ``forward`` runs no backward; the
    first step's time is reported (memory is CUDA-only)."""
    from groupmoe.bench.layer import LayerProblem

    rows = bench_layer([SMOKE_SHAPE], 16, modes=("train", "forward"), impls=("block", "dense"),
                       repeat=1, device="cpu", log=lambda s: None)
    assert [(r.mode, r.impl) for r in rows] == [("train", "block"), ("train", "dense"),
                                                ("forward", "block"), ("forward", "dense")]
    assert all(r.first_step_s > 0 and r.held_mib is None for r in rows)
    prob = LayerProblem(SMOKE_SHAPE, 16, "forward", "cpu", torch.float32)
    prob.step_fn("block")(0)
    assert all(p.grad is None for p in prob.params())


def test_wgrad_split_bench_smoke(tmp_path):
    out = tmp_path / "w.json"
    subprocess.run([sys.executable, "-m", "groupmoe.bench.wgrad_split", "--smoke", "--repeat",
                    "1", "--out", str(out)], check=True, capture_output=True)
    row = json.loads(out.read_text())["rows"][0]
    assert row["dx_ms"] > 0 and row["dw_ms"] > 0 and row["full_bwd_ms"] > 0


def test_hf_e2e_bench_smoke(tmp_path):
    import pytest

    pytest.importorskip("transformers")
    out = tmp_path / "hf.json"
    subprocess.run([sys.executable, "-m", "groupmoe.bench.hf_e2e", "--smoke", "--models",
                    "qwen3-30b-a3b", "--impls", "eager", "groupmoe", "groupmoe-fp8", "--out",
                    str(out)],
                   check=True, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    # transformers' eager experts run eager only (compiled they break the graph per expert)
    assert [(r["impl"], r["mode"]) for r in rows] == [
        ("eager", "eager"), ("groupmoe", "eager"), ("groupmoe-fp8", "eager"),
        ("groupmoe", "compiled"), ("groupmoe-fp8", "compiled")]
    assert all(r["ms"] > 0 and r["first_step_s"] > 0 for r in rows)


def test_fsdp_bench_smoke(tmp_path):
    import pytest

    pytest.importorskip("transformers")
    out = tmp_path / "fsdp.json"
    subprocess.run([sys.executable, "-m", "groupmoe.bench.fsdp_bench", "--smoke", "--gpus", "1",
                    "2", "--out", str(out)], check=True, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [r["gpus"] for r in rows] == [1, 2] and all(r["tokens_per_s"] > 0 for r in rows)


def test_ep_cost_model_calibrates_on_ep2_and_finds_the_link_bound():
    from groupmoe.bench.ep_cost import MEASURED, Layer, comm_ms, step_ms, table

    layer = Layer(hidden=2048, top_k=8, tokens=8192)
    assert layer.rows_bytes() == 8192 * 8 * 2048 * 2
    # EP=2 inside a node: half the rows leave, four all-to-alls at the NVLink bandwidth
    assert comm_ms(layer, 2, 100.0, 10.0) == 4 * layer.rows_bytes() / 2 / 100e6
    rows = {r["ep"]: r for r in table(layer, (1, 2, 8, 16), chunks=4)}
    assert rows[1]["efficiency"] == 1.0
    assert abs(rows[2]["step_ms"] - MEASURED["ep2_ms"]) < 1e-9  # the calibration point
    assert rows[8]["bound"] == "compute" and rows[16]["bound"] == "link"
    assert rows[8]["overlap_ms"] < rows[8]["step_ms"]
    assert step_ms(4.0, 1.0, 0.5, chunks=1) == 5.5 and step_ms(4.0, 1.0, 0.5, chunks=4) == 4.75


def test_host_bench_smoke(tmp_path, capsys):
    """groupmoe.bench.host on CPU: every piece timed, host and wall positive, JSON written."""
    from groupmoe.bench import host

    out = tmp_path / "host.json"
    host.main(["--smoke", "--calls", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["piece"] for r in rows} >= {"build_routing", "experts forward+backward",
                                          "NF4 experts forward+backward"}
    assert all(r["host_ms"] > 0 and r["wall_ms"] > 0 for r in rows)
    assert "| build_routing |" in capsys.readouterr().out


def test_saved_bench_smoke(capsys):
    """groupmoe.bench.saved on CPU: the block's saved tensors by kind, routing ints included."""
    from groupmoe.bench import saved

    saved.main(["--smoke", "--impl", "block"])
    out = capsys.readouterr().out
    assert "| parameter | [8, 64, 64] |" in out and "| input | [32, 64] |" in out
    assert "| activation | [64, 64] | float32 |" in out  # h: 32 tokens x k 2, 2I = 64
    assert "saved activations" in out
