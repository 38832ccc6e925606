"""bench/gpu.py, the script a session with a GPU runs as it is, kept working without one: its quick CPU
mode runs the same code (matmul peak, BERT-base MFU, the prefetching embedding stream, the
sentence-transformers reference) and prints every figure."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def test_gpu_bench_quick_mode_prints_every_figure():
    done = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cpu", "--quick", "--texts", "32"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    peak = float(re.search(r"^peak: ([\d.]+) TFLOP/s", out, re.M).group(1))
    mfu = float(re.search(r"^mfu: .* = ([\d.]+) of the peak", out, re.M).group(1))
    stream = re.search(r"^stream: MiniLM (\d+) texts, .* padding ([\d.]+)% .* device busy ([\d.]+)", out, re.M)
    ratio = re.search(r"^st: .* userlens ÷ sentence-transformers ([\d.]+) .* min cosine ([\d.]+)", out, re.M)
    assert peak > 0 and 0 < mfu <= 1.5  # model FLOP/s over a measured matmul peak (noise allows a little above 1)
    assert stream and int(stream.group(1)) == 32 and 0 <= float(stream.group(2)) < 100
    assert 0 < float(stream.group(3)) <= 1
    assert ratio and float(ratio.group(1)) > 0
    assert float(ratio.group(2)) >= 0.9999  # the same vectors as sentence-transformers (float32 on CPU)
    assert "| device busy |" in out and "| BERT-base MFU at 256 tokens |" in out
