"""The benchmark's own smoke test: the side-by-side comparison runs end to end at a tiny size."""

import importlib.util
import math
from pathlib import Path


def load_benchmark():
    path = Path(__file__).parents[1] / "benchmarks" / "compare_native.py"
    spec = importlib.util.spec_from_file_location("compare_native", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_and_writes_the_ratio_table(tmp_path):
    benchmark = load_benchmark()
    output = tmp_path / "table.md"
    assert benchmark.main(["--size", "tiny", "--repeats", "1", "--styles", "gpt2", "--output", str(output)]) == 0
    text = output.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| gpt2 |")]
    measures = {row.split("|")[2].strip() for row in rows}
    assert measures == {"training step", "training FLOP/s / matmul peak", "inference forward",
                        "greedy generation, batch 1", "greedy generation, batch 8", "training step peak memory"}
    for row in rows:
        blueprint, native = (float(cell) for cell in row.split("|")[4:6])
        assert math.isfinite(blueprint) and math.isfinite(native) and blueprint >= 0 and native >= 0, row
