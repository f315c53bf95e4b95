"""Where K is decided, for every request of a run.

``withdraw_layer`` is a K, ``none``, or ``auto``: then this model's calibration file gives it,
either its global K or, per task, the task's own entry (when made with this run's threshold and
``kl_tokens`` on enough of the task's docs), or with ``calibrate_per_task`` a K measured now on
the task's own prompts and written into the file. Every process decides the same: rank 0 reads
the file, the KL measured by each rank is gathered before a K is chosen.

What needs the model (a task's per-layer KL on chosen docs) is passed in as a function; this
module never sees the backend. The calibration file itself is ``calibration_file.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from vtw_eval.backends import arguments
from vtw_eval.backends.processes import Processes
from vtw_eval.calibration import DEFAULT_KL_THRESHOLD, choose_withdraw_layer, spread_evenly, task_entry
from vtw_eval.calibration_file import (
    check_calibration_writable,
    load_calibration,
    matching_task_entry,
    stale_reason,
    write_task_calibration,
)
from vtw_eval.tasks import TASKS_DIR

# A task's per-layer KL on the chosen doc ids, measured by this process: (doc_id, KL per layer)
# rows of its own requests, and the decoder FLOPs spent.
MeasureTask = Callable[[str, set], tuple[list[tuple[int, list[float]]], int]]


@dataclass(frozen=True)
class CalibrationSettings:
    """How ``auto`` chooses K: the KL threshold, the answer tokens the KL sees, and how many of a
    task's prompts per-task calibration measures (0: none, the global K)."""

    kl_threshold: float = DEFAULT_KL_THRESHOLD
    kl_tokens: int = 1
    calibrate_per_task: int = 0
    threshold_given: bool = False

    @classmethod
    def from_arguments(cls, kl_threshold, kl_tokens, calibrate_per_task) -> CalibrationSettings:
        return cls(
            kl_threshold=arguments.non_negative_float(
                "kl_threshold", DEFAULT_KL_THRESHOLD if kl_threshold is None else kl_threshold
            ),
            kl_tokens=arguments.integer("kl_tokens", kl_tokens),
            calibrate_per_task=arguments.integer("calibrate_per_task", calibrate_per_task, minimum=0),
            threshold_given=kl_threshold is not None,
        )


@dataclass(frozen=True)
class CalibrationTarget:
    """The model a calibration file belongs to, and how to name it in a printed command."""

    file: Path
    identity: dict
    num_layers: int
    backend_name: str  # the --model name
    pretrained: str


