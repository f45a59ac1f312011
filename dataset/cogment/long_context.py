"""Stage 4 task sources: long-context retrieval, generated, or LongBench / SCROLLS from their JSONL files.

Generated stand-ins fill the whole sequence with filler sentences:

* ``passkey`` (Mohtashami & Jaggi 2023): one sentence "the pass key is 7 1 9 3 2 ." hidden at a random place
  in the filler; the question asks for it. Answerable from the context.
* ``associative_recall`` (multi-query associative recall, Arora et al. 2023): ``pairs`` key-value pairs
  (animal, digit) scattered through the filler, then ``queries`` keys, each followed by a slot for its value.
* ``passkey_memory``: passkey retrieval across contexts, the long-term memory's test. A fixed pool of
  ``docs`` documents, each with an id and a passkey. A *context* example hides "the pass key of doc 3 1 4
  is 7 1 9 3 ." in filler and asks for it (readable in context); a *query* example asks only "what is the
  pass key of doc 3 1 4 ?" with no context, so the answer can only come from memory. Training has context
  and query examples of the first ``1 - heldout`` of the documents only: the held-out documents (their ids
  and passkeys) never appear in training. A validation example is a query of a held-out document that
  carries the document's context example as its ``study`` document: the memory writes the document
  during the evaluation (models/cogment/model.py), then the question is asked without it. The weights
  cannot know a held-out passkey, so with memory writes off recall is at chance (10^-digits); only what
  the memory wrote from the validation document can answer. The question is the memory cue, the same
  words in both kinds of example.

Real files: ``data.longbench_path`` (LongBench JSONL: ``{"input", "context", "answers": [...]}``) and
``data.scrolls_path`` (SCROLLS JSONL: ``{"input", "output"}``, the question before the first blank line of
``input`` when there is one). Contexts longer than the sequence lose their middle; records whose answer
does not fit ``answer_slots`` are left out.
"""

from __future__ import annotations

import numpy as np

from dataset.cogment.examples import Example, IGNORE_LABEL
from dataset.cogment.real_files import field, read_json_records
from dataset.cogment.tasks import TaskSource
from dataset.cogment.text_tasks import TextQuestions, question_answer
from dataset.cogment.vocabulary import ANSWER, RECALL_KEYS, SEP
from utils.config.errors import ConfigError

FILLER = ("the grass is green .", "the sky is blue .", "the sun is yellow .", "here we go .",
          "there and back again .")


class FillerText:
    """Filler sentences (as ids) and the insertion of sentences at random sentence boundaries."""

    def __init__(self, source: TaskSource) -> None:
        self.sentences = [source.vocab.encode_text(s) for s in FILLER]

    def fill(self, length: int, inserts: list[list[int]], rng: np.random.Generator) -> list[int]:
        """About ``length`` ids of filler (never more) with every sentence of ``inserts`` at a random boundary."""
        budget = length - sum(len(s) for s in inserts)
        pieces: list[list[int]] = []
        used = 0
        while True:
            sentence = self.sentences[int(rng.integers(len(self.sentences)))]
            if used + len(sentence) > budget:
                break
            pieces.append(sentence)
            used += len(sentence)
        for sentence in inserts:
            pieces.insert(int(rng.integers(len(pieces) + 1)), sentence)
        return [t for p in pieces for t in p]


class Passkey(TaskSource):
    name = "passkey"
    OPTIONS = {"digits": 5}

    def check_options(self) -> None:
        self.digits = self.require_int("digits", 1, 20)
        self.slots = self.digits + 1
        self.question = self.vocab.encode_text("what is the pass key ?")
        self.filler = FillerText(self)
        if len(self.question) + self.slots + 2 + 12 + self.digits > self.seq_len:
            raise self.too_long(len(self.question) + self.slots + 14 + self.digits, "raise data.seq_len")

    def sample(self, split: str, rng: np.random.Generator) -> Example:
        key = [int(d) for d in rng.integers(0, 10, size=self.digits)]
        fact = self.vocab.encode_text("the pass key is " + " ".join(map(str, key)) + " . remember it .")
        budget = self.seq_len - len(self.question) - self.slots - 2
        context = self.filler.fill(budget, [fact], rng)
        return question_answer(context, self.question, [self.vocab.id(str(d)) for d in key], self.slots)


class AssociativeRecall(TaskSource):
    name = "associative_recall"
    OPTIONS = {"pairs": 16, "queries": 4}

    def check_options(self) -> None:
        self.pairs = self.require_int("pairs", 1, len(RECALL_KEYS))
        self.queries = self.require_int("queries", 1, self.pairs)
        self.keys = self.vocab.ids(list(RECALL_KEYS))
        self.filler = FillerText(self)
        needed = 3 * self.pairs + 2 * self.queries + 1
        if needed > self.seq_len:
            raise self.too_long(needed, f"lower {self.option_key('pairs')} or raise data.seq_len")

    def sample(self, split: str, rng: np.random.Generator) -> Example:
        chosen = rng.choice(len(self.keys), size=self.pairs, replace=False)
        values = rng.integers(0, 10, size=self.pairs)
        facts = [[self.keys[k], self.vocab.id(str(v)), self.vocab.id(",")] for k, v in zip(chosen, values)]
        asked = rng.choice(self.pairs, size=self.queries, replace=False)
        context = self.filler.fill(self.seq_len - 2 * self.queries - 1, facts, rng)
        inputs = context + [SEP]
        labels = [IGNORE_LABEL] * len(inputs)
        cue = [False] * len(inputs)
        for q in asked:
            inputs += [self.keys[chosen[q]], ANSWER]
            labels += [IGNORE_LABEL, self.vocab.id(str(values[q]))]
            cue += [True, False]
        return Example(np.array(inputs, dtype=np.int64), np.array(labels, dtype=np.int64), np.array(cue, dtype=bool))


