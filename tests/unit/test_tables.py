"""The fixed-width text table of the Hugging Face recipes, and the two tables they print with it."""
from __future__ import annotations

import pytest

from branchify.recipes.tables import fixed_width_table


def test_titles_take_alignment_and_width_cells_the_whole_spec():
    table = fixed_width_table([("name", "<6"), ("acc", ">7.1f"), ("n", "^5,")],
                              [("a", 9.25, 1234), ("longname", 100.0, 7)])
    assert table.split("\n") == [
        "name       acc   n  ",
        "--------------------",
        "a          9.2 1,234",          # 9.25 rounds half to even
        "longname   100.0   7  ",        # an overflowing cell pushes the line right
    ]


def test_no_rows_gives_the_titles_and_the_rule():
    assert fixed_width_table([("method", "<8"), ("s", ">3")], []) == "method     s\n------------"


def test_bad_spec_and_ragged_row_are_refused():
    with pytest.raises(ValueError, match="spec '.2f' must start with an alignment and a width"):
        fixed_width_table([("acc", ".2f")], [])
    with pytest.raises(ValueError, match=r"a row has 1 cells for 2 columns: \('x',\)"):
        fixed_width_table([("a", "<3"), ("b", ">3")], [("x",)])


def test_hf_text_table_as_printed():
    from branchify.recipes.hf_text import format_table

    rows = [{"method": "baseline", "accuracy": 0.91234, "train_time_s": 12.3, "trained_params": 1234567,
             "deployed_params": 1234567},
            {"method": "one", "accuracy": 0.9, "train_time_s": 1234.56, "trained_params": 3_000_000_000,
             "deployed_params": 99, "leaves": 3, "bleu": 27.349}]
    assert format_table(rows, "translate").split("\n") == [
        "method      token acc   bleu leaves  params(train) params(deploy)  train s",
        "--------------------------------------------------------------------------",
        "baseline        91.23      -      1      1,234,567      1,234,567     12.3",
        "one             90.00   27.3      3  3,000,000,000             99   1234.6",
    ]
    assert format_table(rows, "classify").startswith("method       accuracy   bleu")


def test_hf_vit_table_as_printed():
    from branchify.recipes.hf_vit_fashion_mnist import format_table

    rows = [{"method": "baseline", "target_accuracy": 0.8512, "train_time_s": 3.0, "trained_params": 40000,
             "deployed_params": 40000, "ensemble_accuracy": None},
            {"method": "tsa", "target_accuracy": 0.86, "train_time_s": 99999.9, "trained_params": 12_345_678_901,
             "deployed_params": 40000, "ensemble_accuracy": 0.87777, "leaves": 4}]
    assert format_table(rows).split("\n") == [
        "method     target acc  ensemble leaves params(train) params(deploy)  train s",
        "----------------------------------------------------------------------------",
        "baseline        85.12         -      1        40,000         40,000      3.0",
        "tsa             86.00     87.78      4 12,345,678,901         40,000  99999.9",
    ]
