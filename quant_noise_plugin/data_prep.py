"""Real public-domain corpora for the demo, benchmarks and tests, from Debian packages.

- LM: the King James Bible (``bible-kjv``: ``bible -f Gen1:1-Rev22:21``), word-tokenized,
  binarized with ``fairseq-preprocess --only-source``.
- MT: English (KJV) - Spanish (Reina-Valera 1909, ``sword-text-sparv`` via ``diatheke``) verse
  pairs, aligned on (book, chapter, verse) with mismatches dropped, joint sentencepiece BPE,
  binarized with ``fairseq-preprocess``; raw Spanish kept for sacrebleu.

Splits are by chapter (every 20th chapter to valid, the next to test), so they are deterministic
and never share a chapter. Everything is written to a temporary directory renamed at the end.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
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
RECIPE_VERSION = 1
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


def _recipe(tiny: bool) -> str:
    return hashlib.sha256(json.dumps({"version": RECIPE_VERSION, "tiny": tiny}).encode()).hexdigest()[:16]


def prepare(output: str | Path, force: bool = False, tiny: bool = False) -> dict:
    """Create ``output/{lm,mt}``; a complete, same-recipe output is reused as is."""
    output = Path(output)
    marker = output / MARKER
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("recipe") == _recipe(tiny) and not force:
            print(f"data: {output} is complete (recipe {info['recipe']}); reusing it")
            _print_stats(info["stats"])
            return info["stats"]
    if output.exists() and any(output.iterdir()) and not force:
        raise DataError(f"{output} exists but is not a complete data directory of this recipe: remove it or pass --force")
    ensure_debian_packages()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=output.name + ".", suffix=".partial", dir=output.parent))
    try:
        kjv, rv = read_kjv(), read_rv1909()
        if len(kjv) < 30000 or len(rv) < 30000:
            raise DataError(f"the Bible texts look incomplete (KJV {len(kjv)} verses, RV1909 {len(rv)}); reinstall {' '.join(DEBIAN_PACKAGES)}")
        stats = {"lm": prepare_lm(kjv, tmp / "lm", tiny), "mt": prepare_mt(kjv, rv, tmp / "mt", tiny)}
        (tmp / MARKER).write_text(json.dumps({"recipe": _recipe(tiny), "stats": stats}, indent=1))
        if output.exists():
            shutil.rmtree(output)
        os.chmod(tmp, output_mode(directory=True))  # mkdtemp makes 0700; the output follows the umask
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    _print_stats(stats)
    return stats


def _print_stats(stats: dict) -> None:
    lm, mt = stats["lm"], stats["mt"]
    print("LM (KJV, word tokens): " + ", ".join(f"{s} {lm[s]['lines']} lines / {lm[s]['tokens']} tokens" for s in ("train", "valid", "test")) + f"; vocab {lm['vocab']}")
    print("MT (KJV en -> RV1909 es, joint BPE): " + ", ".join(f"{s} {mt[s]['pairs']} pairs / {mt[s]['tokens_en']}+{mt[s]['tokens_es']} tokens" for s in ("train", "valid", "test")) + f"; vocab {mt['vocab']}; {mt['pairs_dropped_verse_mismatch']} unmatched verses dropped")
