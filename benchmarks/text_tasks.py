"""Offline text-classification tasks for the second quality suite (:mod:`benchmarks.minilm_suite`).

Eight procedurally generated tasks, each a different property of a short
English sentence (lower case, at most ~20 word pieces):

========== ======= ==============================================================
task       classes what decides the label
========== ======= ==============================================================
sentiment  2       polarity after negation ("was not good") and contrast ("X but Y": Y counts)
topic      6       topic of the *first* of two topic words ("about jazz , not rugby")
agent      4       which animal does the action, active or passive ("the owl was chased by the fox")
tense      3       tense of the main verb; a subordinate clause has a random other tense
number     2       grammatical number of the subject; a distractor noun has the other one
count      5       how many items are listed (1-5)
taller     4       which of four people is the taller/bigger one ("anna is shorter than ben")
compare    2       whether the first or the second number word is larger ("seven cats and three dogs")
========== ======= ==============================================================

The words alone (a bag of words, as mean pooling mostly sees) leave most
labels ambiguous: the same words appear in every class with only order,
scope or agreement deciding. That keeps a linear probe on the frozen
pre-trained encoder well below a fine-tuned one.

Determinism: :func:`task_data` draws every task from
``numpy.random.default_rng([seed, crc32(task name)])``; the same seed gives
the same sentences. Each class's sentences are drawn without repetition and
dealt into train / validation / test, so no sentence is in two splits (nor in
two classes), and every split holds each class equally (up to one sentence).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from benchmarks.minilm import pad_batch

# ----------------------------------------------------------------------------- word lists

NAMES = ("anna", "ben", "carl", "dora", "emma", "frank", "grace", "henry", "iris", "jack", "kate", "leo",
         "mia", "nick", "olga", "paul")

# sentiment
REVIEWED = ("movie", "film", "book", "meal", "hotel", "concert", "game", "show", "song", "trip", "service",
            "room", "story", "class", "phone", "car", "album", "dinner", "museum", "play")
POSITIVE = ("great", "good", "wonderful", "excellent", "pleasant", "lovely", "fantastic", "amazing",
            "delightful", "superb", "enjoyable", "brilliant")
NEGATIVE = ("bad", "awful", "terrible", "boring", "poor", "dull", "horrible", "disappointing", "weak",
            "mediocre", "annoying", "dreadful")
ADVERBS = ("", "really", "quite", "very", "truly", "rather", "pretty", "so")

# topic
TOPICS: Mapping[str, tuple[str, ...]] = {
    "sports": ("football", "tennis", "soccer", "hockey", "golf", "baseball", "rugby", "cricket"),
    "food": ("pizza", "pasta", "bread", "cheese", "soup", "salad", "rice", "cake"),
    "science": ("physics", "chemistry", "biology", "atoms", "genes", "planets", "cells", "molecules"),
    "music": ("guitar", "piano", "jazz", "violin", "drums", "opera", "songs", "concerts"),
    "travel": ("flights", "hotels", "beaches", "islands", "trains", "museums", "airports", "passports"),
    "weather": ("rain", "snow", "storms", "clouds", "wind", "thunder", "fog", "sunshine"),
}
TOPIC_TEMPLATES = (
    "{name} wrote about {a} , not {b}",
    "{name} talked about {a} instead of {b}",
    "the article is about {a} and only mentions {b}",
    "{name} prefers {a} to {b}",
    "this blog covers {a} rather than {b}",
    "a podcast on {a} with a short note on {b}",
    "{name} asked about {a} before {b}",
    "the lecture was on {a} , with {b} as an aside",
)

# agent
AGENTS = ("cat", "dog", "fox", "owl")
AGENT_VERBS = ("chased", "bit", "followed", "scared", "pushed", "watched", "kicked", "found", "woke", "helped")
AGENT_TEMPLATES = ("the {a} {v} the {p}", "the {p} was {v} by the {a}", "it was the {a} that {v} the {p}",
                   "the {p} got {v} by the {a}")

# tense
VERBS = {  # base, past, 3rd person present, -ing
    "open": ("opened", "opens", "opening"), "close": ("closed", "closes", "closing"),
    "paint": ("painted", "paints", "painting"), "clean": ("cleaned", "cleans", "cleaning"),
    "fix": ("fixed", "fixes", "fixing"), "move": ("moved", "moves", "moving"),
    "wash": ("washed", "washes", "washing"), "check": ("checked", "checks", "checking"),
    "carry": ("carried", "carries", "carrying"), "watch": ("watched", "watches", "watching"),
    "visit": ("visited", "visits", "visiting"), "cook": ("cooked", "cooks", "cooking"),
}
OBJECTS = ("door", "window", "car", "kitchen", "fence", "table", "boat", "garden", "box", "bike", "house",
           "room", "chair", "letter", "shop", "dog")

# number
SING_PLUR = (("dog", "dogs"), ("cat", "cats"), ("child", "children"), ("student", "students"),
             ("teacher", "teachers"), ("bird", "birds"), ("man", "men"), ("woman", "women"),
             ("horse", "horses"), ("player", "players"), ("farmer", "farmers"), ("mouse", "mice"),
             ("doctor", "doctors"), ("girl", "girls"), ("boy", "boys"), ("friend", "friends"))
PREPS = ("near", "behind", "with", "beside", "next to", "like", "above", "without")
PAST_PREDICATES = ("slept", "ran away", "waited", "looked tired", "stayed home", "laughed", "left early",
                   "jumped", "sang", "felt happy", "got lost", "smiled")

# count
ITEMS = ("apples", "pears", "plums", "grapes", "lemons", "onions", "carrots", "eggs", "nuts", "beans",
         "peaches", "melons", "cherries", "potatoes", "tomatoes", "olives", "figs", "peppers", "mangoes", "dates")
COUNT_PREFIX = ("{name} bought", "{name} ate", "we need", "the basket holds", "{name} sold", "they picked",
                "{name} wants", "the list says")

# taller
TALL_NAMES = ("anna", "ben", "carl", "dora")
BIGGER = ("taller", "bigger", "larger", "heavier")
SMALLER = ("shorter", "smaller", "tinier", "lighter")
TALL_TEMPLATES = ("{a} is {c} than {b}", "{a} is much {c} than {b}", "{a} looks {c} than {b}",
                  "{a} is a bit {c} than {b}")
CONTEXTS = ("", "in the photo", "at school", "last year", "today", "now", "in the end", "as a child",
            "by far", "these days", "on the team", "in the family")

# compare
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve")
ANIMALS = ("cats", "dogs", "birds", "cows", "sheep", "goats", "ducks", "pigs", "horses", "rabbits")
COMPARE_TEMPLATES = ("there are {n1} {x} and {n2} {y}", "{name} has {n1} {x} and {n2} {y}",
                     "the farm keeps {n1} {x} and {n2} {y}", "we saw {n1} {x} and {n2} {y}",
                     "{n1} {x} and {n2} {y} live here")


# ----------------------------------------------------------------------------- generators
# gen(rng, label) -> sentence; deterministic given rng's state.


def _pick(rng: np.random.Generator, seq: Sequence[str]) -> str:
    return seq[int(rng.integers(len(seq)))]


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _sentiment(rng: np.random.Generator, label: int) -> str:
    def clause(pol: int) -> str:
        negate = bool(rng.integers(2))
        adj = _pick(rng, POSITIVE if pol != negate else NEGATIVE)
        neg = _pick(rng, ("not", "never")) if negate else ""
        return _join("the", _pick(rng, REVIEWED), "was", neg, _pick(rng, ADVERBS), adj)

    if rng.random() < 0.5:
        return clause(label)
    return _join(clause(1 - label), _pick(rng, ("but", "but then", "however")), clause(label))


TOPIC_NAMES = tuple(TOPICS)


def _topic(rng: np.random.Generator, label: int) -> str:
    other = _pick(rng, [t for t in TOPIC_NAMES if t != TOPIC_NAMES[label]])
    return _pick(rng, TOPIC_TEMPLATES).format(
        name=_pick(rng, NAMES), a=_pick(rng, TOPICS[TOPIC_NAMES[label]]), b=_pick(rng, TOPICS[other]))


def _agent(rng: np.random.Generator, label: int) -> str:
    # Who did it: the same words in active and passive voice ("the fox chased the owl" /
    # "the owl was chased by the fox" / "the fox was chased by the owl" has the owl as agent).
    agent = AGENTS[label]
    patient = _pick(rng, [a for a in AGENTS if a != agent])
    verb = _pick(rng, AGENT_VERBS)
    s = _pick(rng, AGENT_TEMPLATES).format(a=agent, p=patient, v=verb)
    ctx = _pick(rng, CONTEXTS)
    return _join(ctx, s) if rng.random() < 0.5 else _join(s, ctx)


def _verb_phrase(rng: np.random.Generator, tense: int, subject: str) -> str:
    base = _pick(rng, list(VERBS))
    past, third, ing = VERBS[base]
    plural = subject in ("they", "we")
    if rng.random() < 0.5:  # simple
        v = (past, base if plural else third, f"will {base}")[tense]
    else:  # progressive
        be = (("were" if plural else "was"), ("are" if plural else "is"), "will be")[tense]
        v = f"{be} {ing}"
    return f"{subject} {v} the {_pick(rng, OBJECTS)}"


def _tense(rng: np.random.Generator, label: int) -> str:
    sub_tense = _pick(rng, [t for t in range(3) if t != label])
    subj = (_pick(rng, NAMES + ("they", "we")), _pick(rng, NAMES + ("they", "we")))
    main = _verb_phrase(rng, label, subj[0])
    sub = _verb_phrase(rng, int(sub_tense), subj[1])
    conj = _pick(rng, ("because", "while", "although", "so", "and"))
    return _join(main, conj, sub) if rng.random() < 0.5 else _join(conj, sub, ",", main)


def _number(rng: np.random.Generator, label: int) -> str:
    # Only "the" (no number-marked determiner), a past-tense predicate (no agreement), a distractor noun
    # of the other number in 90% of sentences, and the subject first or second.
    other = 1 - label if rng.random() < 0.9 else label
    head, distractor = _pick(rng, SING_PLUR)[label], _pick(rng, SING_PLUR)[other]
    prep, pred = _pick(rng, PREPS), _pick(rng, PAST_PREDICATES)
    if rng.random() < 0.5:
        return f"the {head} {prep} the {distractor} {pred}"
    return f"{prep} the {distractor} the {head} {pred}"


def _count(rng: np.random.Generator, label: int) -> str:
    k = label + 1
    items = [ITEMS[i] for i in rng.choice(len(ITEMS), size=k, replace=False)]
    if k == 1:
        listed = items[0]
    elif rng.random() < 0.5:
        listed = " , ".join(items[:-1]) + " and " + items[-1]
    else:
        listed = " and ".join(items)
    return _pick(rng, COUNT_PREFIX).format(name=_pick(rng, NAMES)) + " " + listed


def _taller(rng: np.random.Generator, label: int) -> str:
    big = TALL_NAMES[label]
    small = _pick(rng, [n for n in TALL_NAMES if n != big])
    if rng.random() < 0.5:
        a, b, c = big, small, _pick(rng, BIGGER)
    else:
        a, b, c = small, big, _pick(rng, SMALLER)
    s = _pick(rng, TALL_TEMPLATES).format(a=a, b=b, c=c)
    ctx = _pick(rng, CONTEXTS)
    return _join(ctx, s) if rng.random() < 0.5 else _join(s, ctx)


def _compare(rng: np.random.Generator, label: int) -> str:
    i, j = (int(v) for v in rng.choice(len(NUMBER_WORDS), size=2, replace=False))
    lo, hi = min(i, j), max(i, j)
    n1, n2 = (hi, lo) if label == 0 else (lo, hi)
    x, y = (ANIMALS[int(v)] for v in rng.choice(len(ANIMALS), size=2, replace=False))
    return _pick(rng, COMPARE_TEMPLATES).format(
        name=_pick(rng, NAMES), n1=NUMBER_WORDS[n1], n2=NUMBER_WORDS[n2], x=x, y=y)


@dataclasses.dataclass(frozen=True)
class TextTask:
    name: str
    classes: tuple[str, ...]
    gen: Callable[[np.random.Generator, int], str]
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


TASKS: tuple[TextTask, ...] = (
    TextTask("sentiment", ("negative", "positive"), _sentiment,
             "review polarity after negation and contrast ('X but Y': Y decides)"),
    TextTask("topic", TOPIC_NAMES, _topic, "topic of the first of two topic words"),
    TextTask("agent", AGENTS, _agent, "which of four animals does the action, in active or passive voice"),
    TextTask("tense", ("past", "present", "future"), _tense,
             "tense of the main clause; the subordinate clause has another tense"),
    TextTask("number", ("singular", "plural"), _number,
             "number of the subject noun; a distractor noun of the other number, past-tense verb"),
    TextTask("count", ("1", "2", "3", "4", "5"), _count, "how many items are listed"),
    TextTask("taller", TALL_NAMES, _taller, "which of four people is the taller / bigger one"),
    TextTask("compare", ("first", "second"), _compare, "whether the first or the second number word is larger"),
)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
MAX_CLASSES: int = max(t.num_classes for t in TASKS)
SPLITS: tuple[str, ...] = ("train", "val", "test")


# ----------------------------------------------------------------------------- splits


class TextSplit(NamedTuple):
    texts: list[list[str]]  # per task
    y: np.ndarray  # (T, N) int32


def task_rng(seed: int, task: TextTask) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(task.name.encode())])


def _quota(n: int, classes: int) -> list[int]:
    return [n // classes + (c < n % classes) for c in range(classes)]


def deal(drawn_per_class: Sequence[Sequence[str]], quotas: Mapping[str, Sequence[int]], rng: np.random.Generator
         ) -> dict[str, tuple[list[str], np.ndarray]]:
    """``{split: (texts, labels)}``: class ``c``'s ``drawn_per_class[c]`` dealt in order to the splits (in
    ``quotas``' order, ``quotas[split][c]`` each), then each split shuffled with ``rng`` (in the same order)."""
    out: dict[str, tuple[list[str], list[int]]] = {s: ([], []) for s in quotas}
    for c, drawn in enumerate(drawn_per_class):
        i = 0
        for split, q in quotas.items():
            k = q[c]
            out[split][0].extend(drawn[i: i + k])
            out[split][1].extend([c] * k)
            i += k
    result = {}
    for split, (texts, labels) in out.items():
        perm = rng.permutation(len(texts))
        result[split] = ([texts[i] for i in perm], np.asarray(labels, np.int32)[perm])
    return result


