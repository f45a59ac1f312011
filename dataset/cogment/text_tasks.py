"""Stage 3 task sources: multi-step arithmetic word problems (GSM8K) and multi-hop questions (HotpotQA).

Generated stand-ins of the same shape:

* ``gsm8k``: a short story of ``min_steps``..``max_steps`` operations on one person's objects (buys, finds,
  gives away, loses, doubles), sometimes with a distracting sentence about someone else; the question asks
  how many are left; the answer is the number, one digit per token.
* ``hotpotqa``: people live in cities, cities lie in countries, countries on continents, in a world drawn
  afresh for every example (so no fact can be memorised, every hop must be read); the question asks for
  the country (two hops) or the continent (three hops) of one person, among distracting facts.

Real files (``data.gsm8k_path``, ``data.hotpotqa_path``): GSM8K JSONL records ``{"question", "answer"}``
whose answer ends in ``#### <number>``; HotpotQA records (JSONL, or the JSON list it is distributed as)
``{"question", "answer", "context"}`` with the context as ``[[title, [sentence, ...]], ...]`` (the original
files) or ``{"title": [...], "sentences": [[...], ...]}`` (the Hugging Face export). Records whose answer does
not fit the answer slots are left out. One file serves both splits (a seeded ``val_fraction``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from dataset.cogment.examples import Example, fit_context, question_answer
from dataset.cogment.real_files import field, read_json_records, split_rows
from dataset.cogment.tasks import TaskSource
from dataset.cogment.vocabulary import CITIES, CONTINENTS, COUNTRIES, NAMES, OBJECTS
from utils.config.errors import ConfigError

log = logging.getLogger(__name__)


class TextQuestions(TaskSource):
    """Shared by the text tasks: real-file rows (context ids, question ids, answer ids) split train/val."""

    path_key = ""  # the data module's key of the real file, for messages

    def load_rows(self, rows: list[tuple[list[list[int]], list[int], list[int]]], path: str) -> None:
        """Rows are (context paragraphs, question, answer) as token ids."""
        slots = self.options["answer_slots"]
        fitting = [r for r in rows if len(r[2]) + 1 <= slots and len(r[1]) + slots + 2 <= self.seq_len]
        if len(fitting) < len(rows):
            log.info("%s: %d of %d records left out (answer longer than %d slots, or the question longer than "
                     "data.seq_len)", path, len(rows) - len(fitting), len(rows), slots - 1)
        if not fitting:
            raise ConfigError(f"{path}: no record fits; raise {self.option_key('answer_slots')} or data.seq_len")
        self.rows = split_rows(fitting, float(self.options["val_fraction"]), self.seed, salt=hash_name(self.name))

    def real_example(self, split: str, rng: np.random.Generator) -> Example:
        paragraphs, question, answer = self.rows[split][int(rng.integers(len(self.rows[split])))]
        if self.augmentation.applies(rng, split) and self.augmentation.allows("reorder_facts"):
            paragraphs = [paragraphs[i] for i in rng.permutation(len(paragraphs))]
        context = [t for p in paragraphs for t in p]
        slots = self.options["answer_slots"]
        budget = self.seq_len - len(question) - slots - 2  # <sep>, <query>
        return question_answer(fit_context(context, budget), question, answer, slots)


def hash_name(name: str) -> int:
    return sum(ord(c) * (i + 1) for i, c in enumerate(name))


class WordProblems(TextQuestions):
    name = "gsm8k"
    OPTIONS = {"min_steps": 2, "max_steps": 4, "max_operand": 20, "answer_slots": 8, "path": None, "val_fraction": 0.1}

    def check_options(self) -> None:
        self.min_steps = self.require_int("min_steps", 1)
        self.max_steps = self.require_int("max_steps", self.min_steps)
        self.max_operand = self.require_int("max_operand", 2, 999)
        self.require_int("answer_slots", 2)
        self.rows: dict[str, list[Any]] | None = None
        if self.options["path"] is not None:
            self.load_rows(self._read(self.options["path"]), self.options["path"])
        else:
            longest = 12 + self.max_steps * 10 + 12  # the longest story, a distractor and the question
            if longest + self.options["answer_slots"] + 2 > self.seq_len:
                raise self.too_long(longest, f"lower {self.option_key('max_steps')} or raise data.seq_len")

    def _read(self, path: str) -> list[tuple[list[list[int]], list[int], list[int]]]:
        rows = []
        for number, record in read_json_records(path, "data.gsm8k_path"):
            question = field(record, "question", str, path, number)
            answer = field(record, "answer", str, path, number)
            if "####" not in answer:
                raise ConfigError(f"{path}:{number}: the answer has no '#### <number>' line (GSM8K's format)")
            final = answer.rsplit("####", 1)[1].strip().replace(",", "")
            rows.append(([], self.vocab.encode_text(question), self.vocab.encode_text(final)))
        return rows

    def sample(self, split: str, rng: np.random.Generator) -> Example:
        if self.rows is not None:
            return self.real_example(split, rng)
        name, other = (NAMES[i] for i in rng.choice(len(NAMES), size=2, replace=False))
        obj = OBJECTS[int(rng.integers(len(OBJECTS)))]
        value = int(rng.integers(2, self.max_operand + 1))
        sentences = [f"{name} has {value} {obj} ."]
        for _ in range(int(rng.integers(self.min_steps, self.max_steps + 1))):
            choice = int(rng.integers(5))
            amount = int(rng.integers(1, self.max_operand + 1))
            if choice == 0:
                value += amount
                sentences.append(f"{name} buys {amount} more {obj} .")
            elif choice == 1:
                value += amount
                sentences.append(f"{name} finds {amount} {obj} .")
            elif choice == 2 and value > 1:
                amount = int(rng.integers(1, value))
                value -= amount
                sentences.append(f"{name} gives {amount} {obj} to {other} .")
            elif choice == 3 and value > 1:
                amount = int(rng.integers(1, value))
                value -= amount
                sentences.append(f"{name} loses {amount} {obj} .")
            elif value * 2 < 1000:
                value *= 2
                sentences.append(f"{name} doubles the {obj} .")
            else:
                value -= 1
                sentences.append(f"{name} eats one of the {obj} .")
        if rng.random() < 0.5:  # a distractor about someone else
            sentences.insert(int(rng.integers(1, len(sentences) + 1)),
                             f"{other} has {int(rng.integers(1, self.max_operand + 1))} {obj} .")
        context = self.vocab.encode_text(" ".join(sentences))
        question = self.vocab.encode_text(f"how many {obj} does {name} have now ?")
        return question_answer(context, question, self.vocab.encode_number(value), self.options["answer_slots"])


class MultiHop(TextQuestions):
    name = "hotpotqa"
    OPTIONS = {"people": 3, "max_hops": 3, "distractors": 2, "answer_slots": 8, "path": None, "val_fraction": 0.1}

    def check_options(self) -> None:
        self.people = self.require_int("people", 1, len(CITIES))
        self.max_hops = self.require_int("max_hops", 2, 3)
        self.distractors = self.require_int("distractors", 0, len(CITIES) - self.people)
        self.require_int("answer_slots", 2)
        self.rows: dict[str, list[Any]] | None = None
        if self.options["path"] is not None:
            self.load_rows(self._read(self.options["path"]), self.options["path"])
        else:
            longest = 6 * (3 * self.people + 2 * self.distractors) + 8
            if longest + self.options["answer_slots"] + 2 > self.seq_len:
                raise self.too_long(longest, f"lower {self.option_key('people')} or raise data.seq_len")

    def _paragraphs(self, record: dict[str, Any], path: str, number: int) -> list[tuple[str, list[str]]]:
        context = record.get("context")
        if isinstance(context, dict) and isinstance(context.get("title"), list):
            return list(zip(context["title"], context.get("sentences") or []))
        if isinstance(context, list) and all(isinstance(p, list) and len(p) == 2 for p in context):
            return [(str(p[0]), list(p[1])) for p in context]
        raise ConfigError(f"{path}:{number}: 'context' must be [[title, [sentence, ...]], ...] (HotpotQA) or "
                          "{'title': [...], 'sentences': [...]}")

    def _read(self, path: str) -> list[tuple[list[list[int]], list[int], list[int]]]:
        rows = []
        for number, record in read_json_records(path, "data.hotpotqa_path"):
            question = field(record, "question", str, path, number)
            answer = field(record, "answer", str, path, number)
            paragraphs = self._paragraphs(record, path, number)
            encoded = [self.vocab.encode_text(f"{title} : {' '.join(map(str, sentences))}") for title, sentences in paragraphs]
            rows.append((encoded, self.vocab.encode_text(question), self.vocab.encode_text(answer)))
        return rows

    def sample(self, split: str, rng: np.random.Generator) -> Example:
        if self.rows is not None:
            return self.real_example(split, rng)
        n_cities = self.people + self.distractors
        people = [NAMES[i] for i in rng.choice(len(NAMES), size=self.people, replace=False)]
        cities = [CITIES[i] for i in rng.choice(len(CITIES), size=n_cities, replace=False)]
        country_of = {c: COUNTRIES[int(rng.integers(len(COUNTRIES)))] for c in cities}
        countries = sorted(set(country_of.values()))
        continent_of = {k: CONTINENTS[int(rng.integers(len(CONTINENTS)))] for k in countries}
        facts = [f"{p} lives in {c} ." for p, c in zip(people, cities)]
        facts += [f"{c} is in {country_of[c]} ." for c in cities]
        facts += [f"{k} is in {continent_of[k]} ." for k in countries]
        facts = [facts[i] for i in rng.permutation(len(facts))]
        target = int(rng.integers(self.people))
        hops = int(rng.integers(2, self.max_hops + 1))
        if hops == 2:
            question, answer = f"which country does {people[target]} live in ?", country_of[cities[target]]
        else:
            question, answer = (f"which continent does {people[target]} live in ?",
                                continent_of[country_of[cities[target]]])
        return question_answer(self.vocab.encode_text(" ".join(facts)), self.vocab.encode_text(question),
                               [self.vocab.word(answer)], self.options["answer_slots"])
