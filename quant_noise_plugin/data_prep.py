"""Real public-domain corpora for the demo, benchmarks and tests, from Debian packages.

- LM: the King James Bible (``bible-kjv``: ``bible -f Gen1:1-Rev22:21``), word-tokenized,
  binarized with ``fairseq-preprocess --only-source``.
- MT: English (KJV) - Spanish (Reina-Valera 1909, ``sword-text-sparv`` via ``diatheke``) verse
  pairs, aligned on (book, chapter, verse) with mismatches dropped, joint sentencepiece BPE,
  binarized with ``fairseq-preprocess``; raw Spanish kept for sacrebleu.
- CLS: KJV verse pairs in three balanced classes (the next verse / same chapter, not adjacent /
  another book), binarized for ``sentence_prediction`` with the LM's dictionary, which masked-LM
  pretraining on the LM data uses too.

Splits are by chapter (every 20th chapter to valid, the next to test), so they are deterministic
and never share a chapter. Each part is built in a temporary directory and moved in whole.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

from .atomic import output_mode
from .errors import QuantNoiseError

logger = logging.getLogger(__name__)

DEBIAN_PACKAGES = ("bible-kjv", "diatheke", "sword-text-sparv")
SPANISH_MODULE = "spaRV1909eb"
MARKER = ".complete.json"
Verse = Tuple[int, int, int]  # book index, chapter, verse


class DataError(QuantNoiseError, RuntimeError):
    pass


def _have_tools() -> bool:
    return shutil.which("bible") is not None and shutil.which("diatheke") is not None and _sword_module_installed()


def _sword_module_installed() -> bool:
    return any(Path(d).joinpath("mods.d", f"{SPANISH_MODULE}.conf").exists() for d in ("/usr/share/sword", "/usr/local/share/sword"))


def ensure_debian_packages() -> None:
    """Install the corpora's Debian packages when missing (needs root and apt-get)."""
    if _have_tools():
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise DataError(f"the corpora need the Debian packages {' '.join(DEBIAN_PACKAGES)}: run `sudo apt-get install -y {' '.join(DEBIAN_PACKAGES)}`")
    with open(Path(tempfile.gettempdir()) / "quant-noise-apt.lock", "w") as lock:  # one install at a time (a test
        fcntl.flock(lock, fcntl.LOCK_EX)  # suite's workers on a fresh machine): the next finds the tools and returns
        if not _have_tools():
            _apt_install()


def _apt_install() -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "install", "-y", "-q", *DEBIAN_PACKAGES], ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *DEBIAN_PACKAGES]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode == 0 and cmd[1] == "install" and _have_tools():
            return
    raise DataError(f"could not install {' '.join(DEBIAN_PACKAGES)} with apt-get (offline?): {result.stderr.strip().splitlines()[-1:] or ''}")


