"""The Cogment data (dataset/cogment/): each task's examples are right, the layout holds for every task,
real benchmark files load (from small files written here), bad files are one-line ConfigErrors, and every
stage of both curricula speaks the same vocabulary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from dataset.cogment.curriculum import CurriculumStage, FourStageCurriculum
from dataset.cogment.data_module import SOURCES, CogmentData
from dataset.cogment.examples import IGNORE_LABEL
from dataset.cogment.listops import evaluate, parse
from dataset.cogment.tasks import Augmentation
from dataset.cogment.vocabulary import ANSWER, EOS, PAD, QUERY, TASK_NAMES, Vocabulary
from dataset.reasoning import maze as maze_lib
from dataset.reasoning import sudoku as sudoku_lib
from tests.conftest import CONF_DIR
from utils.config.errors import ConfigError

ARC_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "arc"
VOCAB = Vocabulary(64)


def source(name: str, seq_len: int = 256, augmentation: Augmentation | None = None, **options):
    return SOURCES[name](VOCAB, seq_len, options, augmentation or Augmentation(), 0)


def samples(name: str, count: int = 20, split: str = "train", **kwargs):
    src = source(name, **kwargs)
    rng = np.random.default_rng(0)
    return src, [src.sample(split, rng) for _ in range(count)]


def words(ids) -> list[str]:
    return [VOCAB.name(int(i)) for i in ids]


def answer_of(example) -> list[str]:
    """The labelled answer tokens without the final <eos>."""
    scored = [int(t) for t in example.labels if t != IGNORE_LABEL]
    return words(scored[:-1] if scored and scored[-1] == EOS else scored)


def text_of(example) -> str:
    return " ".join(words(t for t in example.inputs if t not in (PAD, ANSWER)))


# ------------------------------------------------------------------------------------------ vocabulary
def test_text_is_split_into_digits_words_and_characters_and_unknown_words_hash_deterministically() -> None:
    ids = VOCAB.encode_text("Alice has 12 apples, zyzzyva!")
    assert words(ids)[:5] == ["alice", "has", "1", "2", "apples"]
    assert words(ids)[5] == ","
    assert VOCAB.hash_offset <= ids[6] < VOCAB.size  # an unknown word goes to a hash bucket...
    assert Vocabulary(64).encode_text("zyzzyva") == [ids[6]]  # ...the same one in every process
    assert Vocabulary(64).size == VOCAB.hash_offset + 64


# ------------------------------------------------------------------------------------------ the tasks
def test_linear_map_labels_are_a_fixed_affine_map_over_z10() -> None:
    src, examples = samples("linear_map", length=5)
    for ex in examples:
        x = np.array([int(w) for w in words(ex.inputs[:5])])
        assert [int(d) for d in answer_of(ex)] == list((src.scale * x[src.permutation] + src.shift) % 10)
        assert ex.cue[:6].all() and not ex.cue[6:].any()  # the cue is x and <query>
    assert set(src.scale) <= {1, 3, 7, 9}


def test_maze_labels_are_the_shortest_path_and_the_rotation_map_turns_the_grid() -> None:
    _, examples = samples("maze", size=7, min_path_length=4)
    cells = {VOCAB.id(c): i + 1 for i, c in enumerate(("<wall>", "<open>", "<start>", "<goal>", "<path>"))}
    for ex in examples:
        puzzle = np.array([cells[int(t)] for t in ex.inputs]).reshape(7, 7)
        labels = np.array([cells[int(t)] for t in ex.labels]).reshape(7, 7)
        assert np.array_equal(maze_lib.solve(puzzle), labels)
        rotated = ex.inputs[ex.rotation].reshape(7, 7)
        assert np.array_equal(rotated, np.rot90(ex.inputs.reshape(7, 7)))


@pytest.mark.parametrize("size", [4, 6])
def test_sudoku_solutions_are_valid_and_keep_the_givens(size: int) -> None:
    _, examples = samples("sudoku", count=8, size=size, augmentation=Augmentation(1.0, ("permute_digits", "rotate_90")))
    for ex in examples:
        to_digit = lambda t: 0 if VOCAB.name(int(t)) == "<blank>" else int(VOCAB.name(int(t)))  # noqa: E731
        puzzle = np.array([to_digit(t) for t in ex.inputs]).reshape(size, size)
        solution = np.array([to_digit(t) for t in ex.labels]).reshape(size, size)
        assert sudoku_lib.is_valid_solution(solution) and sudoku_lib.is_consistent(puzzle, solution)
        assert (ex.rotation is not None) == (size == 4)  # 6x6 boxes (2x3) are not square: no rotation


def test_arc_examples_are_consistent_tasks_in_context_and_augmentation_keeps_them_so() -> None:
    aug = Augmentation(1.0, ("rotate_90", "flip_h", "color_permute"), per_task=300)
    src, examples = samples("arc", count=30, seq_len=160, augmentation=aug, side=5, demos=2, num_tasks=12)
    side = 5
    for ex in examples:
        blocks = [ex.inputs[b * (side * side + 1): b * (side * side + 1) + side * side] for b in range(6)]
        assert (blocks[5] == ANSWER).all()  # the test output is to be filled
        test_out = ex.labels[5 * (side * side + 1):]
        assert (test_out != IGNORE_LABEL).all() and (ex.labels[: 5 * (side * side + 1)] == IGNORE_LABEL).all()
        assert ex.cue[4 * (side * side + 1): 5 * (side * side + 1) - 1].all()  # the test input addresses memory
    # Augmented copies stay in each task's fixed list of 300.
    assert len(aug.task_augmentations(3, seed=0)) == 300
    assert all(np.array_equal(a[1], b[1]) and a[0] == b[0]
               for a, b in zip(aug.task_augmentations(3, seed=0), aug.task_augmentations(3, seed=0)))


def test_listops_labels_are_the_expression_values() -> None:
    _, examples = samples("listops", max_depth=3, max_args=4)
    for ex in examples:
        expression = words(t for t, c in zip(ex.inputs, ex.cue) if c and t != QUERY)
        assert [str(evaluate(parse(expression, "test")))] == answer_of(ex)


def _run_story(story: str, name: str) -> int:
    """Interpret a generated word problem (its sentences about `name`)."""
    value = 0
    for sentence in story.split(" . "):
        tokens = sentence.replace(" .", "").split()
        number = int("".join(t for t in tokens if t.isdigit()) or 0)
        if len(tokens) < 2 or tokens[0] != name:
            continue  # a distractor about someone else
        verb = tokens[1]
        value = {"has": number, "buys": value + number, "finds": value + number, "gives": value - number,
                 "loses": value - number, "doubles": value * 2, "eats": value - 1}[verb]
    return value


def test_word_problems_answer_their_own_story() -> None:
    _, examples = samples("gsm8k", count=30)
    for ex in examples:
        text = text_of(ex)
        story, question = text.split(" <sep> ")
        name = question.split()[4]  # how many <objects> does <name> have now ? <query>
        assert int("".join(answer_of(ex))) == _run_story(story + " ", name)


def test_multi_hop_answers_follow_the_facts_of_their_own_world() -> None:
    _, examples = samples("hotpotqa", count=30)
    for ex in examples:
        facts, question = text_of(ex).split(" <sep> ")
        located = dict(re.findall(r"(\w+) (?:lives|is) in (\w+)", facts))
        person = question.split()[3]
        hops = 2 if question.startswith("which country") else 3
        place = person
        for _ in range(hops):
            place = located[place]
        assert answer_of(ex) == [place]


def test_passkey_and_recall_answers_are_in_their_context() -> None:
    _, examples = samples("passkey", digits=5)
    for ex in examples:
        assert " ".join(answer_of(ex)) in text_of(ex)
        assert 240 <= len(ex) <= 256  # filled with filler up to (about) the sequence length
    _, examples = samples("associative_recall", pairs=8, queries=3)
    for ex in examples:
        text = text_of(ex)
        context, queries = text.split(" <sep> ")
        pairs = dict(re.findall(r"(\w+) (\d) ,", context))
        asked = queries.split()
        assert [pairs[k] for k in asked] == [VOCAB.name(int(t)) for t in ex.labels if t != IGNORE_LABEL]


def test_passkey_memory_validation_documents_never_appear_in_training_and_come_as_study_documents(
        tmp_path: Path) -> None:
    src = source("passkey_memory", docs=10, digits=3, heldout=0.5)
    rng = np.random.default_rng(0)
    train = [src.sample("train", rng) for _ in range(300)]
    val = [src.sample("val", rng) for _ in range(40)]
    doc_of = lambda ex: re.search(r"doc (\d \d \d) \?", text_of(ex)).group(1)  # noqa: E731
    heldout = {" ".join(f"{src.doc_ids[d]:03d}") for d in range(src.queried, src.docs)}
    assert len(heldout) == 5 and all(ex.study is None for ex in train)
    for ex in train:  # no held-out document id, in a question or in a context, ever reaches training
        assert doc_of(ex) not in heldout and not any(f"doc {d} " in text_of(ex) for d in heldout)
    assert {doc_of(ex) for ex in val} == heldout  # validation asks the held-out documents...
    for ex in val:
        assert "<sep>" not in text_of(ex)  # ...without their document...
        study = ex.study  # ...which comes along for the memory to write: the same question, answer in context
        assert doc_of(study) == doc_of(ex) and answer_of(study) == answer_of(ex)
        assert " ".join(answer_of(ex)) in text_of(study).split(" <sep> ")[0]
    # The cue (the question) sits at the same offset before the answer slots with or without context.
    for ex in train[:20] + val[:5] + [v.study for v in val[:5]]:
        first_answer = int(np.argmax(ex.inputs == ANSWER))
        assert ex.cue[first_answer - 1] and int(ex.cue.sum()) == 12  # "what is the pass key of doc d d d ?" <query>
    # Stored as study_* columns of the validation split only; the other tasks' rows have empty ones.
    data = CogmentData(data_root=str(tmp_path), tasks=["passkey_memory", "listops"], seq_len=64, num_train=16,
                       num_val=8, hash_buckets=64, task_options={"passkey_memory": {"docs": 8}})
    data.prepare_data()
    data.setup()
    val_rows = data.val_dataset.__getitems__(list(range(8)))
    memory_rows = val_rows["task_type"] == TASK_NAMES.index("passkey_memory")
    assert (val_rows["study_labels"][memory_rows] != IGNORE_LABEL).sum(1).tolist() == [4 + 1] * int(memory_rows.sum())
    assert (val_rows["study_inputs"][~memory_rows] == PAD).all() and not val_rows["study_cue"][~memory_rows].any()
    assert not any(k.startswith("study_") for k in data.train_dataset.__getitems__([0]))


# ------------------------------------------------------------------------------------------ real files
def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_gsm8k_hotpotqa_longbench_scrolls_and_listops_files_load(tmp_path: Path) -> None:
    gsm = _write_jsonl(tmp_path / "gsm.jsonl", [{"question": f"Tom has {i} pens. How many?", "answer": f"so #### {i}"}
                                               for i in range(20)])
    hotpot = tmp_path / "hotpot.json"
    hotpot.write_text(json.dumps([{"question": "Where?", "answer": "Paris",
                                   "context": [["France", ["Paris is in France."]], ["X", ["Y."]]]}] * 10), "utf-8")
    hf_hotpot = _write_jsonl(tmp_path / "hotpot.jsonl", [{"question": "Where?", "answer": "Rome", "context": {
        "title": ["Italy"], "sentences": [["Rome is in Italy."]]}}] * 10)
    longbench = _write_jsonl(tmp_path / "lb.jsonl", [{"input": "Who?", "context": "long " * 500 + "Bob did it.",
                                                      "answers": ["Bob"], "length": 500}] * 10)
    scrolls = _write_jsonl(tmp_path / "sc.jsonl", [{"id": "a", "pid": "a", "input": "Who did it?\n\nBob did it.",
                                                    "output": "Bob"}] * 10)
    listops = tmp_path / "lo.tsv"
    listops.write_text("Source\tTarget\n" + "( ( [MAX 2 9 ) ( [MIN 4 7 ] ) ] )\t9\n" * 10 + "[SM 5 7 ]\t2\n", "utf-8")
    for name, path in (("gsm8k", gsm), ("hotpotqa", hotpot), ("hotpotqa", hf_hotpot), ("longbench", longbench),
                       ("scrolls", scrolls), ("listops", listops)):
        src = source(name, seq_len=128, path=str(path))
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            ex = src.sample(split, rng)
            assert len(ex) <= 128 and answer_of(ex)
    assert answer_of(source("gsm8k", path=str(gsm)).sample("val", np.random.default_rng(1)))[0].isdigit()
    long_example = source("longbench", seq_len=128, path=str(longbench)).sample("train", np.random.default_rng(0))
    assert text_of(long_example).endswith("bob " + VOCAB.name(VOCAB.word("did")) + " it . <sep> who ? <query>")  # the end stayed


@pytest.mark.parametrize(("name", "content", "message"), [
    ("gsm8k", '{"question": "q", "answer": "a"}\n', "no '#### <number>' line"),
    ("gsm8k", '{"question": "q", "answer": "#### 1"}\n{"question": \n', ":2: not a JSON object"),
    ("hotpotqa", '{"question": "q", "answer": "a", "context": "flat"}\n', ":1: 'context' must be"),
    ("longbench", '{"input": "q", "answers": ["a"]}\n', "no str field 'context'"),
    ("listops", "Source\tTarget\n[MAX 2 3\t3\n", ":2: the expression ends inside a list"),
    ("listops", "Source\tTarget\n[MAX 2 3 ]\t2\n", ":2: the expression evaluates to 3"),
    ("listops", "expression,value\n", ":1: expected the LRA header"),
])
def test_bad_benchmark_files_are_config_errors_naming_the_file_and_line(tmp_path: Path, name: str, content: str,
                                                                        message: str) -> None:
    path = tmp_path / "bad.file"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        source(name, seq_len=128, path=str(path))
    assert str(path) in str(info.value) and message in str(info.value)


def test_missing_files_and_unknown_tasks_or_options_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.gsm8k_path=.*no such file"):
        CogmentData(data_root=str(tmp_path), tasks=["gsm8k"], gsm8k_path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match="unknown task 'sudokuu'"):
        CogmentData(data_root=str(tmp_path), tasks=["sudokuu"])
    with pytest.raises(ConfigError, match=r"data.task_options.maze: unknown option\(s\) \['sise'\]"):
        CogmentData(data_root=str(tmp_path), tasks=["maze"], task_options={"maze": {"sise": 5}})
    with pytest.raises(ConfigError, match="set data.longbench_path"):
        CogmentData(data_root=str(tmp_path), tasks=["longbench"])
    with pytest.raises(ConfigError, match="data.seq_len=4096 exceeds data.max_seq_len=2048"):
        CogmentData(data_root=str(tmp_path), tasks=["passkey"], seq_len=4096)
    with pytest.raises(ConfigError, match="need .* tokens but data.seq_len is 16"):
        CogmentData(data_root=str(tmp_path), tasks=["maze"], seq_len=16, task_options={"maze": {"size": 7}})


def test_real_arc_files_become_in_context_tasks_on_the_canvas() -> None:
    if not ARC_DIR.is_dir():
        pytest.fail(f"{ARC_DIR} is missing: this test reads the shared ARC files (they are on CI)")
    src = source("arc", seq_len=3700, side=30, demos=1, arc_dir=str(ARC_DIR), max_tasks=20,
                 train_subsets=["training"], eval_subset="evaluation")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        ex = src.sample(split, rng)
        assert (ex.labels != IGNORE_LABEL).sum() == 900 and len(ex) == 4 * 900 + 3
    small = source("arc", seq_len=256, side=6, arc_dir=str(ARC_DIR), max_tasks=20)
    assert sum(small.skipped.values()) > 0  # tasks with grids larger than 6x6 are left out, and counted


# ------------------------------------------------------------------------------------------ the module
def _stage_data(curriculum: str, experiment: str) -> list:
    base = OmegaConf.load(CONF_DIR / "data" / "cogment" / "curriculum.yaml")
    overrides = OmegaConf.load(CONF_DIR / "experiment" / f"{experiment}.yaml").get("data") or {}
    base = OmegaConf.merge(base, overrides)
    stages = OmegaConf.load(CONF_DIR / "curriculum" / f"{curriculum}.yaml").stages
    return [OmegaConf.merge(base, s.get("data") or {}) for s in stages]


@pytest.mark.parametrize(("curriculum", "experiment"), [("cogment", "cogment"), ("cogment_tiny", "cogment_tiny")])
def test_every_stage_speaks_the_vocabulary_the_model_is_built_with(tmp_path: Path, curriculum: str, experiment: str) -> None:
    facts = []
    for node in _stage_data(curriculum, experiment):
        kwargs = {k: v for k, v in OmegaConf.to_container(node).items() if k not in ("_target_", "data_root", "seed")}
        facts.append(CogmentData(data_root=str(tmp_path), seed=0, **kwargs).model_kwargs())
    assert all(f == facts[0] for f in facts)
    assert facts[0]["num_task_types"] == len(TASK_NAMES)


def test_the_data_module_builds_once_and_serves_launcher_dtypes(tmp_path: Path) -> None:
    make = lambda: CogmentData(data_root=str(tmp_path), tasks=["linear_map", "listops"], seq_len=64,  # noqa: E731
                               num_train=40, num_val=10, hash_buckets=32)
    data = make()
    data.prepare_data()
    stamp = (data.root / "train.pt").stat().st_mtime_ns
    again = make()
    again.prepare_data()
    again.setup()
    assert again.root == data.root and (data.root / "train.pt").stat().st_mtime_ns == stamp
    batch = again.collate_fn(again.train_dataset.__getitems__([0, 1, 2]))
    assert {k: str(v.dtype) for k, v in batch.items()} == {"inputs": "torch.int64", "labels": "torch.int64",
                                                           "cue": "torch.bool", "rotation": "torch.int64",
                                                           "task_type": "torch.int64"}
    assert len(again.train_dataset) == 40 and len(again.val_dataset) == 10
    other = CogmentData(data_root=str(tmp_path), tasks=["linear_map", "listops"], seq_len=64, num_train=40, num_val=10,
                        hash_buckets=32, task_weights={"listops": 3.0})
    assert other.root != data.root  # another mix, another directory


def test_the_python_view_of_the_curriculum_gives_each_stage_its_data_settings() -> None:
    curriculum = FourStageCurriculum()
    table = [(16, 128, 2, 0.0), (8, 256, 4, 0.0), (6, 512, 8, 0.05), (4, 1024, 8, 0.1), (2, 2048, 6, 0.15)]
    for stage, (batch, seq, refine, rate) in zip(CurriculumStage, table):
        config = curriculum.get_stage_config(stage)
        assert (config.batch_size, config.sequence_length, config.refinement_steps, config.memory_write_rate) == \
            (batch, seq, refine, rate)
    arc = curriculum.get_stage_config("arc_visual")
    assert arc.augmentation_rate == 0.8 and "rotate_90" in arc.augmentation_types and arc.max_steps == 4000
    assert curriculum.get_stage_config(0).grokfast == "none"
    assert curriculum.get_stage_config(3).grokfast["components"]["memory"] == {"alpha": 0.95, "lamb": 0.9}
    with pytest.raises(ConfigError, match="stages 0..4"):
        curriculum.get_stage_config(7)
