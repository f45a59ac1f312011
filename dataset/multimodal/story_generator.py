"""Simple short stories generated from templates: the project's own text source for vision_unified.

Every story is a pure function of (seed, index): it draws from ``random.Random`` seeded with an integer
(whose sequence Python guarantees to be reproducible across platforms and versions), so story k is the
same whatever else is generated. The word lists and sentence templates below were written for this
project; nothing is copied from a corpus.

Files: ``write_stories(out_dir, n, seed)`` writes ``stories_000.txt``, ``stories_001.txt``, ... with
``stories_per_file`` stories each, separated by a line ``<|endoftext|>`` (the separator the text source
understands), plus ``DONE.json`` (written last) describing what was generated.

    python -m dataset.multimodal.story_generator OUT_DIR --num 100 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

from utils.storage.atomic import atomic_write_text

STORY_SEPARATOR = "<|endoftext|>"
DONE_FILE = "DONE.json"

NAMES = ("Mia", "Leo", "Ada", "Tom", "Nina", "Sam", "Ivy", "Ben", "Zoe", "Max", "Lila", "Omar", "Rosa", "Finn")
ANIMALS = ("cat", "dog", "fox", "owl", "rabbit", "duck", "turtle", "bear", "mouse", "frog", "goat", "horse")
ADJECTIVES = ("little", "brave", "sleepy", "curious", "kind", "shy", "happy", "clever", "tiny", "gentle")
PLACES = ("the park", "the forest", "the garden", "the beach", "the farm", "the old house", "the hill",
          "the river", "the market", "the school yard")
OBJECTS = ("red ball", "blue kite", "small box", "shiny key", "green hat", "old map", "yellow boat",
           "paper star", "wooden spoon", "soft blanket")
WEATHER = ("sunny", "windy", "rainy", "cold", "warm", "quiet", "cloudy")
FEELINGS = ("happy", "sad", "worried", "excited", "proud", "surprised", "tired")
PROBLEMS = (
    "the {obj} was stuck in a tree",
    "the {obj} fell into the water",
    "the {obj} was lost under the leaves",
    "a big wind blew the {obj} away",
    "the {obj} was too high to reach",
)
HELPS = (
    "{friend} the {animal} climbed up and pushed it down",
    "{friend} the {animal} used a long stick",
    "{friend} the {animal} looked in every corner",
    "{friend} the {animal} called all the other animals to help",
    "{friend} the {animal} had a good idea and built a little ladder",
)
ENDINGS = (
    "From that day on, {hero} and {friend} were best friends.",
    "{hero} said thank you, and they played until the sun went down.",
    "That night {hero} slept with a big smile.",
    "{hero} learned that it is good to ask for help.",
    "They went home together, and {hero} told everyone about the day.",
)


def generate_story(index: int, seed: int = 0) -> str:
    """Story number ``index`` for ``seed``: about 5-8 sentences, a few hundred characters."""
    if index < 0:
        raise ValueError(f"story index must be >= 0, got {index}")
    rng = random.Random(seed * 1_000_003 + index)
    hero, friend = rng.sample(NAMES, 2)
    animal, adjective, place = rng.choice(ANIMALS), rng.choice(ADJECTIVES), rng.choice(PLACES)
    obj, weather = rng.choice(OBJECTS), rng.choice(WEATHER)
    feeling_bad = rng.choice(("sad", "worried", "surprised"))
    feeling_good = rng.choice(("happy", "proud", "excited"))
    fmt = {"hero": hero, "friend": friend, "animal": rng.choice(ANIMALS), "obj": obj}
    sentences = [
        f"Once upon a time, there was a {adjective} {animal} named {hero}.",
        f"One {weather} day, {hero} went to {place} with a {obj}.",
    ]
    if rng.random() < 0.5:
        sentences.append(f"{hero} felt {rng.choice(FEELINGS)} and sang a little song.")
    sentences.append(f"But then {rng.choice(PROBLEMS).format(**fmt)}.")
    sentences.append(f"{hero} was {feeling_bad}.")
    sentences.append(f"Then {rng.choice(HELPS).format(**fmt)}.")
    sentences.append(f"Soon {hero} had the {obj} again and felt {feeling_good}.")
    sentences.append(rng.choice(ENDINGS).format(**fmt))
    return " ".join(sentences)


def write_stories(out_dir: Path | str, num_stories: int, seed: int = 0, stories_per_file: int = 100) -> list[Path]:
    """Write ``num_stories`` stories into ``out_dir`` (replacing whatever it held); return the files.

    Reuses the directory as is when its ``DONE.json`` says it already holds the same stories.
    """
    if num_stories < 0 or stories_per_file < 1:
        raise ValueError(f"need num_stories >= 0 and stories_per_file >= 1, got {num_stories}, {stories_per_file}")
    out_dir = Path(out_dir)
    spec = {"num_stories": num_stories, "seed": seed, "stories_per_file": stories_per_file, "format": 1}
    done = out_dir / DONE_FILE
    n_files = (num_stories + stories_per_file - 1) // stories_per_file
    files = [out_dir / f"stories_{k:03d}.txt" for k in range(n_files)]
    try:
        if json.loads(done.read_text(encoding="utf-8")) == spec and all(p.is_file() for p in files):
            return files
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for k, path in enumerate(files):
        stories = [generate_story(i, seed) for i in range(k * stories_per_file, min(num_stories, (k + 1) * stories_per_file))]
        atomic_write_text(path, f"\n{STORY_SEPARATOR}\n".join(stories) + "\n")
    atomic_write_text(done, json.dumps(spec) + "\n")  # last: the directory is complete once this exists
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--num", type=int, default=100, help="number of stories")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-file", type=int, default=100, help="stories per .txt file")
    args = parser.parse_args(argv)
    for path in write_stories(args.out_dir, args.num, args.seed, args.per_file):
        print(path)


if __name__ == "__main__":
    main()
