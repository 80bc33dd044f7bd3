"""benchmarks/vision.py keeps working: a --quick run writes its table and plot, and MaSA costs more than MaSAD;
benchmarks/vision_compare.py builds the models its table names and measures one."""

import re
import sys

import pytest
from benchscript import load_script


@pytest.fixture(scope="module")
def vision():
    return load_script("vision")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memory is read from /proc (Linux only)")
def test_quick_run_writes_its_section_and_plot(vision, tmp_path):
    out, png = tmp_path / "benchmarks.md", tmp_path / "vision.png"
    out.write_text("# Benchmarks\n\n## Vision\n\nold table\n\n## Another section\n\nkept\n")
    vision.main(["--quick", "--out", str(out), "--plot", str(png), "--device", "cpu"])
    text = out.read_text()
    assert "old table" not in text and "## Another section\n\nkept\n" in text and text.count("## Vision") == 1
    assert "Command: `python benchmarks/vision.py --quick`" in text
    assert png.stat().st_size > 10_000
    header = re.search(r"^\| px \| (.+) \|$", text, re.M).group(1).split(" | ")
    rows = {int(m[0]): m[1].split(" | ") for m in re.findall(r"^\| (\d+) \| (.+) \|$", text, re.M)}
    assert sorted(rows) == vision.QUICK["resolutions"]
    for px, cells in rows.items():
        values = dict(zip(header, cells, strict=True))
        assert all(float(values[f"{name} img/s"]) > 0 for name in vision.VARIANTS), px
    at_64 = dict(zip(header, rows[64], strict=True))
    assert float(at_64["RMT MaSA peak MiB"]) > float(at_64["RMT MaSAD peak MiB"]), "MaSA's scores are (HW)^2"


def test_vision_compare_builds_the_models_of_the_table_and_measures_one():
    vision_compare = load_script("vision_compare")
    counts = {
        name: sum(p.numel() for p in vision_compare.build(name, 224).parameters()) for name in vision_compare.MODELS
    }
    assert {name: round(n / 1e6, 1) for name, n in counts.items()} == {
        "RMT-T (as released)": 14.3,
        "RMT-T, MaSA at every stage": 14.3,
        "RMT-T, MaSAD at every stage": 14.3,
        "ConvNeXt V2-nano": 15.6,
        "DeiT-S": 22.1,
    }
    rmt = vision_compare.build("RMT-T, MaSAD at every stage", 32)
    assert all(rmt.config.decomposed)
    result = vision_compare.measure("RMT-T (as released)", vision_compare.QUICK)
    assert result["inference"]["images_per_s"] > 0 and result["training"]["images_per_s"] > 0
