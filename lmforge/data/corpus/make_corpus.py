"""Generate the demo corpus: simple short stories, one per line, from a small seeded grammar.

The stories imitate children's tales: a character, a place, an object, a small problem, some
dialogue, a helper and a happy ending. The grammar keeps pronouns, articles and verb forms in
agreement, and is varied enough that a tiny model cannot simply memorise it, yet regular enough
that it learns it within a minute or two on a laptop CPU.

Usage (regenerates the shipped files; the output depends only on the seeds)::

    python -m lmforge.data.corpus.make_corpus            # both files, default sizes and seeds
    python lmforge/data/corpus/make_corpus.py --split train --seed 1 --kilobytes 600 --output out.txt
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: (output file, seed, approximate size in kilobytes) for each shipped split.
SPLITS = {
    "train": ("tiny_stories_train.txt", 20240611, 600),
    "validation": ("tiny_stories_validation.txt", 777, 50),
}


@dataclass(frozen=True)
class Character:
    name: str
    kind: str  # "girl", "boy", "cat", ...
    subject: str  # he / she
    obj: str  # him / her
    possessive: str  # his / her

    @property
    def Subject(self) -> str:  # noqa: N802 - capitalised form for the start of a sentence
        return self.subject.capitalize()

    @property
    def Possessive(self) -> str:  # noqa: N802
        return self.possessive.capitalize()


GIRLS = ["Lily", "Mia", "Anna", "Sara", "Emma", "Lucy", "Zoe", "Ella", "Rosa", "Nina", "Amy", "Kate", "Ivy", "Jane"]
BOYS = ["Tom", "Ben", "Sam", "Max", "Leo", "Jack", "Tim", "Finn", "Noah", "Luke", "Oscar", "Paul", "Dan", "Eli"]
PEOPLE = {"girl": ("she", "her", "her"), "boy": ("he", "him", "his")}
ANIMALS = ["cat", "dog", "rabbit", "bird", "bear", "fox", "duck", "mouse", "frog", "pig", "owl", "lion"]
ANIMAL_NAMES = ["Spot", "Fluffy", "Pip", "Bella", "Coco", "Rex", "Daisy", "Buddy", "Milo", "Ruby", "Bubbles", "Sunny"]
ANIMAL_SOUNDS = {
    "cat": "meowed", "dog": "barked", "rabbit": "squeaked", "bird": "chirped", "bear": "growled",
    "fox": "yipped", "duck": "quacked", "mouse": "squeaked", "frog": "croaked", "pig": "oinked",
    "owl": "hooted", "lion": "roared",
}
TRAITS = ["little", "kind", "brave", "shy", "happy", "curious", "sleepy", "clever", "funny", "gentle", "small", "busy"]
GROWNUPS = [("mom", "she", "her"), ("dad", "he", "his"), ("grandma", "she", "her"), ("grandpa", "he", "his"),
            ("teacher", "she", "her"), ("neighbor", "he", "his")]

PLACES = {
    # name: (where it happens, how to get there, spots in it)
    "park": ("in the park", "to the park", ["a big tree", "the swings", "the slide", "a bench", "the pond"]),
    "forest": ("in the forest", "into the forest", ["a tall tree", "a log", "a bush", "a rock", "the path"]),
    "beach": ("at the beach", "to the beach", ["the sand", "a big rock", "the waves", "a sandcastle", "the boat"]),
    "garden": ("in the garden", "into the garden", ["the flowers", "the fence", "a pot", "the grass", "the old shed"]),
    "farm": ("on the farm", "to the farm", ["the barn", "the hay", "the gate", "the field", "the tractor"]),
    "town": ("in the town", "into the town", ["the shop", "the bakery", "the fountain", "the bridge", "the market"]),
    "river": ("by the river", "down to the river", ["the water", "a stone", "the reeds", "the little bridge", "the bank"]),
    "hill": ("on the hill", "up the hill", ["the grass", "a big stone", "the top", "an old tree", "the flowers"]),
    "school": ("at school", "to school", ["the desk", "the playground", "the window", "the library", "the big door"]),
    "house": ("at home", "home", ["the bed", "the table", "the sofa", "the kitchen", "the stairs"]),
}

COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "white", "brown", "shiny"]
SIZES = ["big", "small", "little", "tiny", "huge", "old", "new", "soft"]
OBJECTS = {
    # noun: (verb phrase for playing with it, plural?)
    "ball": "kick the ball", "kite": "fly the kite", "box": "open the box", "hat": "wear the hat",
    "book": "read the book", "toy car": "race the toy car", "flower": "smell the flower",
    "cake": "share the cake", "boat": "sail the boat", "key": "open the door with the key",
    "shell": "listen to the shell", "balloon": "hold the balloon", "drum": "play the drum",
    "apple": "eat the apple", "umbrella": "open the umbrella", "map": "follow the map",
    "teddy bear": "hug the teddy bear", "crayon": "draw with the crayon", "bell": "ring the bell",
    "blanket": "sit on the blanket",
}
ACTIVITIES = ["play", "run", "jump", "dance", "sing", "swim", "read", "draw", "climb trees", "build things",
              "look at the clouds", "pick flowers", "help others", "bake cookies", "splash in puddles"]
FEELINGS_GOOD = ["happy", "glad", "proud", "excited", "thankful", "calm"]
FEELINGS_BAD = ["sad", "scared", "worried", "upset", "lonely", "confused"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy", "snowy", "bright"]
TIMES = ["One day", "One morning", "One sunny day", "One evening", "Later that day", "On a cold night",
         "One afternoon", "After lunch"]
ENDINGS = [
    "From that day on, {a} and {b} were best friends.",
    "{A_s} learned that sharing is better than keeping things to yourself.",
    "{A_s} learned that it is good to ask for help.",
    "They played together until the sun went down.",
    "It was the best day ever.",
    "{A_s} smiled and went home with a happy heart.",
    "That night, {a} slept well and dreamed about {a_pos} {obj}.",
    "{A_s} never forgot that day {place}.",
    "And they all lived happily ever after.",
    "{A_s} knew that being kind always makes things better.",
]
MORALS = ["kind", "brave", "patient", "careful", "honest", "friendly"]


def article(noun_phrase: str) -> str:
    """``a`` or ``an`` in agreement with the first sound of ``noun_phrase``."""
    return "an" if noun_phrase[0] in "aeiou" else "a"


def with_article(noun_phrase: str) -> str:
    return f"{article(noun_phrase)} {noun_phrase}"


class StoryWriter:
    """Writes one story at a time from a seeded random generator."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    # -- picking parts -------------------------------------------------------------------------

    def pick(self, options):
        return self.rng.choice(options)

    def character(self, avoid: set[str] = frozenset()) -> tuple[Character, str]:
        """A character and the phrase that introduces it ("a little girl named Lily")."""
        r = self.rng.random()
        trait = self.pick(TRAITS)
        if r < 0.6:
            kind = self.pick(["girl", "boy"])
            names = [n for n in (GIRLS if kind == "girl" else BOYS) if n not in avoid]
            name = self.pick(names)
            subject, obj, possessive = PEOPLE[kind]
        else:
            kind = self.pick(ANIMALS)
            name = self.pick([n for n in ANIMAL_NAMES if n not in avoid])
            subject, obj, possessive = self.pick([("he", "him", "his"), ("she", "her", "her")])
        intro = f"{with_article(trait + ' ' + kind)} named {name}"
        return Character(name, kind, subject, obj, possessive), intro

    def thing(self) -> tuple[str, str, str]:
        """(noun, described noun phrase, play phrase)."""
        noun = self.pick(list(OBJECTS))
        r = self.rng.random()
        if r < 0.4:
            described = f"{self.pick(COLORS)} {noun}"
        elif r < 0.7:
            described = f"{self.pick(SIZES)} {noun}"
        elif r < 0.85:
            described = f"{self.pick(SIZES)} {self.pick(COLORS)} {noun}"
        else:
            described = noun
        return noun, described, OBJECTS[noun]

    # -- the story -----------------------------------------------------------------------------

    def opening(self, a: Character, intro: str, place_phrase: str) -> list[str]:
        activity = self.pick(ACTIVITIES)
        options = [
            [f"Once upon a time, there was {intro}.", f"{a.Subject} loved to {activity} {place_phrase}."],
            [f"Once upon a time, {intro} lived near the {self.pick(list(PLACES))}.",
             f"Every day, {a.subject} liked to {activity}."],
            [f"There was once {intro}.", f"{a.name} was very {self.pick(TRAITS)} and liked to {activity}."],
            [f"{a.name} was {intro.split(' named ')[0]}.", f"{a.Subject} lived with {a.possessive} "
             f"{self.pick([g[0] for g in GROWNUPS])} in a little house."],
        ]
        return self.pick(options)

    def discovery(self, a: Character, described: str, noun: str, spot: str, place_phrase: str, go_phrase: str) -> list[str]:
        time = self.pick(TIMES)
        weather = self.pick(WEATHER)
        options = [
            [f"{time}, {a.name} went {go_phrase}.",
             f"{a.Subject} saw {with_article(described)} near {spot}."],
            [f"{time}, it was {weather} outside.", f"{a.name} went {go_phrase} and found {with_article(described)} near {spot}."],
            [f"{time}, {a.name} was walking {place_phrase}.",
             f"Suddenly, {a.subject} saw something {self.pick(['shiny', 'strange', 'pretty', 'funny'])} by {spot}.",
             f"It was {with_article(described)}!"],
            [f"{time}, {a.possessive} {self.pick([g[0] for g in GROWNUPS])} gave {a.obj} {with_article(described)}.",
             f"{a.name} was very {self.pick(FEELINGS_GOOD)}.", f'"Thank you!" said {a.name}.'],
        ]
        return self.pick(options)

    def problem(
        self, a: Character, b: Character, b_intro: str, noun: str, spot: str, play: str
    ) -> tuple[list[str], bool]:
        """The trouble, and whether it already brought in the second character (a quarrel)."""
        bad = self.pick(FEELINGS_BAD)
        options = [
            [f"But then a big wind came and took the {noun} away.", f"It flew far away, past {spot}.",
             f"{a.name} could not find it and felt {bad}."],
            [f"{a.name} wanted to {play}, but {a.subject} did not know how.", f"{a.Subject} felt {bad}."],
            [f"Then {a.name} dropped the {noun} and it rolled away behind {spot}.", f'"Oh no!" {a.subject} cried.',
             f"{a.Subject} was very {bad}."],
            [f"Just then, {b_intro} came by.", f'"Can I {play} too?" asked {b.name}.',
             f"But {a.name} did not want to share the {noun}.", f"{b.name} felt {bad} and walked away."],
            [f"{a.name} looked for the {noun} everywhere, but it was gone.",
             f"{a.Subject} looked near {spot} and behind the door.", f"{a.Subject} started to cry."],
        ]
        idx = self.rng.randrange(len(options))
        return options[idx], idx == 3

    def dialogue(self, a: Character, b: Character, b_intro: str, noun: str, b_met: bool) -> list[str]:
        lines = [] if b_met else [f"Then {b_intro} came along."]
        ask = self.pick([
            f'"Why are you sad, {a.name}?" asked {b.name}.',
            f'"What is wrong?" asked {b.name}.',
            f'"Are you okay?" {b.name} asked {a.obj}.',
        ])
        if b_met:
            lines += [f"{a.name} sat alone and thought about {b.name}.",
                      f"{a.Subject} felt bad, so {a.subject} went to find {b.obj}.",
                      f'"I am sorry, {b.name}," said {a.name}. "Let us play with the {noun} together."',
                      f'{b.name} smiled. "Thank you, {a.name}," {b.subject} said.']
        else:
            lines += [ask, f'"I lost my {noun}," said {a.name}.' if self.rng.random() < 0.5
                      else f'"I cannot get my {noun}," said {a.name}.',
                      self.pick([f'"Do not worry, I will help you," said {b.name}.',
                                 f'"I can help you," said {b.name} with a smile.',
                                 f'"Let us look for it together," said {b.name}.'])]
        if b.kind in ANIMAL_SOUNDS and self.rng.random() < 0.5:
            lines.append(f"{b.name} {ANIMAL_SOUNDS[b.kind]} happily.")
        return lines

    def resolution(self, a: Character, b: Character, noun: str, spot: str, play: str) -> list[str]:
        good = self.pick(FEELINGS_GOOD)
        options = [
            [f"{b.name} ran fast and came back with the {noun}.", f"{a.name} was so {good}.",
             f'"Thank you, {b.name}!" said {a.name}.'],
            [f"Together, they looked near {spot}.", f"At last, {b.name} found the {noun}.",
             f"{a.name} gave {b.obj} a big hug."],
            [f"{b.name} showed {a.name} how to {play}.", "It was easy!",
             f"{a.name} and {b.name} laughed and played all day."],
            [f"They worked together and soon the {noun} was safe again.", f"{a.name} felt {good}."],
        ]
        return self.pick(options)

    def ending(self, a: Character, b: Character, noun: str, place_phrase: str) -> list[str]:
        end = self.pick(ENDINGS).format(
            a=a.name, b=b.name, A_s=a.name if self.rng.random() < 0.5 else a.Subject,
            a_pos=a.possessive, obj=noun, place=place_phrase,
        )
        extra = []
        if self.rng.random() < 0.3:
            extra.append(f"It is good to be {self.pick(MORALS)}.")
        return [end, *extra]

    def story(self) -> str:
        a, a_intro = self.character()
        b, b_intro = self.character(avoid={a.name})
        place = self.pick(list(PLACES))
        place_phrase, go_phrase, spots = PLACES[place]
        spot = self.pick(spots)
        noun, described, play = self.thing()
        sentences = self.opening(a, a_intro, place_phrase)
        sentences += self.discovery(a, described, noun, spot, place_phrase, go_phrase)
        trouble, b_met = self.problem(a, b, b_intro, noun, spot, play)
        sentences += trouble
        sentences += self.dialogue(a, b, b_intro, noun, b_met)
        if not b_met:
            sentences += self.resolution(a, b, noun, spot, play)
        sentences += self.ending(a, b, noun, place_phrase)
        return " ".join(sentences)


def write_split(path: Path, seed: int, kilobytes: int) -> int:
    """Write stories to ``path`` until it holds about ``kilobytes`` KB; return the story count."""
    writer = StoryWriter(seed)
    target = kilobytes * 1000
    size = 0
    lines = []
    while size < target:
        line = writer.story()
        lines.append(line)
        size += len(line.encode("utf-8")) + 1
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=sorted(SPLITS), help="write only this split (default: all)")
    parser.add_argument("--seed", type=int, help="override the split's seed")
    parser.add_argument("--kilobytes", type=int, help="override the split's size")
    parser.add_argument("--output", type=Path, help="override the output file (with --split)")
    args = parser.parse_args(argv)
    for split, (filename, seed, kilobytes) in SPLITS.items():
        if args.split and split != args.split:
            continue
        path = args.output if (args.output and args.split) else HERE / filename
        count = write_split(path, args.seed if args.seed is not None else seed, args.kilobytes or kilobytes)
        print(f"{split}: {count} stories, {path.stat().st_size} bytes -> {path}")


if __name__ == "__main__":
    main()
