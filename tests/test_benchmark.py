"""The benchmarks' own smoke tests: each runs end to end at a tiny size and writes its markdown."""

import importlib.util
import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_benchmark_runs_and_writes_the_ratio_table(tmp_path):
    benchmark = load_benchmark("compare_native")
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
    assert "load average" in text.splitlines()[0]


@pytest.fixture(scope="module")
def sst2_markdown(tmp_path_factory) -> str:
    output = tmp_path_factory.mktemp("sst2") / "sst2.md"
    benchmark = load_benchmark("sst2_padding_free")
    assert benchmark.main(["--shapes", "tiny", "--train-shapes", "tiny", "--repeats", "1", "--train-steps", "3",
                           "--max-texts", "300", "--vocab-size", "400", "--output", str(output)]) == 0
    return output.read_text()


def test_sst2_benchmark_reports_effective_tokens_per_second_of_each_path(sst2_markdown):
    rows = [row for row in table_rows(sst2_markdown, "tiny (") if len(row) == 6]
    assert [row[3] for row in rows] == ["native padded", "Blueprint padded", "Blueprint packed"]
    for row in rows:
        tokens_per_second, ratio = float(row[4].replace(",", "")), float(row[5])
        assert math.isfinite(tokens_per_second) and tokens_per_second > 0 and ratio > 0, row
    assert float(rows[0][5]) == 1.0  # native padded is the reference


def test_sst2_benchmark_trains_the_three_paths_alike(sst2_markdown):
    rows = table_rows(sst2_markdown, "tiny |")
    assert [row[2] for row in rows] == ["native padded", "Blueprint padded", "Blueprint packed"]
    for row in rows:
        assert float(row[5]) < 1e-4, row  # largest per-step loss difference from native padded
    assert len({row[6] for row in rows}) == 1  # the same dev accuracy


def test_generation_profile_splits_generate_overhead_from_the_forward(tmp_path):
    output = tmp_path / "profile.md"
    benchmark = load_benchmark("profile_generation")
    assert benchmark.main(["--size", "tiny", "--styles", "gpt2", "--repeats", "1", "--rows", "3",
                           "--output", str(output)]) == 0
    text = output.read_text()
    rows = table_rows(text, "Blueprint |") + table_rows(text, "native |")
    assert len(rows) == 2
    for row in rows:
        generate_ms, forward_ms, overhead_ms = (float(cell) for cell in row[1:4])
        assert generate_ms > 0 and forward_ms > 0 and overhead_ms == pytest.approx(generate_ms - forward_ms, abs=2e-3)
    assert text.count("Top operators of one") == 2
