"""Generate the shipped sequence-classification and token-classification fixtures (seeded).

Both are synthetic, use the words of the demo corpus (so the shipped tokenizers split them into few
tokens) and are learnable from scratch by a tiny model in well under two minutes on a CPU.

* ``sequence_classification/{train,val}.jsonl``: ``{"text", "label"}`` with the labels
  ``happy``, ``sad`` and ``calm``. A text tells a short event among one or two neutral sentences;
  the label follows from the feeling words of the event (a ``happy`` text has words such as
  "laughed", "loved", a ``sad`` one "cried", "lost"; a ``calm`` one neither).
* ``token_classification/{train,val}.jsonl``: ``{"words", "tags"}`` with BIO tags for people
  (``PER``: a first name, sometimes with a family name: ``B-PER I-PER``) and places (``LOC``: one
  or two capitalised words such as "Red Hill"), in a handful of sentence shapes.

Usage (the output depends only on the seeds)::

    python -m lmforge.data.tasks.make_cls_ner
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

NAMES = ["Tom", "Anna", "Ben", "Lily", "Max", "Mia", "Sam", "Zoe", "Emma", "Leo", "Jack", "Lucy", "Noah", "Ruby"]
FAMILY_NAMES = ["Brown", "Green", "Smith", "White", "Hill", "Stone"]
PLACE_FIRST = ["Red", "Blue", "Green", "Big", "Little", "Sunny", "Old"]
PLACE_LAST = ["Hill", "River", "Town", "Park", "Lake", "Farm", "Wood"]
ANIMALS = ["cat", "dog", "bird", "frog", "duck", "fox", "owl", "pig", "rabbit"]
THINGS = ["ball", "kite", "hat", "boat", "book", "drum", "cake", "toy"]
NEUTRAL = [
    "It was a sunny day.",
    "The sky was blue.",
    "They walked to the park.",
    "A little bird sat in a tree.",
    "Then they went home for lunch.",
    "The wind was warm.",
]
HAPPY = [
    "{name} laughed and smiled all day.",
    "{name} loved the new {thing}.",
    "{name} was so happy to see the {animal}.",
    "{name} had fun playing with the {thing}.",
    "{name} felt glad and danced with joy.",
]
SAD = [
    "{name} cried because the {thing} was broken.",
    "{name} lost the {thing} and felt sad.",
    "{name} was sad when the {animal} ran away.",
    "{name} missed the {animal} and cried.",
    "{name} felt alone and sad all day.",
]
CALM = [
    "{name} looked at the {animal}.",
    "{name} put the {thing} on the table.",
    "{name} walked with the {animal} to the river.",
    "{name} sat down and read a book.",
    "{name} saw a {animal} near the tree.",
]


def classification_record(rng: random.Random) -> dict:
    label = rng.choice(["happy", "sad", "calm"])
    template = rng.choice({"happy": HAPPY, "sad": SAD, "calm": CALM}[label])
    event = template.format(name=rng.choice(NAMES), thing=rng.choice(THINGS), animal=rng.choice(ANIMALS))
    sentences = [event] + rng.sample(NEUTRAL, rng.randint(1, 2))
    rng.shuffle(sentences)
    return {"text": " ".join(sentences), "label": label}


def _person(rng: random.Random) -> list[tuple[str, str]]:
    words = [(rng.choice(NAMES), "B-PER")]
    if rng.random() < 0.4:
        words.append((rng.choice(FAMILY_NAMES), "I-PER"))
    return words


def _place(rng: random.Random) -> list[tuple[str, str]]:
    if rng.random() < 0.6:
        return [(rng.choice(PLACE_FIRST), "B-LOC"), (rng.choice(PLACE_LAST), "I-LOC")]
    return [(rng.choice(PLACE_LAST + ["Paris", "London", "Rome"]), "B-LOC")]


def _plain(text: str) -> list[tuple[str, str]]:
    return [(w, "O") for w in text.split()]


def ner_record(rng: random.Random) -> dict:
    shape = rng.randrange(5)
    if shape == 0:
        parts = [_person(rng), _plain("went to"), _place(rng), _plain("with"), _person(rng), _plain(".")]
    elif shape == 1:
        parts = [_plain("In"), _place(rng), _plain(","), _person(rng), _plain(f"saw a {rng.choice(ANIMALS)} .")]
    elif shape == 2:
        parts = [_person(rng), _plain("and"), _person(rng), _plain("played near"), _place(rng), _plain(".")]
    elif shape == 3:
        parts = [_plain(f"The {rng.choice(ANIMALS)} of"), _person(rng), _plain("ran to"), _place(rng), _plain(".")]
    else:
        parts = [_plain(f"A {rng.choice(['Green', 'Brown', 'White'])} {rng.choice(THINGS)} was in"), _place(rng),
                 _plain("and"), _person(rng), _plain("found it .")]
    pairs = [p for part in parts for p in part]
    return {"words": [w for w, _ in pairs], "tags": [t for _, t in pairs]}


def write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write the task folders into")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=100)
    args = parser.parse_args(argv)
    for task, make, seed in (
        ("sequence_classification", classification_record, 11),
        ("token_classification", ner_record, 12),
    ):
        rng = random.Random(seed)
        write(args.out / task / "train.jsonl", [make(rng) for _ in range(args.train)])
        write(args.out / task / "val.jsonl", [make(rng) for _ in range(args.val)])
        print(f"wrote {args.out / task}")


if __name__ == "__main__":
    main()