class PasskeyMemory(TaskSource):
    name = "passkey_memory"
    OPTIONS = {"docs": 64, "digits": 4, "heldout": 0.5, "query_fraction": 0.5, "context_length": None}

    def check_options(self) -> None:
        self.docs = self.require_int("docs", 2, 1000)
        self.digits = self.require_int("digits", 1, 20)
        heldout, self.query_fraction = float(self.options["heldout"]), float(self.options["query_fraction"])
        if not 0.0 < heldout < 1.0 or not 0.0 <= self.query_fraction < 1.0:
            raise ConfigError(f"{self.option_key('heldout')} must be in (0, 1) and {self.option_key('query_fraction')} "
                              f"in [0, 1), got {heldout} and {self.query_fraction}")
        self.queried = max(1, int(round(self.docs * (1.0 - heldout))))  # documents 0 .. queried-1 train, the rest are held out
        if self.queried >= self.docs:
            raise ConfigError(f"{self.option_key('heldout')}={heldout} holds out no document of {self.docs}")
        rng = np.random.default_rng([self.seed, 4004])
        self.doc_ids = rng.choice(1000, size=self.docs, replace=False)
        self.passkeys = rng.integers(0, 10, size=(self.docs, self.digits))
        self.slots = self.digits + 1
        self.filler = FillerText(self)
        length = self.options["context_length"]
        self.context_length = self.seq_len if length is None else int(length)
        if 40 + self.slots > min(self.seq_len, self.context_length):
            raise self.too_long(40 + self.slots, "raise data.seq_len")

    def question(self, doc: int) -> list[int]:
        return self.vocab.encode_text(f"what is the pass key of doc {self.doc_ids[doc]:03d} ?")

    def context_example(self, doc: int, rng: np.random.Generator) -> Example:
        fact = self.vocab.encode_text(f"the pass key of doc {self.doc_ids[doc]:03d} is "
                                      + " ".join(map(str, self.passkeys[doc])) + " .")
        question = self.question(doc)
        budget = min(self.seq_len, self.context_length) - len(question) - self.slots - 2
        return question_answer(self.filler.fill(budget, [fact], rng), question, self.answer(doc), self.slots)

    def query_example(self, doc: int) -> Example:
        return question_answer([], self.question(doc), self.answer(doc), self.slots)

    def answer(self, doc: int) -> list[int]:
        return [self.vocab.id(str(d)) for d in self.passkeys[doc]]

    def sample(self, split: str, rng: np.random.Generator) -> Example:
        if split == "val":  # a held-out document, studied, then asked without it
            doc = int(rng.integers(self.queried, self.docs))
            example = self.query_example(doc)
            example.study = self.context_example(doc, rng)
            return example
        doc = int(rng.integers(self.queried))
        return self.query_example(doc) if rng.random() < self.query_fraction else self.context_example(doc, rng)


class LongDocuments(TextQuestions):
    """LongBench or SCROLLS rows from a JSONL file (the subclasses say which fields hold what)."""

    OPTIONS = {"answer_slots": 16, "path": None, "val_fraction": 0.1}

    def check_options(self) -> None:
        self.require_int("answer_slots", 2)
        if self.options["path"] is None:
            raise ConfigError(f"the {self.name} task reads real files only: set data.{self.name}_path=/path/to/file.jsonl "
                              f"(or drop {self.name} from data.tasks; 'passkey' and 'associative_recall' are the "
                              "generated long-context tasks)")
        self.load_rows(self.read(str(self.options["path"])), str(self.options["path"]))

    def read(self, path: str) -> list[tuple[list[list[int]], list[int], list[int]]]:
        raise NotImplementedError

    def sample(self, split: str, rng: np.random.Generator) -> Example:
        return self.real_example(split, rng)


class LongBench(LongDocuments):
    name = "longbench"

    def read(self, path: str) -> list[tuple[list[list[int]], list[int], list[int]]]:
        rows = []
        for number, record in read_json_records(path, "data.longbench_path"):
            context = field(record, "context", str, path, number)
            question = field(record, "input", str, path, number)
            answers = field(record, "answers", list, path, number)
            if not answers or not isinstance(answers[0], str):
                raise ConfigError(f"{path}:{number}: 'answers' must be a non-empty list of strings")
            rows.append(([self.vocab.encode_text(context)], self.vocab.encode_text(question),
                         self.vocab.encode_text(answers[0])))
        return rows


class Scrolls(LongDocuments):
    name = "scrolls"

    def read(self, path: str) -> list[tuple[list[list[int]], list[int], list[int]]]:
        rows = []
        for number, record in read_json_records(path, "data.scrolls_path"):
            text = field(record, "input", str, path, number)
            output = field(record, "output", str, path, number)
            question, _, document = text.partition("\n\n") if "\n\n" in text else ("", "", text)
            rows.append(([self.vocab.encode_text(document)], self.vocab.encode_text(question),
                         self.vocab.encode_text(output)))
        return rows
