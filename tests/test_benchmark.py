"""The benchmarks' own smoke tests: each runs end to end at a tiny size and writes its markdown."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_benchmark(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # the benchmarks import their sibling compare_native.py, as when run
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def decimals(cell: str) -> int:
    return len(cell.split(".")[1]) if "." in cell else 0


def rounding_of(cell: str) -> float:
    """Half a unit of the last digit printed: how far the printed number can be from the one computed."""
    mantissa = cell.lower().split("e")[0]
    exponent = int(cell.lower().split("e")[1]) if "e" in cell.lower() else 0
    return 0.5 * 10.0 ** (exponent - decimals(mantissa))


def assert_ratio(ratio_cell: str, numerator_cell: str, denominator_cell: str):
    """The printed ratio is the printed numerator over the printed denominator, up to the rounding of all three."""
    numerator, denominator = (float(c.replace(",", "")) for c in (numerator_cell, denominator_cell))
    n_error, d_error = rounding_of(numerator_cell.replace(",", "")), rounding_of(denominator_cell.replace(",", ""))
    low = (numerator - n_error) / (denominator + d_error)
    high = (numerator + n_error) / (denominator - d_error)
    r_error = rounding_of(ratio_cell)
    assert low - r_error <= float(ratio_cell) <= high + r_error, (ratio_cell, numerator_cell, denominator_cell)


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
        blueprint, native, ratio = (cell.strip() for cell in row.split("|")[4:7])
        if float(native) == 0:  # a peak memory growth below the kernel's counter resolution
            assert ratio == "nan", row
        else:
            assert math.isfinite(float(blueprint)) and math.isfinite(float(native)), row
            assert_ratio(ratio, blueprint, native)
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
    # One repeat: the ratio (a median of per-repeat ratios) is the path's tokens/s over native padded's.
    for row in rows:
        assert_ratio(row[5], row[4], rows[0][4])
    assert float(rows[0][5]) == 1.0  # native padded is the reference


def test_sst2_benchmark_trains_the_three_paths_alike(sst2_markdown):
    rows = table_rows(sst2_markdown, "tiny |")
    assert [row[2] for row in rows] == ["native padded", "Blueprint padded", "Blueprint packed"]
    for row in rows:
        assert float(row[5]) < 1e-4, row  # largest per-step loss difference from native padded
        # The same function, not only the same accuracy (which a model predicting one class everywhere would give on
        # any path): every dev prediction as native padded's, every logit within float rounding of it.
        assert row[7] == "872 / 872", row
        assert float(row[8]) < 1e-4, row
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
        assert overhead_ms == pytest.approx(generate_ms - forward_ms, abs=2e-3)
        assert 0 <= float(row[4].rstrip("%")) <= 100, row  # matmul share of one call's CPU time
    # tokens/s is 1000 / (ms per token): Blueprint's over native's is native's ms over Blueprint's.
    (ratio,) = [line.rsplit(": ", 1)[1] for line in text.splitlines() if line.startswith("generate() tokens/s")]
    blueprint, native = (row for row in rows if row[0] == "Blueprint"), (row for row in rows if row[0] == "native")
    assert_ratio(ratio, next(native)[1], next(blueprint)[1])
    assert text.count("Top operators of one") == 2
    # Each table lists the --rows 3 operators that took the most time, most first.
    for table in text.split("Top operators of one")[1:]:
        times = [float(row[2]) for row in table_rows(table, "`")]
        assert len(times) == 3 and times == sorted(times, reverse=True), table
