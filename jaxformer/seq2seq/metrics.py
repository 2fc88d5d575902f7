"""Text metrics of generated outputs: corpus BLEU (sacrebleu) and ROUGE-1/2/L (rouge-score).

Both are the libraries' own numbers on detokenized text: BLEU with sacrebleu's defaults (13a
tokenization, exponential smoothing; its signature is reported with the score), ROUGE as the mean
F-measure over examples (Porter stemming on, as the ROUGE-1.5.5 -m flag). Scores are in [0, 100].
"""

from __future__ import annotations

from typing import Mapping, Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> dict:
    """Corpus BLEU: {"bleu", "bleu_signature", "bleu_bp", "bleu_precisions"}.

    `references` is one reference per hypothesis, or several such streams (sacrebleu's layout).
    """
    from sacrebleu.metrics import BLEU

    streams = [list(r) for r in references] if references and not isinstance(references[0], str) else [references]
    for stream in streams:
        _check(hypotheses, stream)
    metric = BLEU()
    res = metric.corpus_score(list(hypotheses), [list(s) for s in streams])
    return {"bleu": float(res.score), "bleu_signature": str(metric.get_signature()), "bleu_bp": float(res.bp),
            "bleu_precisions": [float(p) for p in res.precisions]}


def rouge(hypotheses: Sequence[str], references: Sequence[str], *, stemmer: bool = True) -> dict:
    """Mean ROUGE-1/2/L F-measure x 100: {"rouge1", "rouge2", "rougeL"}."""
    from rouge_score import rouge_scorer

    _check(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hypotheses, references):
        scores = scorer.score(ref, hyp)  # (target, prediction)
        for t in ROUGE_TYPES:
            totals[t] += scores[t].fmeasure
    return {t: 100.0 * v / len(hypotheses) for t, v in totals.items()}


def text_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """BLEU and ROUGE together."""
    return {**bleu(hypotheses, references), **rouge(hypotheses, references)}


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"need as many hypotheses as references, and at least one; got {len(hypotheses)} and "
                         f"{len(references)}")


def format_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] = ("bleu", *ROUGE_TYPES)) -> str:
    """A plain-text table: one row per system, one column per metric (missing values blank)."""
    name_w = max(len("system"), *(len(r) for r in rows))
    head = f"{'system':<{name_w}}  " + "  ".join(f"{c:>8}" for c in columns)
    lines = [head, "-" * len(head)]
    for name, vals in rows.items():
        cells = [f"{vals[c]:8.2f}" if isinstance(vals.get(c), (int, float)) else " " * 8 for c in columns]
        lines.append(f"{name:<{name_w}}  " + "  ".join(cells))
    return "\n".join(lines)
