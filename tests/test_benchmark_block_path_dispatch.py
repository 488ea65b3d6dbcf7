"""Smoke test of benchmarks/block_path_dispatch.py (block path against the band-masked SDPA it replaces) at one tiny
cell, one repeat. It checks the report, not the measurements' values."""

import pytest
import torch

from test_benchmark import assert_ratio, load_benchmark, table_rows

block_path_dispatch = load_benchmark("block_path_dispatch")


def test_report_has_a_row_per_cell_with_both_directions_ratios(capsys):
    assert block_path_dispatch.main(["--lengths", "32", "64", "--windows", "8", "32", "--repeats", "1",
                                     "--batch", "1"]) == 0
    text = capsys.readouterr().out
    rows = table_rows(text, "32 |") + table_rows(text, "64 |")
    assert [(row[0], row[1], row[2]) for row in rows] == [("32", "8", "4"), ("64", "8", "8"), ("64", "32", "2")]
    for row in rows:
        assert_ratio(row[5], row[4], row[3])  # causal: block / band
        assert_ratio(row[8], row[7], row[6])  # bidirectional


def test_band_mask_is_the_window_the_block_path_attends():
    query, key, value = (torch.randn(1, 4, 40, 32, dtype=torch.float64) for _ in range(3))
    for causal in (True, False):
        band = block_path_dispatch.band_masked_sdpa(5, causal)(query, key, value)
        block = block_path_dispatch.block_path(5, causal)(query, key, value).transpose(1, 2)
        torch.testing.assert_close(block, band)


@pytest.mark.parametrize("flag", ["--lengths", "--windows", "--batch", "--repeats"])
def test_non_positive_sizes_are_refused_naming_the_flags(flag, capsys):
    with pytest.raises(SystemExit):
        block_path_dispatch.main([flag, "0"])
    assert flag in capsys.readouterr().err
