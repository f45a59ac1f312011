"""One vocabulary and one task registry for every stage of the Cogment curriculum.

The model is built once, from stage 0's data facts, so every stage's data must speak the same
vocabulary: grids, puzzles, ListOps expressions and text all map into the fixed token table below.

Token table (ids in this order):

* specials: ``<pad>`` 0, ``<sep>``, ``<query>`` (ends a question), ``<answer>`` (a slot the model fills),
  ``<eos>`` (ends an answer), ``<unk>``, ``<blank>`` (an empty Sudoku cell), ``<gridpad>`` (a canvas cell
  outside the grid, so a predicted grid also predicts its size);
* digits ``0``..``9`` (numbers are written one digit per token, so arithmetic answers are digit strings);
* grid colours ``c0``..``c9``; maze cells ``<wall>``, ``<open>``, ``<start>``, ``<goal>``, ``<path>``;
* ListOps operators ``[MAX`` ``[MIN`` ``[MED`` ``[SM`` and the closing ``]`` (the LRA spelling);
* punctuation, and the words the stand-in generators use;
* ``hash_buckets`` ids for every other word of a real data file (GSM8K, HotpotQA, LongBench, SCROLLS):
  a word is mapped to ``crc32(word) % hash_buckets`` (the hashing trick: fixed size, no vocabulary file,
  the same id on every machine). Collisions are possible and harmless for scoring: answers are compared
  as token ids.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from utils.config.errors import ConfigError

PAD, SEP, QUERY, ANSWER, EOS, UNK, BLANK, GRIDPAD = range(8)
SPECIALS = ("<pad>", "<sep>", "<query>", "<answer>", "<eos>", "<unk>", "<blank>", "<gridpad>")
DIGITS = tuple(str(d) for d in range(10))
COLORS = tuple(f"c{c}" for c in range(10))
MAZE_CELLS = ("<wall>", "<open>", "<start>", "<goal>", "<path>")
LISTOPS_OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
LISTOPS_CLOSE = "]"
PUNCTUATION = tuple(".,?!:;'\"()+-*/=%$&@#<>[]{}")

# Words of the generated stand-ins (dataset/cogment/text_tasks.py, long_context.py); a real file's other
# words go to the hash buckets.
NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mike", "nina",
         "oscar", "peggy", "quinn", "rupert", "sybil", "trent", "uma", "victor", "wendy", "xavier", "yara", "zoe")
OBJECTS = ("apples", "pears", "books", "coins", "pens", "cards", "stamps", "shells", "marbles", "eggs", "cookies",
           "stickers")
CITIES = ("paris", "rome", "berlin", "madrid", "lisbon", "vienna", "prague", "warsaw", "oslo", "dublin", "tokyo",
          "lima", "cairo", "delhi", "quito", "sydney")
COUNTRIES = ("france", "italy", "germany", "spain", "portugal", "austria", "czechia", "poland", "norway", "ireland",
             "japan", "peru", "egypt", "india", "ecuador", "australia")
CONTINENTS = ("europe", "asia", "america", "africa", "oceania", "antarctica")
RECALL_KEYS = ("ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay", "koi", "lark", "mole", "newt",
               "owl", "pig", "quail", "rat", "seal", "toad", "urchin", "vole", "wasp", "yak", "zebra", "crab", "deer",
               "frog", "goat", "hare", "lion", "lynx", "mink", "moth", "orca", "puma", "swan", "tick", "wolf", "wren")
FUNCTION_WORDS = (
    "has", "have", "had", "buys", "doubles", "finds", "gets", "gives", "loses", "sells", "eats", "more", "to", "from", "each",
    "times", "as", "many", "then", "how", "does", "do", "now", "what", "which", "who", "where", "in", "is", "are",
    "the", "a", "an", "of", "and", "lives", "live", "country", "city", "continent", "pass", "key", "doc", "remember",
    "it", "grass", "green", "sky", "blue", "sun", "yellow", "here", "we", "go", "there", "back", "again", "value",
    "total", "twice", "left", "after", "that", "this", "on", "for", "with", "by", "be", "was", "were", "not", "no",
    "yes", "or", "if", "all", "some", "one", "two", "three", "four", "five", "ten", "his", "her", "their", "story",
    "note", "keep", "mind", "fact", "recall",
)
WORDS = tuple(dict.fromkeys(NAMES + OBJECTS + CITIES + COUNTRIES + CONTINENTS + RECALL_KEYS + FUNCTION_WORDS))

FIXED_TOKENS = (SPECIALS + DIGITS + COLORS + MAZE_CELLS + LISTOPS_OPERATORS
                + tuple(p for p in PUNCTUATION) + WORDS)  # the ListOps "]" is the punctuation "]"

# Text is split into digits (one token each), words (lower-cased) and single other characters.
_TEXT_PIECES = re.compile(r"\d|[^\W\d_]+|[^\s\w]|_")


# ------------------------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class TaskType:
    name: str
    family: str  # grid | sequence | text: which input/output adapter the model applies


FAMILIES = ("grid", "sequence", "text")
TASK_TYPES: tuple[TaskType, ...] = (
    TaskType("linear_map", "sequence"),
    TaskType("maze", "grid"),
    TaskType("arc", "grid"),
    TaskType("sudoku", "grid"),
    TaskType("listops", "sequence"),
    TaskType("gsm8k", "text"),
    TaskType("hotpotqa", "text"),
    TaskType("passkey", "text"),
    TaskType("associative_recall", "sequence"),
    TaskType("passkey_memory", "text"),
    TaskType("longbench", "text"),
    TaskType("scrolls", "text"),
)
TASK_NAMES = tuple(t.name for t in TASK_TYPES)
TASK_INDEX = {t.name: i for i, t in enumerate(TASK_TYPES)}


def task_index(name: str, key: str) -> int:
    if name not in TASK_INDEX:
        raise ConfigError(f"{key}: unknown task {name!r}; the tasks are {', '.join(TASK_NAMES)}")
    return TASK_INDEX[name]


def task_families() -> list[int]:
    """Family index of every task type, in task order (a fact the model reads: which adapter a row uses)."""
    return [FAMILIES.index(t.family) for t in TASK_TYPES]


# ------------------------------------------------------------------------------------------- vocabulary
class Vocabulary:
    """The fixed token table plus ``hash_buckets`` ids for words of real files (see the module docstring)."""

    def __init__(self, hash_buckets: int = 256) -> None:
        if isinstance(hash_buckets, bool) or not isinstance(hash_buckets, int) or hash_buckets < 1:
            raise ConfigError(f"data.hash_buckets must be an integer >= 1, got {hash_buckets!r}")
        self.hash_buckets = hash_buckets
        self._ids = {token: i for i, token in enumerate(FIXED_TOKENS)}
        assert len(self._ids) == len(FIXED_TOKENS), "duplicate fixed tokens"
        self.hash_offset = len(FIXED_TOKENS)

    @property
    def size(self) -> int:
        return self.hash_offset + self.hash_buckets

    def id(self, token: str) -> int:
        """The id of a fixed token (a KeyError is a bug in a generator, not a user error)."""
        return self._ids[token]

    def ids(self, tokens: list[str] | tuple[str, ...]) -> list[int]:
        return [self._ids[t] for t in tokens]

    def word(self, piece: str) -> int:
        """A word or character of free text: its fixed id, else its hash bucket."""
        fixed = self._ids.get(piece)
        if fixed is not None:
            return fixed
        return self.hash_offset + zlib.crc32(piece.encode("utf-8")) % self.hash_buckets

    def encode_text(self, text: str) -> list[int]:
        """Free text to ids: digits one per token, words lower-cased, other characters one each."""
        return [self.word(piece.lower()) for piece in _TEXT_PIECES.findall(text)]

    def encode_number(self, value: int) -> list[int]:
        return [self._ids[d] for d in str(int(value))]

    def name(self, token_id: int) -> str:
        """A readable name of an id (hash buckets as ``<h123>``), for logs and debugging."""
        if token_id < self.hash_offset:
            return FIXED_TOKENS[token_id]
        return f"<h{token_id - self.hash_offset}>"

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.name(int(i)) for i in ids)
