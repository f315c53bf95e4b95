"""What a backend measures to choose K: the ``vtw_calibration`` group's answers (a prompt's KL at
every candidate layer, as JSON) and, for per-task calibration, a task's KL on chosen docs."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from vtw_eval.backends.generation import prompt_lengths
from vtw_eval.backends.requests import Request
from vtw_eval.calibration import layer_kl_divergences, with_greedy_answer
from vtw_eval.withdraw_layer_choice import MeasureTask

if TYPE_CHECKING:
    from vtw_eval.backends.base import VTWBackend


def calibration_answers(backend: VTWBackend, inputs: dict[str, torch.Tensor], tasks: list[str]) -> list[str]:
    """A vtw_calibration request's answer: this prompt's KL per candidate layer, as JSON."""
    settings = backend.withdraw_layers.settings
    extended, counted = with_greedy_answer(backend.withdrawal, inputs, settings.kl_tokens, backend.eot_token_id)
    kl = layer_kl_divergences(backend.withdrawal, extended, counted)
    sample = {
        **backend.identity,
        "kl_threshold": settings.kl_threshold,
        "kl_tokens": settings.kl_tokens,
        "calibration_file": str(backend.calibration_file),
    }
    return [json.dumps({"subset": task, "kl": row.tolist(), **sample}) for task, row in zip(tasks, kl)]


def task_kl(backend: VTWBackend, requests: list[Request]) -> MeasureTask:
    """How a task's K is measured on chosen docs of these requests (one request per doc: a
    multiple-choice doc has one per choice, with the same prompt): KL rows and decoder FLOPs."""

    def measure(task: str, chosen: set) -> tuple[list[tuple[int, list[float]]], int]:
        by_doc = {}
        for request in requests:
            if request.task == task and request.doc_id in chosen:
                by_doc.setdefault(request.doc_id, request)
        mine = [by_doc[doc] for doc in sorted(by_doc)]
        rows, flops, kl_tokens = [], 0, backend.withdraw_layers.settings.kl_tokens
        progress = tqdm(total=len(mine), disable=backend.rank != 0, desc=f"VTW calibrating {task}")
        for start in range(0, len(mine), backend.batch_size):
            chunk = mine[start : start + backend.batch_size]
            try:
                inputs = backend.batch_inputs(chunk)
                extended, counted = with_greedy_answer(backend.withdrawal, inputs, kl_tokens, backend.eot_token_id)
                kl = layer_kl_divergences(backend.withdrawal, extended, counted)
            except Exception as error:
                doc_ids = [request.doc_id for request in chunk]
                raise RuntimeError(f"VTW calibration of task {task} failed for doc_ids {doc_ids}: {error}") from error
            rows += [(request.doc_id, row.tolist()) for request, row in zip(chunk, kl)]
            for length, num_visual in zip(prompt_lengths(inputs), backend.visual_counts(inputs)):
                flops += backend.geometry.calibration_flops(length, num_visual, counted.shape[1] - 1)
            progress.update(len(chunk))
        progress.close()
        return rows, flops

    return measure
