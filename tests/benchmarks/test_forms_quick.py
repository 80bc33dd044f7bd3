"""benchmarks/forms.py keeps working: a --quick run writes its table and checks its claims."""

import re
import sys

import pytest
from benchscript import load_script


@pytest.fixture(scope="module")
def forms():
    return load_script("forms")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memory is read from /proc (Linux only)")
def test_quick_run_writes_its_section_and_keeps_the_others(forms, tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n## Retention forms\n\nold table\n\n## Another section\n\nkept\n")
    forms.main(["--quick", "--out", str(out)])
    text = out.read_text()
    assert "old table" not in text and "## Another section\n\nkept\n" in text and text.count("## Retention forms") == 1
    assert "Command: `python benchmarks/forms.py --quick`" in text
    rows = {int(m[0].replace(",", "")): m[1:] for m in re.findall(r"^\| ([\d,]+) \| (.+) \| (.+) \|$", text, re.M)}
    for T in forms.QUICK["lengths"]:
        assert T in rows
    assert len(re.findall(r"^- (PASS|FAIL): ", text, re.M)) == 2
    table = re.findall(
        r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M
    )
    peak = {int(r[0]): float(r[2]) for r in table}  # parallel: T x T scores, memory grows as T^2
    assert peak[256] > max(1.0, 4 * peak[64])  # MiB


def test_write_section_appends_when_absent(forms, tmp_path):
    out = tmp_path / "b.md"
    forms.write_section(out, "## Retention forms\n\nnew\n")
    assert out.read_text() == "# Benchmarks\n\n## Retention forms\n\nnew\n"
