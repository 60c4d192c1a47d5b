"""The benchmarks' smoke modes run as a user runs them and write what their tables print."""

import json
import subprocess
import sys
from pathlib import Path

GPU_STEP = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"


def test_gpu_step_quick_on_the_cpu_times_every_contender_and_counts_newton_schulz_flops(tmp_path):
    out = tmp_path / "gpu_step.json"
    done = subprocess.run([sys.executable, str(GPU_STEP), "--device", "cpu", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["copy_bytes_per_s"] > 0 and result["bf16_flops_per_s"] > 0
    for s in result["sets"].values():
        for rows in s["steps"].values():
            assert set(rows) == {"AdamW(fused)", "REG", "REG p=inf", "REG iters=2", "torch.optim.Muon", "Muon",
                                 "Muon gram"}
            assert all(r["median_ms"] > 0 for r in rows.values())
            assert rows["AdamW(fused)"]["ratio"] == rows["torch.optim.Muon"]["ratio"] == 1.0
            assert all(r["of_bandwidth"] > 0 for n, r in rows.items() if n.startswith(("AdamW", "REG")))
        for r in s["newton_schulz"].values():
            b, m, n = r["shape"]
            small, large = min(m, n), max(m, n)
            standard = b * 5 * (4 * small * small * large + 2 * small**3)  # X Xᵀ, A², B·X per step
            assert r["flops"] == standard if r["method"] == "standard" or m == n else 0 < r["flops"] < standard
        assert f"matrices of {next(iter(result['sets']))}" in done.stdout
