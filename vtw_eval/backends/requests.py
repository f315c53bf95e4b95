"""lmms-eval's requests by name. lmms-eval hands a backend each request as a tuple whose second
field differs by type: ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` for
``generate_until``, ``(context, continuation, doc_to_visual, doc_id, task, split)`` for
``loglikelihood`` (the continuation a string or a ``doc_to_target`` function)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmms_eval.api.instance import Instance


@dataclass(frozen=True)
class Request:
    context: str
    doc_to_visual: Callable | None
    doc_id: int
    task: str
    split: str
    args: tuple  # lmms-eval's tuple as given: its response cache keys on it
    gen_kwargs: dict = field(default_factory=dict)  # generate_until
    continuation: str | Callable | None = None  # loglikelihood

    @classmethod
    def of(cls, instance: Instance) -> Request:
        context, second, doc_to_visual, doc_id, task, split = instance.args[:6]
        fields = dict(context=context, doc_to_visual=doc_to_visual, doc_id=doc_id, task=task, split=split)
        if instance.request_type == "loglikelihood":
            return cls(**fields, args=instance.args, continuation=second)
        return cls(**fields, args=instance.args, gen_kwargs=second)

    @property
    def key(self) -> tuple[str, int]:
        """(task, doc_id), as errors and accounting records name a request."""
        return self.task, self.doc_id

    @property
    def is_calibration(self) -> bool:
        """A prompt of the shipped ``vtw_calibration`` group: its answer is the per-layer KL."""
        return bool(self.gen_kwargs.get("vtw_calibration"))

    def doc(self, task_dict: dict) -> Any:
        return task_dict[self.task][self.split][self.doc_id]

    def continuation_text(self, task_dict: dict) -> str:
        if isinstance(self.continuation, str):
            return self.continuation
        return self.continuation(self.doc(task_dict))
