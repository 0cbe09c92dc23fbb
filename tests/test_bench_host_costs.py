"""bench_host_costs runs end to end on small sizes and writes its table's rows (timings are not checked)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_host_costs_writes_a_row_per_cache_size(tmp_path):
    out = tmp_path / "host.json"
    run = subprocess.run([sys.executable, "-m", "jaxserve.launch.bench_host_costs", "--cached_bursts=1,3",
                          "--repeats=2", f"--out={out}"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["cached_bursts"] for r in rows] == [1, 3]
    assert [r["index_nodes"] for r in rows] == [9, 27]  # a prefix node and 8 suffix nodes per burst
    assert rows[0]["cached_pages"] == 32 + 8 * 2  # the 512-token prefix and 8 suffixes of 32 tokens
    assert "| cached bursts |" in run.stdout
