"""Scoring for vtw_tiny_mme_choice.

lmms-eval 0.7.3 turns every loglikelihood response into its string form
(``api.instance.unwrap_generation_output``), which breaks the built-in multiple-choice scoring
for all models; this reads the ``(log_likelihood, is_greedy)`` pairs back.
"""

from vtw_eval.results import loglikelihood_pairs

CHOICES = ["Yes", "No"]


def choice_process_results(doc, results):
    log_likelihoods = [value for value, _ in loglikelihood_pairs(results)]
    best = max(range(len(CHOICES)), key=log_likelihoods.__getitem__)
    return {"acc": float(CHOICES[best] == doc["answer"])}