def _run(cmd: List[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise DataError(f"`{' '.join(cmd)}` failed: {result.stderr.strip()[:300]}")
    return result.stdout


def _parse(lines, pattern: str) -> Dict[Verse, str]:
    """Verse text keyed by (book index, chapter, verse); books are numbered in reading order."""
    verses: Dict[Verse, str] = {}
    books: List[str] = []
    regex = re.compile(pattern)
    for line in lines:
        m = regex.match(line)
        if not m:
            continue
        book, chapter, verse, text = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if not books or books[-1] != book:
            books.append(book)
        text = re.sub(r"<[^>]*>", " ", text)  # leftover Strong's numbers such as <G5547>
        text = re.sub(r"\s+", " ", text).strip()
        if text:
            verses[(len(books) - 1, chapter, verse)] = text
    return verses


def read_kjv() -> Dict[Verse, str]:
    return _parse(_run(["bible", "-f", "Gen1:1-Rev22:21"]).splitlines(), r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def read_rv1909() -> Dict[Verse, str]:
    out = _run(["diatheke", "-b", SPANISH_MODULE, "-f", "plain", "-k", "Gen 1:1-Rev 22:21"])
    return _parse(out.splitlines(), r"^(.+?) (\d+):(\d+): (.*)$")


def split_of(verse: Verse, chapter_index: Dict[Tuple[int, int], int]) -> str:
    c = chapter_index[verse[:2]]
    return {10: "valid", 11: "test"}.get(c % 20, "train")


def word_tokenize(text: str) -> str:
    return " ".join(re.findall(r"\w+|[^\w\s]", text))


def _write(path: Path, lines: List[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _splits(verses: List[Verse]) -> Dict[str, List[Verse]]:
    chapters = sorted({v[:2] for v in verses})
    index = {c: i for i, c in enumerate(chapters)}
    out: Dict[str, List[Verse]] = {"train": [], "valid": [], "test": []}
    for v in sorted(verses):
        out[split_of(v, index)].append(v)
    return out


def _tiny(splits: Dict[str, List[Verse]]) -> Dict[str, List[Verse]]:
    return {"train": splits["train"][:2000], "valid": splits["valid"][:200], "test": splits["test"][:200]}


def _fairseq_preprocess(args: List[str]) -> None:
    exe = Path(sys.executable).with_name("fairseq-preprocess")
    _run([str(exe if exe.exists() else "fairseq-preprocess"), "--workers", "1", *args])


def _count(path: Path) -> Tuple[int, int]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return len(lines), sum(len(l.split()) for l in lines)


def prepare_lm(kjv: Dict[Verse, str], out: Path, tiny: bool) -> dict:
    splits = _splits(list(kjv))
    if tiny:
        splits = _tiny(splits)
    raw = out / "raw"
    raw.mkdir(parents=True)
    stats = {}
    for name, verses in splits.items():
        _write(raw / f"{name}.txt", [word_tokenize(kjv[v]) for v in verses])
        stats[name] = dict(zip(("lines", "tokens"), _count(raw / f"{name}.txt")))
    _fairseq_preprocess(["--only-source", "--trainpref", str(raw / "train.txt"), "--validpref", str(raw / "valid.txt"),
                         "--testpref", str(raw / "test.txt"), "--destdir", str(out / "bin")])
    stats["vocab"] = len((out / "bin" / "dict.txt").read_text().splitlines()) + 4  # + fairseq's specials
    return stats


def prepare_mt(kjv: Dict[Verse, str], rv: Dict[Verse, str], out: Path, tiny: bool) -> dict:
    import sentencepiece as spm

    common = sorted(set(kjv) & set(rv))
    dropped = len(set(kjv) ^ set(rv))
    splits = _splits(common)
    if tiny:
        splits = _tiny(splits)
    raw, spm_dir = out / "raw", out / "spm"
    raw.mkdir(parents=True)
    spm_dir.mkdir()
    for name, verses in splits.items():
        _write(raw / f"{name}.en", [kjv[v] for v in verses])
        _write(raw / f"{name}.es", [rv[v] for v in verses])  # detokenized references for sacrebleu
    vocab = 1000 if tiny else 8000
    spm.SentencePieceTrainer.train(
        input=f"{raw / 'train.en'},{raw / 'train.es'}", model_prefix=str(out / "spm.bpe"), vocab_size=vocab,
        model_type="bpe", character_coverage=1.0, num_threads=1, seed_sentencepiece_size=1000000,
        shuffle_input_sentence=False, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.bpe.model"))
    stats = {"pairs_dropped_verse_mismatch": dropped}
    for name in splits:
        for lang in ("en", "es"):
            lines = (raw / f"{name}.{lang}").read_text(encoding="utf-8").splitlines()
            _write(spm_dir / f"{name}.{lang}", [" ".join(sp.encode(l, out_type=str)) for l in lines])
        stats[name] = {"pairs": len(lines), "tokens_en": _count(spm_dir / f"{name}.en")[1], "tokens_es": _count(spm_dir / f"{name}.es")[1]}
    _fairseq_preprocess(["--source-lang", "en", "--target-lang", "es", "--joined-dictionary", "--trainpref", str(spm_dir / "train"),
                         "--validpref", str(spm_dir / "valid"), "--testpref", str(spm_dir / "test"), "--destdir", str(out / "bin")])
    stats["vocab"] = len((out / "bin" / "dict.en.txt").read_text().splitlines()) + 4
    return stats


PAIR_LABELS = ("next", "same_chapter", "other_book")


def verse_pairs(verses: List[Verse], seed: int = 0) -> List[Tuple[Verse, Verse, str]]:
    """Balanced sentence-pair examples from one split's verses, three per anchor verse:

    - ``next``: the anchor and the verse after it;
    - ``same_chapter``: the anchor and a verse of its chapter that is not adjacent to it;
    - ``other_book``: the anchor and a verse of another book.
    Every verse used comes from ``verses`` (one split's chapters), so a split never sees another's.
    An anchor needs a following verse and a non-adjacent one in its chapter; a split needs two books.
    """
    rng = random.Random(seed)
    chapters: Dict[Tuple[int, int], List[Verse]] = {}
    for v in sorted(verses):
        chapters.setdefault(v[:2], []).append(v)
    by_book: Dict[int, List[Verse]] = {}
    for v in sorted(verses):
        by_book.setdefault(v[0], []).append(v)
    books = sorted(by_book)
    if len(books) < 2:
        raise DataError("verse pairs need verses of at least two books in every split")
    pairs = []
    for chapter in sorted(chapters):
        in_chapter = chapters[chapter]
        for i, anchor in enumerate(in_chapter[:-1]):
            far = [w for j, w in enumerate(in_chapter) if abs(j - i) > 1]
            if not far:
                continue
            other = rng.choice([b for b in books if b != anchor[0]])
            pairs += [(anchor, in_chapter[i + 1], "next"), (anchor, rng.choice(far), "same_chapter"),
                      (anchor, rng.choice(by_book[other]), "other_book")]
    rng.shuffle(pairs)
    return pairs


def _spread(verses: List[Verse], n: int) -> List[Verse]:
    """At least ``n`` verses in whole chapters taken evenly across the list (a tiny slice with several books)."""
    chapters = sorted({v[:2] for v in verses})
    step = max(1, len(chapters) // max(1, n // 25))
    keep = set(chapters[::step])
    return [v for v in verses if v[:2] in keep][: max(n, 1)]


def prepare_cls(kjv: Dict[Verse, str], out: Path, tiny: bool, dictionary: Path) -> dict:
    """The verse-pair classification data, binarized for fairseq's ``sentence_prediction`` task
    (input0 / input1 with the LM's word dictionary, which masked-LM pretraining uses too; label)."""
    splits = _splits(list(kjv))
    if tiny:
        splits = {name: _spread(verses, {"train": 600, "valid": 120, "test": 120}[name]) for name, verses in splits.items()}
    raw = out / "raw"
    raw.mkdir(parents=True)
    stats = {}
    for seed, (name, verses) in enumerate(splits.items()):
        pairs = verse_pairs(verses, seed)
        _write(raw / f"{name}.input0", [word_tokenize(kjv[a]) for a, _, _ in pairs])
        _write(raw / f"{name}.input1", [word_tokenize(kjv[b]) for _, b, _ in pairs])
        _write(raw / f"{name}.label", [label for _, _, label in pairs])
        stats[name] = {"pairs": len(pairs), "labels": {label: sum(1 for p in pairs if p[2] == label) for label in PAIR_LABELS}}
    for side in ("input0", "input1"):
        _fairseq_preprocess(["--only-source", "--srcdict", str(dictionary), "--trainpref", str(raw / f"train.{side}"),
                             "--validpref", str(raw / f"valid.{side}"), "--testpref", str(raw / f"test.{side}"),
                             "--destdir", str(out / "bin" / side)])
    _fairseq_preprocess(["--only-source", "--trainpref", str(raw / "train.label"), "--validpref", str(raw / "valid.label"),
                         "--testpref", str(raw / "test.label"), "--destdir", str(out / "bin" / "label")])
    return stats


PARTS = ("lm", "mt", "cls")
PART_VERSIONS = {"lm": 1, "mt": 1, "cls": 1}


def _legacy_recipe(tiny: bool) -> str:
    """The marker of data directories written before the parts were versioned one by one (lm + mt)."""
    return hashlib.sha256(json.dumps({"version": 1, "tiny": tiny}).encode()).hexdigest()[:16]


def _part_recipe(part: str, tiny: bool) -> str:
    return hashlib.sha256(json.dumps({"part": part, "version": PART_VERSIONS[part], "tiny": tiny}).encode()).hexdigest()[:16]


def _completed_parts(info: dict, tiny: bool) -> Dict[str, str]:
    if "parts" in info:
        return dict(info["parts"])
    if info.get("recipe") == _legacy_recipe(tiny):
        return {"lm": _part_recipe("lm", tiny), "mt": _part_recipe("mt", tiny)}
    return {}


def prepare(output: str | Path, force: bool = False, tiny: bool = False) -> dict:
    """Create ``output/{lm,mt,cls}``; parts complete with the same recipe are reused as they are.

    Each missing part is built in a temporary directory and moved in whole, then the marker is
    rewritten (temporary file, rename): an interrupted run leaves the previous parts usable.
    """
    output = Path(output)
    marker = output / MARKER
    info = json.loads(marker.read_text()) if marker.exists() else {}
    done = _completed_parts(info, tiny)
    todo = [part for part in PARTS if force or done.get(part) != _part_recipe(part, tiny)]
    stats = dict(info.get("stats", {}))
    if not todo:
        print(f"data: {output} is complete ({', '.join(PARTS)}); reusing it")
        _print_stats(stats)
        return stats
    if output.exists() and any(output.iterdir()) and not info and not force:
        raise DataError(f"{output} exists but is not a complete data directory of this recipe: remove it or pass --force")
    ensure_debian_packages()
    output.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=output.name + ".", suffix=".partial", dir=output.parent))
    try:
        kjv = read_kjv()
        rv = read_rv1909() if "mt" in todo else {}
        if len(kjv) < 30000 or ("mt" in todo and len(rv) < 30000):
            raise DataError(f"the Bible texts look incomplete (KJV {len(kjv)} verses, RV1909 {len(rv)}); reinstall {' '.join(DEBIAN_PACKAGES)}")
        for part in todo:
            if part == "lm":
                stats["lm"] = prepare_lm(kjv, tmp / "lm", tiny)
            elif part == "mt":
                stats["mt"] = prepare_mt(kjv, rv, tmp / "mt", tiny)
            else:
                dictionary = (tmp if "lm" in todo else output) / "lm" / "bin" / "dict.txt"
                stats["cls"] = prepare_cls(kjv, tmp / "cls", tiny, dictionary)
        for part in todo:
            if (output / part).exists():
                shutil.rmtree(output / part)
            os.chmod(tmp / part, output_mode(directory=True))  # mkdtemp's children are fine; keep the umask's mode
            os.replace(tmp / part, output / part)
            done[part] = _part_recipe(part, tiny)
        (tmp / MARKER).write_text(json.dumps({"parts": done, "stats": stats}, indent=1))
        os.chmod(tmp / MARKER, output_mode())
        os.replace(tmp / MARKER, marker)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    _print_stats(stats)
    return stats


def _print_stats(stats: dict) -> None:
    if "lm" in stats:
        lm = stats["lm"]
        print("LM (KJV, word tokens): " + ", ".join(f"{s} {lm[s]['lines']} lines / {lm[s]['tokens']} tokens" for s in ("train", "valid", "test")) + f"; vocab {lm['vocab']}")
    if "mt" in stats:
        mt = stats["mt"]
        print("MT (KJV en -> RV1909 es, joint BPE): " + ", ".join(f"{s} {mt[s]['pairs']} pairs / {mt[s]['tokens_en']}+{mt[s]['tokens_es']} tokens" for s in ("train", "valid", "test")) + f"; vocab {mt['vocab']}; {mt['pairs_dropped_verse_mismatch']} unmatched verses dropped")
    if "cls" in stats:
        cls = stats["cls"]
        print("CLS (KJV verse pairs: " + " / ".join(PAIR_LABELS) + "): " + ", ".join(f"{s} {cls[s]['pairs']} pairs" for s in ("train", "valid", "test")) + " (balanced, split by chapter)")
