"""benchmarks/segmentation.py keeps working: its scenes carry the masks they claim, its scores are IoU and pixel
accuracy, and a --quick run trains UperNet on each backbone and writes its table."""

import re

import pytest
import torch
from benchscript import load_script


@pytest.fixture(scope="module")
def segmentation():
    return load_script("segmentation")


def test_scenes_label_each_items_ink_with_its_class(segmentation):
    items = torch.zeros(4, 28, 28)
    for i in range(4):
        items[i, 4 + i : 20, 6:22] = 0.1 + 0.3 * i  # item 0 too faint to count as ink
    labels = torch.tensor([3, 5, 7, 9])
    images, masks = segmentation.scenes(items, labels, count=6, side=64, seed=0)
    assert images.shape == (6, 1, 64, 64) and masks.shape == (6, 64, 64)
    raw = images[:, 0] * 0.353 + 0.286
    assert set(masks.unique().tolist()) <= {0, 6, 8, 10}  # class + 1; item 0 never
    torch.testing.assert_close((masks > 0).float(), (raw > segmentation.INK).float())
    for quadrant in range(4):  # one item per quadrant: one class in each
        y, x = 32 * (quadrant // 2), 32 * (quadrant % 2)
        assert all(len(m[y : y + 32, x : x + 32].unique()) <= 2 for m in masks)
    small_images, small_masks = segmentation.scenes(items, labels, count=6, side=32, seed=0)
    assert small_images.shape == (6, 1, 32, 32)
    torch.testing.assert_close(small_masks, masks[:, ::2, ::2])  # nearest: the same scenes, halved


def test_scores_are_mean_iou_and_pixel_accuracy(segmentation):
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 2]])
    assert segmentation.scores(mask, mask) == (1.0, 1.0)
    predicted = torch.tensor([[0, 0, 1, 2], [0, 0, 1, 2]])
    miou, accuracy = segmentation.scores(predicted, mask)
    assert accuracy == 7 / 8 and miou == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)


def test_quick_run_writes_its_section_and_keeps_the_others(segmentation, tmp_path):
    from retentive.data.images import fashion_mnist_dir

    try:
        fashion_mnist_dir()
    except FileNotFoundError:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    out = tmp_path / "benchmarks.md"
    markers = "<!-- bench:segmentation:start -->\nold table\n<!-- bench:segmentation:end -->"
    out.write_text(f"# Benchmarks\n\n{segmentation.SECTION}\n\nprose\n\n{markers}\n\n## Another section\n\nkept\n")
    segmentation.main(["--quick", "--out", str(out)])
    text = out.read_text()
    assert "old table" not in text and "prose" in text and "## Another section\n\nkept\n" in text
    assert "Command: `python benchmarks/segmentation.py --quick" in text
    rows = re.findall(r"^\| (RMT|ConvNeXt|Swin) \| ([\d.]+) M \| ([\d.]+) \| ([\d.]+) \| ([\d,]+) \|$", text, re.M)
    assert [r[0] for r in rows] == list(segmentation.MODELS)
