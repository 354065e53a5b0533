"""An offline profanity oracle on `alt-profanity-check`, a second judge independent of the Jigsaw BiLSTM.

`alt-profanity-check` is a calibrated linear SVM on TF-IDF word features: a different model family and tokenisation
than `JigsawOracle`'s BiLSTM, so evaluating with it catches a policy that learned to fool the training oracle (for
example through its 20,000-word vocabulary) rather than to stop being toxic. Its training data overlaps Jigsaw's, so
the two judges are not fully independent.
"""

from .base import ToxicityOracle


class ProfanityCheckOracle(ToxicityOracle):
    """Toxicity oracle returning the profanity probability of `alt-profanity-check` (`profanity_check.predict_prob`).

    The package loads its scikit-learn model when imported (about a second), so it is imported when the oracle is
    built rather than with this module.

    Example:

    ```python
    >>> from trl_cadet.oracles.profanity import ProfanityCheckOracle

    >>> oracle = ProfanityCheckOracle()
    >>> oracle(prompts=["Say something"], completions=["Have a nice day"])  # doctest: +SKIP
    [0.99...]
    ```
    """

    def __init__(self):
        try:
            from profanity_check import predict_prob
        except ImportError as error:
            raise ImportError(
                "ProfanityCheckOracle needs the `alt-profanity-check` package, which is not installed. Install it with "
                "`pip install alt-profanity-check`."
            ) from error
        self._predict_prob = predict_prob

    def toxicity(self, texts: list[str]) -> list[float]:
        if not texts:  # the vectorizer rejects an empty batch
            return []
        return [float(p) for p in self._predict_prob(list(texts))]
