"""Smoke test of benchmarks/chunked_loss.py (training-step memory and speed, loss block by block vs materialized
logits) at a tiny size: one cell, one repeat. It checks the report, not the measurements' values."""

import pytest

from test_benchmark import assert_ratio, load_benchmark, table_rows

chunked_loss = load_benchmark("chunked_loss")


def test_report_has_the_cell_s_rows_ratios_agreement_and_plot(tmp_path):
    output, plot = tmp_path / "chunked_loss.md", tmp_path / "chunked_loss.png"
    assert chunked_loss.main(["--size", "tiny", "--vocabularies", "256", "--tokens", "64", "--repeats", "1",
                              "--large-repeats", "1", "--output", str(output), "--plot", str(plot)]) == 0
    text = output.read_text()
    memory, speed = table_rows(text, "256 | 64 |")  # the cell's row in the memory table, then in the speed table
    assert float(memory[2]) == 256 * 64 * 4 / 2**20  # one fp32 copy of the logits, in MiB
    assert speed[2] == "1"  # repeats
    for row, first in ((memory, 3), (speed, 3)):
        chunked, materialized, native, chunked_ratio, materialized_ratio = row[first:first + 5]
        for value, ratio in ((chunked, chunked_ratio), (materialized, materialized_ratio)):
            if float(native) == 0:  # a peak memory growth below the kernel's counter resolution
                assert ratio == "nan", row
            else:
                assert_ratio(ratio, value, native)
    agreement = text.split("Agreement at vocabulary 256, 64 tokens")[1]
    differences = [float(word.rstrip(",;.")) for word in agreement.split() if "e-" in word]
    assert len(differences) == 4 and all(difference <= 1e-5 for difference in differences), agreement
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("flag, value", [("--tokens", "63"), ("--vocabularies", "256,x"), ("--tokens", "0")])
def test_bad_grid_is_refused_before_any_measurement(flag, value, capsys):
    with pytest.raises(SystemExit):
        chunked_loss.main(["--size", "tiny", flag, value])
    assert flag in capsys.readouterr().err
