"""Calibration and held-out text for sparsity: a real corpus installed from a package registry.

The default corpus is the Python documentation as Debian ships it (`apt-get install python3-doc`, or any
`python3.X-doc`): ~500 reStructuredText sources, 12 MB of English prose and code written by people, for
people, long before hasten — not text written to flatter a method. `make setup` installs it where it can.
Any other corpus is a path: a .txt/.md/.rst file, or a folder of them (`--corpus PATH`).

Documents are split by a hash of their path into a calibration part (thresholds, predictors) and a held-out
part (perplexity, agreement, sparsity checks), so quality is never measured on the text that was calibrated on.
"""
from __future__ import annotations

import glob
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

DEBIAN_PYTHON_DOCS = "/usr/share/doc/python3*/html/_sources"
TEXT_SUFFIXES = (".txt", ".md", ".rst")
HELDOUT_SHARE = 0.25  # of documents, chosen by path hash


class CorpusError(ValueError):
    pass


@dataclass(frozen=True)
class Corpus:
    name: str  # recorded in calibration files and results
    documents: tuple[Path, ...]

    def texts(self, split: str) -> list[str]:
        """The documents of one split ("calibration" or "heldout"), cleaned, in a stable order."""
        if split not in ("calibration", "heldout"):
            raise ValueError(f"split must be 'calibration' or 'heldout', not {split!r}")
        if len(self.documents) == 1:  # one file: its last quarter is held out
            text = _clean(self.documents[0].read_text(errors="replace"))
            cut = int(len(text) * (1 - HELDOUT_SHARE))
            return [text[cut:] if split == "heldout" else text[:cut]]
        chosen = [p for p in self.documents if _is_heldout(p) == (split == "heldout")]
        return [t for t in (_clean(p.read_text(errors="replace")) for p in chosen) if len(t) > 200]

    def token_chunks(self, tokenizer, split: str, n_tokens: int, seq_len: int) -> list[list[int]]:
        """Consecutive `seq_len`-token windows from the split, round-robin over documents, `n_tokens` in all."""
        chunks: list[list[int]] = []
        per_doc = [tokenizer.encode(t, add_special_tokens=False) for t in self.texts(split)[: 4 * n_tokens // seq_len + 8]]
        offset = 0
        while len(chunks) * seq_len < n_tokens:
            progressed = False
            for ids in per_doc:
                window = ids[offset: offset + seq_len]
                if len(window) == seq_len:
                    chunks.append(window)
                    progressed = True
                    if len(chunks) * seq_len >= n_tokens:
                        break
            if not progressed:
                break
            offset += seq_len
        if not chunks:
            raise CorpusError(f"corpus {self.name} has no {split} document of {seq_len} tokens; use a larger corpus")
        return chunks


def load(path: str | Path | None = None) -> Corpus:
    """The corpus at `path`, or the default (Debian's Python docs). One-line errors say how to get one."""
    if path is None:
        roots = sorted(glob.glob(DEBIAN_PYTHON_DOCS))
        if not roots:
            raise CorpusError("no calibration corpus: install Debian's Python docs (`apt-get install python3-doc`) "
                              "or pass --corpus PATH (a text file or a folder of .txt/.md/.rst files)")
        root = Path(roots[-1])
        return Corpus(f"debian:{root.parent.parent.name}-doc", tuple(sorted(root.rglob("*.rst.txt"))))
    p = Path(path)
    if p.is_file():
        return Corpus(f"file:{p.name}", (p,))
    if p.is_dir():
        docs = tuple(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in TEXT_SUFFIXES))
        if docs:
            return Corpus(f"dir:{p.name}", docs)
        raise CorpusError(f"--corpus {path}: no .txt/.md/.rst files in that folder")
    raise CorpusError(f"--corpus {path}: no such file or folder")


def _is_heldout(path: Path) -> bool:
    h = int(hashlib.sha1(f"{path.parent.name}/{path.name}".encode()).hexdigest()[:8], 16)
    return (h % 1000) < HELDOUT_SHARE * 1000


_ROLE = re.compile(r":[a-z:]+:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`name <target>` → name
_DIRECTIVE = re.compile(r"^\s*\.\. .*$|^\s*:[a-z-]+:.*$", re.M)  # .. directive:: / :option: lines
_RULE = re.compile(r"^[=\-~*^#+`'\"]{3,}\s*$", re.M)  # section underlines


def _clean(text: str) -> str:
    """reStructuredText markup → plain prose (roles to their text, directives and rules dropped)."""
    text = _ROLE.sub(r"\1", text)
    text = _DIRECTIVE.sub("", text)
    text = _RULE.sub("", text)
    text = text.replace("``", "").replace("::\n", ":\n")
    return re.sub(r"\n{3,}", "\n\n", text).strip()
