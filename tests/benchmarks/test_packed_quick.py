"""benchmarks/packed.py keeps working: a --quick run writes its table and states its claim."""

import re

import pytest
from benchscript import load_script


@pytest.fixture(scope="module")
def packed():
    return load_script("packed")


def test_quick_run_writes_its_section_and_keeps_the_others(packed, tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n## Packed documents\n\nold table\n\n## Another section\n\nkept\n")
    packed.main(["--quick", "--out", str(out)])
    text = out.read_text()
    assert "old table" not in text and "## Another section\n\nkept\n" in text and text.count("## Packed documents") == 1
    assert "Command: `python benchmarks/packed.py --quick`" in text
    row = r"^\| (uneven|even) \((.+)\) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \(([\d,]+) tokens\) \|"
    rows = re.findall(row, text, re.M)
    assert [r[0] for r in rows] == ["uneven", "even"]
    T = packed.QUICK["tokens"]
    padded_tokens = {r[0]: int(r[5].replace(",", "")) for r in rows}
    assert padded_tokens == {"uneven": 33 * T // 2, "even": T}  # 33 rows of the longest; 16 rows of T/16
    assert len(re.findall(r"^- (PASS|FAIL): ", text, re.M)) == 2


def test_the_three_ways_carry_the_same_documents(packed):
    """The packed row, the padded rows and the one-document row hold the same tokens, and the packed row's
    position_ids restart where each padded row begins."""
    lengths = [8, 3, 3, 2]
    ways = packed.batches(lengths, vocab=50)
    row, positions = ways["packed"]["input_ids"][0], ways["packed"]["position_ids"][0]
    rows, mask = ways["padded"]["input_ids"], ways["padded"]["attention_mask"]
    assert rows.shape == (4, 8) and mask.sum(1).tolist() == lengths
    assert row.tolist() == rows[mask.bool()].tolist() == ways["one document"]["input_ids"][0].tolist()
    assert (positions == 0).nonzero().flatten().tolist() == [0, 8, 11, 14]
