"""A vtw_llava backend on the tiny LLaVA with four docs (one text-only, one with two images),
and lmms-eval requests for them, as lmms-eval would make them."""

from __future__ import annotations

from lmms_eval.api.instance import Instance
from tiny_models import picture

from vtw_eval.backends.llava import VTWLlava

QUESTIONS = ["Is there a red square ?", "What colour is the square ?", "Is it big ?", "How many squares are there ?"]
GEN_KWARGS = {"max_new_tokens": 5, "temperature": 0, "do_sample": False, "until": ["\n\n"]}


def docs():
    # doc 2 has no image (text-only docs exist in ScienceQA); doc 3 has two.
    images = [[picture(0)], [picture(1)], [], [picture(2), picture(3)]]
    return [{"question": q, "images": im} for q, im in zip(QUESTIONS, images)]


def doc_to_visual(doc):
    return doc["images"]


def backend(path, withdraw_layer, batch_size=1, accounting_file=None):
    lm = VTWLlava(
        pretrained=str(path),
        withdraw_layer=withdraw_layer,
        device="cpu",
        batch_size=batch_size,
        accounting_file=accounting_file or f"{path}/accounting.jsonl",
    )
    lm.task_dict = {"tiny": {"test": docs()}}
    return lm


def request(request_type, arguments):
    metadata = {"task": "tiny", "doc_id": arguments[3], "repeats": 1}
    return Instance(request_type, arguments, idx=0, metadata=metadata)


def generation_requests():
    return [
        request("generate_until", (doc["question"], dict(GEN_KWARGS), doc_to_visual, i, "tiny", "test"))
        for i, doc in enumerate(docs())
    ]
