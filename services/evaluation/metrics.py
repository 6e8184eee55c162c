"""What an evaluation reports, as pure functions of answers and references, each with a 95% interval.

BLEU is sacreBLEU's corpus BLEU (0-100, its default 13a tokenisation, with effective order: a corpus of
answers shorter than four words has no 4-grams, and plain BLEU would give even perfect ones 0), ROUGE-L the F-measure of Google's
rouge-score package, best over an item's references, and POPE the yes/no accuracy, precision, recall, F1
and yes-ratio of object-existence questions (Li et al., 2023): a model that hallucinates objects answers
"yes" too often, which the yes-ratio shows and accuracy alone hides.
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections.abc import Callable

from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 500


def wilson_interval(successes: float, n: int) -> list[float]:
    """The 95% Wilson score interval of a proportion (successes may count ties as halves)."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def mean_interval(values: list[float], low: float = 0.0, high: float = 1.0) -> tuple[float, list[float]]:
    """The mean and its normal 95% interval, kept within [low, high] (where the values can lie)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = Z95 * sd / math.sqrt(n)
    return mean, [max(low, mean - half), min(high, mean + half)]


def _reference_streams(references: list[list[str]]) -> list[list[str]]:
    """sacreBLEU's layout: stream k holds every item's k-th reference. Items with fewer references repeat
    their first: BLEU clips each n-gram count by its most frequent reference, and picks the reference
    length closest to the answer's, so a repeated reference changes neither."""
    if not references or any(not refs for refs in references):
        raise ValueError("every item needs at least one reference")
    most = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else refs[0] for refs in references] for k in range(most)]


def bleu_score(answers: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU of answers against their references (0-100)."""
    return BLEU(effective_order=True).corpus_score(answers, _reference_streams(references)).score


def bleu(answers: list[str], references: list[list[str]], seed: int = 0) -> tuple[float, list[float]]:
    """Corpus BLEU of answers against their references (0-100), and a 95% bootstrap interval over items."""
    streams = _reference_streams(references)
    metric = BLEU(effective_order=True)
    return bootstrap(lambda picks: metric.corpus_score([answers[i] for i in picks],
                                                       [[stream[i] for i in picks] for stream in streams]).score,
                     len(answers), seed)


def bootstrap(figure: Callable[[list[int]], float], n: int, seed: int = 0) -> tuple[float, list[float]]:
    """figure(items), a figure computed on the items at the given indices (repeats allowed), on all n items,
    and its 95% percentile bootstrap interval over items. For a paired comparison, let the figure be one
    version's minus another's on the same items: both are then resampled alike, and what the items share
    (one simply harder than another) cancels out of the interval."""
    rng = random.Random(seed)
    resampled = sorted(figure([rng.randrange(n) for _ in range(n)]) for _ in range(BOOTSTRAP_RESAMPLES))
    return figure(list(range(n))), [resampled[int(0.025 * len(resampled))], resampled[int(0.975 * len(resampled)) - 1]]


@functools.cache
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    # Built on first use: building one logs through absl, which configures the root logger of whatever
    # process imports this module before that process configures its own logging.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l_scores(answers: list[str], references: list[list[str]]) -> list[float]:
    """Each answer's ROUGE-L F-measure (0-1) against its best reference."""
    if any(not refs for refs in references):
        raise ValueError("every item needs at least one reference")
    scorer = _rouge_scorer()
    return [max(scorer.score(ref, answer)["rougeL"].fmeasure for ref in refs) for answer, refs in zip(answers, references)]


def rouge_l(answers: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    """Mean ROUGE-L F-measure (0-1), each answer scored against its best reference, with its interval."""
    return mean_interval(rouge_l_scores(answers, references))


def _normalised(text: str) -> str:
    """Lower case, punctuation and extra spaces gone: "The circle is red." and "the circle is red" match."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def exact_matches(answers: list[str], references: list[list[str]]) -> list[bool]:
    """Whether each answer equals one of its references once normalised (case, punctuation, spacing)."""
    return [_normalised(answer) in {_normalised(ref) for ref in refs} for answer, refs in zip(answers, references)]


def exact_match(answers: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    """Share of answers equal to one of their references once normalised, with its Wilson interval."""
    matched = sum(exact_matches(answers, references))
    return matched / len(answers), wilson_interval(matched, len(answers))


def yes_or_no(answer: str) -> bool | None:
    """Whichever of yes (True) and no (False) the answer says first ("Sure! Yes, there is ..." is a yes);
    None when it says neither."""
    word = next((w for w in re.findall(r"[a-z]+", answer.lower()) if w in ("yes", "no")), None)
    return None if word is None else word == "yes"


def pope(answers: list[str], labels: list[bool]) -> dict[str, float | list[float]]:
    """POPE's figures over yes/no questions whose true answer is labels[i]; an answer that is neither yes
    nor no counts as wrong (and as not "yes")."""
    said = [yes_or_no(answer) for answer in answers]
    true_yes = sum(s is True and label for s, label in zip(said, labels))
    said_yes = sum(s is True for s in said)
    correct = sum(s is not None and s == label for s, label in zip(said, labels))
    precision = true_yes / said_yes if said_yes else 0.0
    recall = true_yes / sum(labels) if any(labels) else 0.0
    return {
        "accuracy": correct / len(labels), "accuracy_ci": wilson_interval(correct, len(labels)),
        "precision": precision, "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": said_yes / len(labels), "unanswered": sum(s is None for s in said), "questions": len(labels),
    }