def generate(task: TextTask, seed: int, sizes: Mapping[str, int], max_tries: int = 200) -> dict[str, tuple[list[str], np.ndarray]]:
    """``{split: (sentences, labels)}`` for one task; splits share no sentence.

    Each class draws distinct sentences until it has its share of every
    split (``ValueError`` if the generator cannot produce that many: more
    than ``max_tries`` draws per needed sentence), shuffles them and deals
    them out, so the splits follow one distribution; each split is shuffled.
    """
    rng = task_rng(seed, task)
    quotas = {s: _quota(n, task.num_classes) for s, n in sizes.items()}
    seen: set[str] = set()
    per_class: list[list[str]] = []
    for c in range(task.num_classes):
        need = sum(q[c] for q in quotas.values())
        drawn: list[str] = []
        tries = 0
        while len(drawn) < need:
            s = task.gen(rng, c)
            tries += 1
            if tries > max_tries * max(need, 1):
                raise ValueError(f"task {task.name!r}, class {c}: only {len(drawn)} distinct sentences of {need}")
            if s not in seen:
                seen.add(s)
                drawn.append(s)
        # Deal in a random order: later draws come more often from the templates with more distinct
        # sentences (the small ones run out), so dealing in drawing order would shift test from train.
        per_class.append([drawn[i] for i in rng.permutation(len(drawn))])
    return deal(per_class, quotas, rng)


