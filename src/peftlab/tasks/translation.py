"""WMT16 English-Romanian (and other line-aligned parallel text) with sacreBLEU scoring.

Local layout read (one sentence per line, line *i* of one file translates line *i* of the other)::

    <root>/newstest2016.en   <root>/newstest2016.ro      split "test" / "newstest2016"
    <root>/tatoeba-test-*.eng <root>/tatoeba-test-*.ron  split "tatoeba"
    <root>/<split>.en        <root>/<split>.ro          any other split name, e.g. "train"

With ``root=None`` the data comes from the Hugging Face hub,
``datasets.load_dataset("wmt16", "ro-en")`` (optional dependency, imported lazily).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.tasks.errors import TaskDataError, describe_folder

__all__ = ["TranslationPair", "load_parallel", "load_wmt16_en_ro", "bleu"]

# ISO 639-1 and -3 suffixes, since WMT files use .en/.ro and Tatoeba .eng/.ron.
_SUFFIXES = {"en": ("en", "eng"), "ro": ("ro", "ron")}
_SPLIT_ALIASES = {"test": "newstest2016", "newstest2016": "newstest2016", "tatoeba": "tatoeba"}
_HUB_SPLITS = {"test": "test", "newstest2016": "test", "validation": "validation",
               "dev": "validation", "newsdev2016": "validation", "train": "train"}  # fmt: skip


@dataclass(frozen=True)
class TranslationPair:
    """One aligned sentence pair, oriented as requested (``source`` -> ``target``)."""

    source: str
    target: str


def _read_lines(path: Path) -> list[str]:
    """Read a line-aligned file. Splits on '\\n' only: str.splitlines would also break on
    U+2028/U+0085, which occur inside real sentences and would shift the alignment."""
    text = path.read_text(encoding="utf-8-sig")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start a new one
    return [line.removesuffix("\r") for line in lines]


def load_parallel(source_file: str | Path, target_file: str | Path, limit: int | None = None) -> list[TranslationPair]:
    """Read two line-aligned files into pairs.

    Raises:
        TaskDataError: a file is missing, or the two files differ in line count
            (the message names both files and their counts).
    """
    src, tgt = Path(source_file), Path(target_file)
    for path in (src, tgt):
        if not path.is_file():
            raise TaskDataError(f"parallel text file not found: {path} ({describe_folder(path.parent)})")
    src_lines, tgt_lines = _read_lines(src), _read_lines(tgt)
    if len(src_lines) != len(tgt_lines):
        raise TaskDataError(
            f"parallel files are not line-aligned: {src} has {len(src_lines)} lines but "
            f"{tgt} has {len(tgt_lines)}; each line must translate the same line of the other file"
        )
    pairs = [TranslationPair(s, t) for s, t in zip(src_lines, tgt_lines)]
    return pairs if limit is None else pairs[:limit]


def _find_file(root: Path, prefix: str, lang: str, glob: bool) -> Path | None:
    for suffix in _SUFFIXES[lang]:
        if glob:
            # Why: Tatoeba releases carry a date in the name (tatoeba-test-v2021-03-30.eng).
            hits = sorted(root.glob(f"{prefix}*.{suffix}"))
            if hits:
                return hits[-1]  # newest release sorts last
        elif (root / f"{prefix}.{suffix}").is_file():
            return root / f"{prefix}.{suffix}"
    return None


def load_wmt16_en_ro(
    root: str | Path | None,
    split: str = "test",
    direction: str = "en-ro",
    limit: int | None = None,
) -> list[TranslationPair]:
    """Load English-Romanian pairs, oriented by ``direction`` ("en-ro" or "ro-en").

    Args:
        root: folder with the line-aligned files (see module doc), or ``None`` for the hub.
        split: "test"/"newstest2016", "tatoeba", or a file prefix (``<split>.en``/``.ro``);
            on the hub: "train", "validation"/"dev", "test".
        direction: "en-ro" gives English sources and Romanian targets; "ro-en" the reverse.
        limit: keep only the first ``limit`` pairs.
    """
    if direction not in ("en-ro", "ro-en"):
        raise TaskDataError(f"direction must be 'en-ro' or 'ro-en', got {direction!r}")
    src_lang, tgt_lang = direction.split("-")
    if root is None:
        return _load_from_hub(split, src_lang, tgt_lang, limit)

    folder = Path(root)
    if not folder.is_dir():
        raise TaskDataError(
            f"translation data folder {folder} does not exist ({describe_folder(folder.parent)}); "
            "pass the folder holding newstest2016.en/.ro (e.g. data/mt/en-ro), or root=None for the hub"
        )
    prefix = _SPLIT_ALIASES.get(split, split)
    glob = prefix == "tatoeba"
    files = {lang: _find_file(folder, prefix, lang, glob) for lang in ("en", "ro")}
    if files["en"] is None or files["ro"] is None:
        want = f"{prefix}*.{{eng,ron}}" if glob else f"{prefix}.{{en,ro}} (or .eng/.ron)"
        raise TaskDataError(
            f"English-Romanian split {split!r} not found: expected {folder / want} "
            f"({describe_folder(folder)})"
        )
    return load_parallel(files[src_lang], files[tgt_lang], limit)  # type: ignore[arg-type]


def _load_from_hub(split: str, src_lang: str, tgt_lang: str, limit: int | None) -> list[TranslationPair]:
    try:
        import datasets  # lazy: optional dependency
    except ImportError as exc:
        raise TaskDataError(
            "no translation folder given and the optional `datasets` package is not installed; "
            "`pip install datasets` or pass the folder holding newstest2016.en/.ro"
        ) from exc
    hub_split = _HUB_SPLITS.get(split)
    if hub_split is None:
        raise TaskDataError(f"unknown hub split {split!r} for wmt16 ro-en; use one of {sorted(_HUB_SPLITS)}")
    try:
        ds: Any = datasets.load_dataset("wmt16", "ro-en", split=hub_split)
    except Exception as exc:  # noqa: BLE001 - any hub/network failure gets the same advice
        raise TaskDataError(
            f"could not load wmt16 ro-en/{hub_split} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "if offline, pass the folder holding newstest2016.en/.ro"
        ) from exc
    out: list[TranslationPair] = []
    for row in ds:
        if limit is not None and len(out) >= limit:
            break
        pair = row["translation"]
        out.append(TranslationPair(pair[src_lang], pair[tgt_lang]))
    return out


def bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], **kwargs: Any) -> float:
    """Corpus BLEU (sacreBLEU, 0-100) of ``hypotheses`` against one or several references each.

    ``references[i]`` is either a string or a list of strings for hypothesis *i*; lists may
    differ in length (sacreBLEU skips the missing slots). ``kwargs`` go to
    ``sacrebleu.corpus_bleu`` (e.g. ``tokenize="13a"``).
    """
    import sacrebleu  # local: keeps `import peftlab.tasks` light

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("cannot compute BLEU of an empty corpus")
    per_hyp = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    if any(not refs for refs in per_hyp):
        raise ValueError("every hypothesis needs at least one reference")
    # sacreBLEU wants reference *streams*: stream k holds the k-th reference of every segment.
    n_streams = max(len(refs) for refs in per_hyp)
    streams = [[refs[k] if k < len(refs) else None for refs in per_hyp] for k in range(n_streams)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams, **kwargs).score)
