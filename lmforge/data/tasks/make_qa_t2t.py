"""Generate the shipped extractive-QA and text-to-text fixtures from small seeded grammars.

Both data sets are synthetic but learnable by a tiny model in a minute or two on a CPU, and use
the words of the demo corpus so the shipped tokenizers split them into few tokens.

* ``extractive_qa/{train,val}.jsonl``: SQuAD-style records ``{"id", "question", "context",
  "answers": {"text": [...], "answer_start": [...]}}``. A context states a few facts about
  children (where one is, what one has, which animal one likes) in random order, among filler
  sentences (some contexts are long enough to need several windows). Each question asks about one
  fact; about one question in eight asks about a fact the context does not state and has no answer
  (``answers.text == []``, SQuAD 2.0 style).
* ``text_to_text/{train,val}.jsonl``: ``{"source", "target"}`` pairs of a deterministic
  "translation": every name, animal, colour, place and verb of the source is replaced by its fixed
  partner word, the rest is kept (``"Tom saw a red cat in the park."`` ->
  ``"Mia found a green dog in the garden."``).

Usage (the output depends only on the seeds)::

    python -m lmforge.data.tasks.make_qa_t2t
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

NAMES = ["Tom", "Anna", "Ben", "Lily", "Max", "Mia", "Sam", "Zoe", "Emma", "Leo", "Jack", "Lucy", "Noah", "Ruby"]
PLACES = ["park", "garden", "forest", "beach", "school", "farm", "kitchen", "river", "town", "hill"]
COLORS = ["red", "blue", "green", "pink", "yellow", "purple", "orange", "white", "brown"]
OBJECTS = ["ball", "kite", "hat", "boat", "book", "drum", "car", "cake", "toy"]
ANIMALS = ["cat", "dog", "bird", "frog", "duck", "fox", "owl", "pig", "lion", "rabbit", "mouse"]
FILLERS = [
    "It was a sunny day.",
    "The sky was blue and the wind was warm.",
    "They played together until the evening.",
    "Later they went home for lunch.",
    "Everyone was happy.",
    "A little bird sang in a tree.",
    "The friends laughed and smiled.",
    "Then it started to rain.",
]


# -- extractive QA --------------------------------------------------------------------------------


def _qa_record(rng: random.Random, index: int, split: str) -> dict:
    where, has, likes = rng.sample(NAMES, 3)
    place, color, obj, animal = rng.choice(PLACES), rng.choice(COLORS), rng.choice(OBJECTS), rng.choice(ANIMALS)
    facts = {
        "where": (f"{where} is at the {place}.", f"Where is {where}?", place),
        "color": (f"{has} has a {color} {obj}.", f"What color is the {obj} of {has}?", color),
        "have": (f"{has} has a {color} {obj}.", f"What does {has} have?", f"{color} {obj}"),
        "animal": (f"{likes} likes the {animal}.", f"Which animal does {likes} like?", animal),
    }
    asked = rng.choice(list(facts))
    answerable = rng.random() >= 0.125
    sentences = {facts[k][0] for k in facts if answerable or facts[k][0] != facts[asked][0]}
    sentences = sorted(sentences) + rng.sample(FILLERS, rng.randint(0, 6))
    rng.shuffle(sentences)
    context = " ".join(sentences)
    sentence, question, answer = facts[asked]
    answers = {"text": [], "answer_start": []}
    if answerable:
        start = context.index(sentence) + sentence.rindex(answer)
        answers = {"text": [answer], "answer_start": [start]}
        assert context[start : start + len(answer)] == answer
    return {"id": f"{split}-{index}", "question": question, "context": context, "answers": answers}


# -- text to text ---------------------------------------------------------------------------------


def _partners(words: list[str], rng: random.Random) -> dict[str, str]:
    """A fixed pairing of ``words`` with a shuffled copy of themselves (no word maps to itself)."""
    while True:
        shuffled = rng.sample(words, len(words))
        if all(a != b for a, b in zip(words, shuffled)):
            return dict(zip(words, shuffled))


VERBS = ["saw", "found", "liked", "loved", "helped", "followed"]
T2T_TEMPLATES = [
    "{name} {verb} a {color} {animal} in the {place}.",
    "{name} {verb} the {animal}.",
    "In the {place}, {name} {verb} a {color} {animal}.",
    "{name} and {name2} {verb} the {animal} near the {place}.",
]


def _t2t_pairs(n: int, rng: random.Random, lexicon: dict[str, str]) -> list[dict]:
    pairs = []
    for _ in range(n):
        name, name2 = rng.sample(NAMES, 2)
        slots = {
            "name": name, "name2": name2, "verb": rng.choice(VERBS), "color": rng.choice(COLORS),
            "animal": rng.choice(ANIMALS), "place": rng.choice(PLACES),
        }
        template = rng.choice(T2T_TEMPLATES)
        source = template.format(**slots)
        target = template.format(**{key: lexicon[value] for key, value in slots.items()})
        pairs.append({"source": source, "target": target})
    return pairs


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=HERE)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=80)
    args = parser.parse_args(argv)

    for split, n, seed in (("train", args.train, 1), ("val", args.val, 2)):
        rng = random.Random(seed)
        write_jsonl(args.output / "extractive_qa" / f"{split}.jsonl", [_qa_record(rng, i, split) for i in range(n)])

    lexicon_rng = random.Random(0)
    lexicon: dict[str, str] = {}
    for words in (NAMES, COLORS, ANIMALS, PLACES, VERBS):
        lexicon.update(_partners(words, lexicon_rng))
    for split, n, seed in (("train", args.train, 3), ("val", args.val, 4)):
        write_jsonl(args.output / "text_to_text" / f"{split}.jsonl", _t2t_pairs(n, random.Random(seed), lexicon))


if __name__ == "__main__":
    main()
