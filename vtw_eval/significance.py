"""Is a candidate's difference from the baseline more than noise? Paired tests over the docs both
runs answered, read from their ``--log_samples`` files (vtw-diff's ``--significance``).

- A metric whose aggregate is the mean of per-doc numbers: McNemar's exact test when every score
  is 0 or 1, else a paired t-test; the interval is the paired t interval of the mean difference.
- Any other aggregate (POPE's F1, MME, CIDEr, ...): a paired bootstrap over docs that recomputes
  the aggregate with the task's own function from lmms-eval on the same resampled docs for both
  runs. Where docs form clusters (the task's ``cluster_key``, or a ``question_id`` shared by several
  docs, as MME's two questions per image), whole clusters are resampled.

Every comparison also gives each run's own interval and the smallest difference the docs could show
at 80% power (Miller, arXiv 2411.00640: paired differences, clustered errors, power).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from vtw_eval.results import Run, read_samples, samples_file

POWER = 0.8
# Fields by which lmms-eval's aggregation functions group per-doc results (MME's question_id,
# COCO's image_id, MMBench's index): a doc drawn twice in one resample must count as two items.
ITEM_ID_FIELDS = ("question_id", "image_id", "index", "id")


class Mean:
    """lmms-eval's registered ``mean`` aggregation: resampled with array sums, not a Python call."""

    def __repr__(self) -> str:
        return "mean"


MEAN = Mean()
Aggregate = Callable[[list], float] | Mean


@dataclass
class PairedDifference:
    """Candidate minus baseline on the docs both runs answered, in the metric's own units."""

    test: str  # "McNemar exact", "paired t", "bootstrap" or "cluster bootstrap (N clusters)"
    difference: float
    interval: tuple[float, float]  # of the difference, 1 - alpha
    p_value: float
    detectable: float  # smallest |difference| the test finds at 80% power and this alpha
    docs: int
    base_interval: tuple[float, float]  # each run's own score interval, for plots
    candidate_interval: tuple[float, float]


def mcnemar_p(worse: int, better: int) -> float:
    """Two-sided exact McNemar test: the discordant pairs are Binomial(worse + better, 1/2)."""
    n = worse + better
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(worse, better) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integers, one rounding


def mean_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    n, mean = len(values), float(values.mean())
    if n < 2:
        return (mean, mean)
    half = float(stats.t.ppf(1 - alpha / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))
    return (mean - half, mean + half)


def detectable_difference(standard_error: float, alpha: float) -> float:
    """The |difference| a two-sided test at ``alpha`` finds with 80% power, for this standard error."""
    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(POWER)) * standard_error)


def paired_mean_test(base: np.ndarray, candidate: np.ndarray, alpha: float) -> PairedDifference:
    """Per-doc scores whose aggregate is their mean: McNemar exact for 0/1 scores, else paired t."""
    differences = candidate - base
    n = len(differences)
    mean = float(differences.mean())
    sd = float(differences.std(ddof=1)) if n > 1 else 0.0
    binary = bool(np.isin(base, (0, 1)).all() and np.isin(candidate, (0, 1)).all())
    if binary:
        test = "McNemar exact"
        p_value = mcnemar_p(int(((base == 1) & (candidate == 0)).sum()), int(((base == 0) & (candidate == 1)).sum()))
    else:
        test = "paired t"
        if sd == 0:
            p_value = 1.0 if mean == 0 else 0.0
        else:
            p_value = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    # With no doc changed the observed variance is 0; the runs' own variances (as if unpaired)
    # then bound what the docs could show.
    se = sd / math.sqrt(n) if sd > 0 else math.sqrt((base.var() + candidate.var()) / n)
    return PairedDifference(
        test=test,
        difference=mean,
        interval=mean_interval(differences, alpha),
        p_value=p_value,
        detectable=detectable_difference(se, alpha),
        docs=n,
        base_interval=mean_interval(base, alpha),
        candidate_interval=mean_interval(candidate, alpha),
    )


