"""Regenerate ``t5_toy.jsonl``, the small seq2seq data set the T5 pipeline ships.

A synthetic "headline" task: the source is a short news sentence made from
templates; the target is a headline that copies the actor, the object and the
place from the source and puts the verb in the present tense ("On Monday, Ada
Holt opened the new bridge in Lima." -> "Ada Holt opens bridge in Lima"). The
templates put the facts in different orders, so the model has to find them.
A tiny byte-level T5 learns the fixed words in seconds and the copying more
slowly, so ROUGE-L moves with the training hyperparameters.

Deterministic: ``python eeipu_ray/pipelines/data/make_t5_toy.py`` rewrites the
file byte for byte (``random.Random(seed)``, no other source of randomness).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIRST = ["Ada", "Ben", "Cy", "Dana", "Eli", "Finn", "Gus", "Hana", "Ivo", "Jan"]
LAST = ["Holt", "Berg", "Silva", "Chen", "Kaur", "Roy"]
CITIES = ["Oslo", "Lima", "Porto", "Kyoto", "Dakar", "Turin", "Perth", "Cork"]
NOUNS = ["library", "bridge", "museum", "school", "market", "garden", "station", "theater"]
ADJECTIVES = ["new", "old", "small", "big", "famous", "local"]
DAYS = ["Monday", "Tuesday", "Friday", "Sunday"]
# (past tense, present tense for the headline, past participle)
VERBS = [
    ("opened", "opens", "opened"),
    ("closed", "closes", "closed"),
    ("sold", "sells", "sold"),
    ("bought", "buys", "bought"),
    ("rebuilt", "rebuilds", "rebuilt"),
    ("visited", "visits", "visited"),
    ("renamed", "renames", "renamed"),
    ("painted", "paints", "painted"),
]
TEMPLATES = [
    "{person} {past} the {adj} {noun} in {city}.",
    "On {day}, {person} {past} the {noun} in {city}.",
    "In {city}, the {adj} {noun} was {pp} by {person}.",
    "The {noun} in {city} was {pp} by {person} on {day}.",
]


def make_pairs(n: int = 600, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct ``{"source": ..., "target": ...}`` pairs, drawn with ``seed``."""
    rng = random.Random(seed)
    pairs: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(pairs) < n:
        person = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        past, present, pp = rng.choice(VERBS)
        noun, city = rng.choice(NOUNS), rng.choice(CITIES)
        source = rng.choice(TEMPLATES).format(
            person=person,
            past=past,
            pp=pp,
            adj=rng.choice(ADJECTIVES),
            noun=noun,
            city=city,
            day=rng.choice(DAYS),
        )
        if source in seen:
            continue
        seen.add(source)
        pairs.append({"source": source, "target": f"{person} {present} {noun} in {city}"})
    return pairs


def write_jsonl(path: Path, pairs: list[dict[str, str]]) -> None:
    """Write one JSON object per line, UTF-8, ``\\n`` line ends."""
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for pair in pairs:
            fh.write(json.dumps(pair, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600, help="pairs to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("t5_toy.jsonl"))
    args = parser.parse_args()
    write_jsonl(args.out, make_pairs(args.n, args.seed))


if __name__ == "__main__":
    main()
