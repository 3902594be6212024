"""Next-token accuracy, as an offline ``evaluate`` module.

    metric = evaluate.load("examples/metrics/token_accuracy")
    metric.compute(predictions=[3, 5, 7], references=[3, 4, 7])  # {'accuracy': 0.666...}

Positions whose reference is -100 (padding / ignored labels) are skipped.
"""

import datasets
import evaluate

_DESCRIPTION = "Fraction of positions where the predicted next token equals the reference."


class TokenAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description="predictions, references: flat sequences of token ids",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        kept = [(p, r) for p, r in zip(predictions, references) if r != -100]
        correct = sum(p == r for p, r in kept)
        return {"accuracy": correct / len(kept) if kept else 0.0}