class WithdrawLayerChoice:
    """The K of every request: ``default`` (a K, or None for no withdrawal or, with per-task
    calibration and no global K, "each task its own"), and per task with ``for_tasks``."""

    def __init__(
        self,
        value,
        settings: CalibrationSettings,
        target: CalibrationTarget,
        processes: Processes,
        response_cache: bool = False,
    ) -> None:
        self.settings, self.target, self.processes = settings, target, processes
        layer = arguments.withdraw_layer(value, target.num_layers)
        self.auto = layer == "auto"
        given = [
            name
            for name, flag in (("kl_threshold", settings.threshold_given), ("kl_tokens", settings.kl_tokens != 1))
            if flag
        ]
        if isinstance(layer, int) and given:
            raise ValueError(
                f"{' and '.join(given)} with withdraw_layer={layer} would change nothing: they choose K with "
                "withdraw_layer=auto, and measure it in the vtw_calibration task (run with withdraw_layer=none)"
            )
        if settings.calibrate_per_task and not self.auto:
            raise ValueError(
                f"calibrate_per_task={settings.calibrate_per_task} chooses each task's K, so it needs "
                f"withdraw_layer=auto; got withdraw_layer={value!r}"
            )
        self.default = self._global_from_file(response_cache) if self.auto else layer
        if settings.calibrate_per_task and processes.rank == 0:  # found now, not after every calibration prompt
            self.check_writable()

    def check_writable(self) -> None:
        """The calibration file can be written and is not another model's (before any prompt runs)."""
        check_calibration_writable(self.target.file, self.target.identity, self.target.num_layers)

    # -- the commands printed in messages ---------------------------------------------------

    def calibration_command(self) -> str:
        """The command that writes this model's calibration file, ready to paste."""
        return (
            f"lmms-eval --model {self.target.backend_name} --model_args pretrained={self.target.pretrained},"
            f"withdraw_layer=none,calibration={self.target.file} --tasks vtw_calibration --include_path {TASKS_DIR}"
        )

    def per_task_command(self, task: str) -> str:
        """The command that (re)calibrates ``task``'s own K, ready to paste."""
        settings = self.settings
        return (
            f"lmms-eval --model {self.target.backend_name} --model_args pretrained={self.target.pretrained},"
            f"withdraw_layer=auto,calibrate_per_task={settings.calibrate_per_task or 20},"
            f"kl_tokens={settings.kl_tokens},"
            + (f"kl_threshold={settings.kl_threshold:g}," if settings.threshold_given else "")
            + f"calibration={self.target.file} --tasks {task}"
        )

    # -- the global K ------------------------------------------------------------------------

    def _global_from_file(self, response_cache: bool) -> int | None:
        """``auto``'s global K (None when ``calibrate_per_task`` is on and the file has none)."""
        record, _ = self._record(need_global=not self.settings.calibrate_per_task)
        if response_cache:
            raise ValueError(
                "withdraw_layer=auto cannot be combined with lmms-eval's --use_cache: the response cache "
                "keys answers on the model_args string, which does not show the K that auto resolves to, so "
                "answers computed at another K would be returned. "
                + (
                    f"Pass withdraw_layer={self._global_layer(record)} (what auto resolves to now, from "
                    f"{self.target.file}) instead."
                    if record is not None and "withdraw_layer" in record and not record.get("per_task")
                    else "Pass an explicit withdraw_layer per task instead."
                )
            )
        if record is None or "withdraw_layer" not in record:
            logger.info(f"withdraw_layer=auto: no global K in {self.target.file}; each task gets its own")
            return None
        if record["dtype"] != self.target.identity["dtype"]:
            logger.warning(
                f"withdraw_layer=auto: calibrated in {record['dtype']}, running in {self.target.identity['dtype']}"
            )
        if record.get("kl_tokens", 1) != self.settings.kl_tokens:
            logger.warning(
                f"withdraw_layer=auto: the global K was calibrated with kl_tokens={record.get('kl_tokens', 1)}, "
                f"this run asks for kl_tokens={self.settings.kl_tokens} (used for per-task entries)"
            )
        return self._global_layer(record)

    def _global_layer(self, record: dict) -> int:
        layer, threshold = record["withdraw_layer"], self.settings.kl_threshold
        if self.settings.threshold_given and threshold != record["kl_threshold"]:
            # The file holds the whole KL curve: another threshold needs no new calibration.
            layer, _ = choose_withdraw_layer(record["mean_kl"], threshold)
            logger.info(
                f"withdraw_layer=auto: K={layer} at kl_threshold={threshold} from the mean KL in "
                f"{self.target.file} (calibrated at {record['kl_threshold']}: K={record['withdraw_layer']})"
            )
        else:
            logger.info(f"withdraw_layer=auto: K={layer} from {self.target.file}")
        return layer

    def _record(self, need_global: bool) -> tuple[dict | None, dict[str, str]]:
        """This model's calibration record (its valid parts) and what is wrong with its invalid
        per-task entries; no record where per-task calibration can start without one."""
        if not need_global and not self.target.file.is_file():
            return None, {}
        try:
            return load_calibration(
                self.target.file, self.target.identity, self.target.num_layers, self.calibration_command(),
                need_global,
            )  # fmt: skip
        except ValueError as error:
            if need_global:
                raise
            # The writer drops what is invalid; a file of another model was refused at load.
            logger.warning(f"{error}\ncalibrate_per_task={self.settings.calibrate_per_task} recalibrates every task")
            return None, {}

    # -- per task ----------------------------------------------------------------------------

    def for_tasks(
        self, docs_here: dict[str, tuple[set, int]], measure: MeasureTask
    ) -> tuple[dict[str, int | None], dict[str, int]]:
        """The K each task is answered at, and the decoder FLOPs spent choosing it (tasks
        calibrated now only). ``docs_here``: per task of this process's requests, their doc ids and
        the task's number of docs, whatever ``--limit`` took from them.

        Without ``auto``, the given K, and no collective (lmms-eval's response cache may call one
        rank and not another)."""
        if not self.auto:
            return {task: self.default for task in docs_here}, {}
        docs_in_run, task_docs = {}, {}
        for rank_tasks in self.processes.from_every_rank(docs_here):
            for task, (docs, count) in rank_tasks.items():
                docs_in_run.setdefault(task, set()).update(docs)
                task_docs[task] = count
        tasks = sorted(docs_in_run)
        usable = self._usable_task_entries(tasks, task_docs) if self.processes.rank == 0 else None
        entries = self.processes.from_rank_zero(usable)
        layers, flops = {}, {}
        for task in tasks:
            entry = entries[task]
            if entry is None and self.settings.calibrate_per_task:
                entry, flops[task] = self._calibrate(task, sorted(docs_in_run[task]), task_docs[task], measure)
            if entry is None:
                layers[task] = self.default
                logger.info(f"withdraw_layer=auto: task {task} at the global K={layers[task]} (no entry of its own)")
            else:
                layers[task] = entry["withdraw_layer"]
                logger.info(
                    f"withdraw_layer=auto: task {task} at K={layers[task]} (its own: {entry['num_samples']} prompts, "
                    f"kl_tokens={entry['kl_tokens']}, threshold {entry['kl_threshold']:g})"
                )
        return layers, flops

    def _usable_task_entries(self, tasks: list[str], task_docs: dict[str, int]) -> dict[str, dict | None]:
        """Per task, the calibration file's entry this run may use (None: calibrate it, or use the
        global K). An invalid entry is refused without ``calibrate_per_task`` (with it, replaced); a
        stale one is recalibrated with it, used with a warning without it."""
        record, problems = self._record(need_global=False)
        settings, file = self.settings, self.target.file
        usable = {}
        for task in tasks:
            if task in problems:
                if not settings.calibrate_per_task:
                    raise ValueError(
                        f"withdraw_layer=auto: calibration file {file}: the entry of task {task} is "
                        f"invalid ({problems[task]}); recalibrate it with:\n  {self.per_task_command(task)}"
                    )
                logger.warning(f"calibration file {file}: task {task}'s entry is invalid, recalibrating")
            entry = matching_task_entry(record, task, settings.kl_threshold, settings.kl_tokens)
            reason = entry and stale_reason(entry, task_docs[task], settings.calibrate_per_task)
            if reason and settings.calibrate_per_task:
                logger.warning(f"calibration file {file}: task {task}'s entry is not reused ({reason})")
                entry = None
            elif reason:
                logger.warning(
                    f"withdraw_layer=auto: task {task}'s entry in {file} is used, but {reason}; "
                    f"recalibrate it with:\n  {self.per_task_command(task)}"
                )
            usable[task] = entry
        return usable

    def _calibrate(self, task: str, all_docs: list, task_docs: int, measure: MeasureTask) -> tuple[dict, int]:
        """The task's K from the per-layer KL of ``calibrate_per_task`` of its prompts, spread evenly
        over the docs of the run (``all_docs``, on all ranks; answers never read), written into the
        calibration file; and this process's share of the FLOPs (its accounting reports its requests)."""
        wanted, rank = self.settings.calibrate_per_task, self.processes.rank
        if wanted > len(all_docs) and rank == 0:
            logger.warning(
                f"calibrate_per_task={wanted}: task {task} has {len(all_docs)} docs in this run; "
                f"its K is calibrated on all {len(all_docs)}"
            )
        chosen = {all_docs[index] for index in spread_evenly(len(all_docs), wanted)}
        rows, flops = measure(task, chosen)
        rows = sorted(row for rank_rows in self.processes.from_every_rank(rows) for row in rank_rows)
        limited = len(all_docs) < task_docs  # --limit: this run sees part of the task
        kl = torch.tensor([kl for _, kl in rows])
        entry = task_entry(kl, self.settings.kl_threshold, self.settings.kl_tokens, task_docs, limited)
        if rank == 0:
            json_path, plot_path = write_task_calibration(
                self.target.file, self.target.identity, self.target.num_layers, task, entry
            )
            logger.info(f"VTW calibration of {task}: K={entry['withdraw_layer']}; wrote {json_path} and {plot_path}")
        return entry, flops