def resample_draws(clusters: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, clusters) cluster indices drawn with replacement: the same draws for both runs."""
    return np.random.default_rng(seed).integers(0, clusters, size=(resamples, clusters))


def paired_bootstrap(
    base: list,
    candidate: list,
    aggregate: Aggregate,
    cluster_ids: Sequence | None,
    resamples: int,
    seed: int,
    alpha: float,
) -> PairedDifference:
    """The aggregate of each run on the same resampled docs (or clusters of docs). p is the share of
    resampled differences at least as far from the observed one as the observed one is from 0."""
    groups = _clusters(cluster_ids, len(base))
    draws = resample_draws(len(groups), resamples, seed)
    if isinstance(aggregate, Mean):
        base_stats, candidate_stats = (
            _resampled_means(np.asarray(v, dtype=float), groups, draws) for v in (base, candidate)
        )
        observed = float(np.mean(candidate) - np.mean(base))
    else:
        observed = aggregate(list(candidate)) - aggregate(list(base))
        base_stats = np.array([aggregate(_resample(base, groups, draw)) for draw in draws], dtype=float)
        candidate_stats = np.array([aggregate(_resample(candidate, groups, draw)) for draw in draws], dtype=float)
    differences = candidate_stats - base_stats
    extreme = int((np.abs(differences - observed) >= abs(observed)).sum())
    se = float(differences.std(ddof=1))
    if se == 0:
        se = math.sqrt(base_stats.var(ddof=1) + candidate_stats.var(ddof=1))
    kind = "bootstrap" if cluster_ids is None else f"cluster bootstrap ({len(groups)} clusters)"
    return PairedDifference(
        test=kind,
        difference=float(observed),
        interval=_percentiles(differences, alpha),
        p_value=(1 + extreme) / (1 + resamples),
        detectable=detectable_difference(se, alpha),
        docs=len(base),
        base_interval=_percentiles(base_stats, alpha),
        candidate_interval=_percentiles(candidate_stats, alpha),
    )


def _clusters(cluster_ids: Sequence | None, n: int) -> list[np.ndarray]:
    if cluster_ids is None:
        return [np.array([i]) for i in range(n)]
    members: dict = {}
    for index, cluster in enumerate(cluster_ids):
        members.setdefault(cluster, []).append(index)
    return [np.array(docs) for docs in members.values()]


def _resampled_means(values: np.ndarray, groups: list[np.ndarray], draws: np.ndarray) -> np.ndarray:
    sums = np.array([values[g].sum() for g in groups])
    counts = np.array([len(g) for g in groups], dtype=float)
    return sums[draws].sum(axis=1) / counts[draws].sum(axis=1)


def _resample(items: list, groups: list[np.ndarray], draw: np.ndarray) -> list:
    """The docs of the drawn clusters; a cluster's later copies get new item ids (its docs keep
    sharing one), so that an aggregation grouping by id sees separate items, as the bootstrap means."""
    seen: dict[int, int] = {}
    out = []
    for cluster in draw:
        copy = seen.get(int(cluster), 0)
        seen[int(cluster)] = copy + 1
        out.extend(_relabelled(items[i], copy) for i in groups[cluster])
    return out


def _relabelled(item, copy: int):
    if copy == 0 or not isinstance(item, dict):
        return item
    item = dict(item)
    for field in ITEM_ID_FIELDS:
        value = item.get(field)
        if isinstance(value, bool) or value is None:
            continue
        # ints stay ints (COCO's aggregation calls int() on image ids): moved past any real id
        item[field] = value + copy * 10**12 if isinstance(value, int) else f"{value}#copy{copy}"
    return item


def _percentiles(values: np.ndarray, alpha: float) -> tuple[float, float]:
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return (float(low), float(high))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error at most alpha when adjusted p < alpha)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


# --- what a task's samples and config say -------------------------------------------------------


@dataclass
class TaskSamples:
    """One run's per-doc values of one task: doc_id -> (doc_hash, {metric: value})."""

    docs: dict[int, tuple[str | None, dict]]


def task_samples(run: Run, task: str) -> TaskSamples:
    lines = read_samples(run, task)
    if lines is None:
        raise ValueError(
            f"{run.label}: no samples file for task {task} ({samples_file(run, task)}); "
            "run lmms-eval with --log_samples to write it"
        )
    docs = {}
    for sample in lines:
        if sample["doc_id"] in docs:
            raise ValueError(
                f"{run.label}: task {task} logs doc {sample['doc_id']} more than once (several filters); "
                "its samples file does not say which line is which filter, so it is not tested"
            )
        docs[sample["doc_id"]] = (sample.get("doc_hash"), sample)
    return TaskSamples(docs)


