"""The memory benchmark's CPU smoke mode and its target check."""

import json

from groupmoe.bench import memory


def test_memory_bench_smoke(tmp_path, capsys):
    out = tmp_path / "mem.json"
    rows = memory.main(["--smoke", "--tokens", "32", "--repeat", "1", "--out", str(out)])
    assert [r.impl for r in rows] == list(memory.IMPLS)
    assert all(r.ms and r.peak_extra_mib is None and not r.oom for r in rows)
    assert rows[0].time_vs_naive == 1.0
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 3 and data["targets"] == []
    assert "| smoke | 32 | groupmoe save=none |" in capsys.readouterr().out


def test_target_check_reports_ratios():
    def row(impl, mib, ms):
        return memory.MemRow("qwen3-30b-a3b", 32768, "train", impl, mib, ms, mib / 1000,
                             ms / 10)

    lines = memory.check_targets([row("naive", 1000, 10), row("groupmoe save=h", 500, 10.5),
                                  row("groupmoe save=none", 450, 13)])
    assert lines[0].endswith("MISS") and "0.45" in lines[0]  # save=none over 40%
    assert lines[1].endswith("ok") and lines[2].endswith("ok")
