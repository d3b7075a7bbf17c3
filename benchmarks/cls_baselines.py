"""What the verse-pair classifier's accuracy means: the majority class, and a bag-of-words logistic
regression (binary word features of each verse and of their overlap), on the same splits.

Cached next to the data it describes (DATA/cls/baselines-<key>.json, keyed by the raw files), so
the tables of scripts/reproduce.py read it without retraining. Needs scikit-learn (`pip install -e
".[baselines]"`; `make setup` installs it).

    python benchmarks/cls_baselines.py [--data data]
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def baselines(data: Path) -> dict:
    """{"valid"|"test": {"majority": %, "bow": %}} for the classifier data under ``data``/cls/raw."""
    raw = data / "cls" / "raw"
    names = json.dumps(sorted(p.name for p in raw.glob("*")), sort_keys=True)
    cache = data / "cls" / f"baselines-{hashlib.sha256(names.encode()).hexdigest()[:12]}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    read = {split: [(raw / f"{split}.{side}").read_text(encoding="utf-8").splitlines() for side in ("input0", "input1", "label")]
            for split in ("train", "valid", "test")}
    vectorizer = CountVectorizer(binary=True, token_pattern=r"\S+", lowercase=True).fit(read["train"][0] + read["train"][1])

    def features(split):
        a, b = vectorizer.transform(read[split][0]), vectorizer.transform(read[split][1])
        return hstack([a, b, a.multiply(b)]).tocsr()

    model = LogisticRegression(max_iter=2000, C=1.0).fit(features("train"), read["train"][2])
    majority = max(set(read["train"][2]), key=read["train"][2].count)
    result = {}
    for split in ("valid", "test"):
        labels = read[split][2]
        result[split] = {"majority": 100 * labels.count(majority) / len(labels), "bow": 100 * model.score(features(split), labels)}
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(cache)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data"))
    result = baselines(Path(parser.parse_args().data).resolve())
    for split in ("valid", "test"):
        print(f"{split}: majority class {result[split]['majority']:.1f}%, bag-of-words {result[split]['bow']:.1f}%")


if __name__ == "__main__":
    main()