class Aggregations:
    """Each task's aggregation of a metric, as the run's results file names it: lmms-eval's
    ``mean``, else the task's own function, loaded from lmms-eval's task index by the task's name
    (results files store functions only as text). The index is built once, when first needed."""

    def __init__(self, include_path: str | None = None) -> None:
        self.include_path = include_path  # as lmms-eval's --include_path: tasks outside its own folder
        self._index = None

    def of(self, run: Run, task: str, metric: str) -> Aggregate:
        config = (run.data.get("configs") or {}).get(task) or {}
        named = next((m.get("aggregation") for m in config.get("metric_list") or [] if m.get("metric") == metric), None)
        if named == "mean":
            return MEAN
        from lmms_eval.api.registry import get_aggregation, get_metric_aggregation

        if named is None:  # a registered metric (exact_match, ...) with its default aggregation
            function = get_metric_aggregation(metric)
        else:
            entries = self._task_config(task).get("metric_list") or []
            function = next((m.get("aggregation") for m in entries if m.get("metric") == metric), None)
            if isinstance(function, str):
                function = get_aggregation(function)
        if not callable(function):
            raise ValueError(f"task {task}: lmms-eval's config gives no aggregation function for {metric}")
        if function.__name__ == "mean" and function.__module__.startswith("lmms_eval"):
            return MEAN
        return _quiet(function)

    def _task_config(self, task: str) -> dict:
        if self._index is None:
            from lmms_eval.tasks import TaskManager
            from loguru import logger

            logger.disable("lmms_eval")  # the index logs every YAML it cannot read
            try:
                self._index = TaskManager(verbosity="ERROR", include_path=self.include_path)
            finally:
                logger.enable("lmms_eval")
        if task not in self._index.task_index:
            raise ValueError(
                f"task {task}: not in lmms-eval's task index, so its aggregation functions are unknown "
                "(a task of your own: pass its folder as --include_path)"
            )
        from lmms_eval.utils import load_yaml_config

        return load_yaml_config(yaml_path=self._index.task_index[task]["yaml_path"])  # its !function entries resolved


def _quiet(function: Callable) -> Aggregate:
    """A task's aggregation called once per resample: its prints and logs silenced, and the files
    some write (submissions) put in a throwaway folder instead of the run's output."""
    import inspect

    from loguru import logger

    takes_args = "args" in inspect.signature(function).parameters

    def aggregate(items: list) -> float:
        with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
            logger.disable("")  # task modules log under their own names (COCO's "utils")
            try:
                if takes_args:
                    return float(function(items, args=argparse.Namespace(output_path=folder)))
                return float(function(items))
            finally:
                logger.enable("")

    aggregate.__name__ = function.__name__
    return aggregate


def cluster_ids(run: Run, task: str, values: list) -> list | None:
    """Docs that belong together: the task's ``cluster_key`` field, or a ``question_id`` that
    several docs share (MME: two questions per image); None when each doc stands alone."""
    key = ((run.data.get("configs") or {}).get(task) or {}).get("cluster_key")
    for field in (key, "question_id"):
        if field and values and all(isinstance(v, dict) and field in v for v in values):
            ids = [v[field] for v in values]
            if field == key or len(set(ids)) < len(ids):
                return ids
    return None


def compare_task(
    base: Run,
    candidate: Run,
    task: str,
    metrics: Sequence[str],
    resamples: int,
    seed: int,
    alpha: float,
    aggregations: Aggregations,
) -> tuple[dict[str, PairedDifference | str], list[str]]:
    """Per metric (filter ``none``) a PairedDifference, or why it was not tested; and notes on the
    docs only one run has. Docs are paired by doc_id and must have the same doc_hash."""
    base_docs, candidate_docs = task_samples(base, task).docs, task_samples(candidate, task).docs
    common = sorted(set(base_docs) & set(candidate_docs))
    notes = []
    for run, docs, other in ((base, base_docs, candidate_docs), (candidate, candidate_docs, base_docs)):
        only = sorted(set(docs) - set(other))
        if only:
            shown = ", ".join(map(str, only[:5])) + (" ..." if len(only) > 5 else "")
            notes.append(f"{task}: {len(only)} docs only in {run.label} (doc_id {shown}), not paired")
    for doc in common:
        if base_docs[doc][0] != candidate_docs[doc][0]:
            raise ValueError(f"task {task} doc {doc}: another doc_hash in {candidate.label} than in {base.label}")
    found: dict[str, PairedDifference | str] = {}
    for metric in metrics:
        if not common:
            found[metric] = "no doc in both runs"
            continue
        base_values = [base_docs[d][1].get(metric) for d in common]
        candidate_values = [candidate_docs[d][1].get(metric) for d in common]
        if any(v is None for v in base_values + candidate_values):
            found[metric] = "not in every sample"
            continue
        aggregate = aggregations.of(base, task, metric)
        clusters = cluster_ids(base, task, base_values)
        if isinstance(aggregate, Mean) and clusters is None:
            found[metric] = paired_mean_test(np.asarray(base_values, float), np.asarray(candidate_values, float), alpha)
        elif resamples == 0:
            found[metric] = "needs a bootstrap (--bootstrap 0)"
        else:
            found[metric] = paired_bootstrap(base_values, candidate_values, aggregate, clusters, resamples, seed, alpha)
    return found, notes