def task_data(seed: int, sizes: Mapping[str, int], tasks: Sequence[TextTask] = TASKS) -> dict[str, TextSplit]:
    """``{split: TextSplit}`` with every task; ``sizes`` maps split name to sentences per task."""
    per_task = [generate(t, seed, sizes) for t in tasks]
    return {s: TextSplit([p[s][0] for p in per_task], np.stack([p[s][1] for p in per_task])) for s in sizes}


# ----------------------------------------------------------------------------- a tiny tokenizer (CI)


class WordTokenizer:
    """Whitespace tokenizer over a fixed word list: ``[PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3``, then the words.

    Same call signature as :func:`benchmarks.minilm.make_tokenizer`'s
    function: ``fn(texts, pad_to=None) -> (ids, mask)`` int32. Used with a
    randomly initialised :class:`benchmarks.minilm.MiniLM` in the CI test,
    where the real checkpoint and its WordPiece vocabulary are not installed.
    """

    SPECIAL = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")
    backend = "words"

    def __init__(self, words: Sequence[str]):
        self.vocab = {w: i for i, w in enumerate(self.SPECIAL + tuple(sorted(set(words) - set(self.SPECIAL))))}

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> WordTokenizer:
        return cls([w for t in texts for w in t.split()])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __call__(self, texts: Sequence[str], pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        return pad_batch([[1] + [self.vocab.get(w, 3) for w in t.split()] + [2] for t in texts], pad_to)
