"""Each backend through the lmms-eval CLI on the tiny local tasks, with calibration and accounting;
and a video doc through the Qwen2-VL backend."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
from lmms_eval.api.instance import Instance
from tiny_models import (
    build_tiny_gemma3,
    build_tiny_gemma4,
    build_tiny_glm4v,
    build_tiny_internvl,
    build_tiny_llama4,
    build_tiny_llava,
    build_tiny_llava_onevision,
    build_tiny_mistral3,
    build_tiny_qwen2_vl,
    build_tiny_qwen3,
    build_tiny_smolvlm,
)
from transformers import AutoProcessor

from vtw_eval.backends.qwen2_vl import VTWQwen2VL
from vtw_eval.backends.requests import Request
from vtw_eval.calibration import choose_withdraw_layer
from vtw_eval.run import run_lmms_eval

BACKENDS = {
    "vtw_llava": lambda path: build_tiny_llava(
        path, any_resolution=True
    ),  # LLaVA-1.5 runs everywhere else; here LLaVA-NeXT's tiles
    "vtw_llava_onevision": build_tiny_llava_onevision,
    # vtw_qwen2_5_vl is vtw_qwen2_vl's class with Qwen2.5-VL's model class (its model runs the
    # exactness suite); one CLI run serves both, for the suite's time.
    "vtw_qwen2_vl": lambda path: build_tiny_qwen2_vl(path, "2"),
    # The dense Qwen3 models run in tests/test_lmms_eval_parity.py; here the mixtures of experts.
    "vtw_qwen3_vl": lambda path: build_tiny_qwen3(path, "qwen3_vl_moe"),
    "vtw_qwen3_5": lambda path: build_tiny_qwen3(path, "qwen3_5_moe"),
    "vtw_gemma3": build_tiny_gemma3,
    "vtw_glm4v": build_tiny_glm4v,
    "vtw_internvl": build_tiny_internvl,
    "vtw_smolvlm": build_tiny_smolvlm,
    "vtw_mistral3": build_tiny_mistral3,
    "vtw_llama4": build_tiny_llama4,
    # The dense Gemma 4 (per-layer inputs, KV sharing) runs in the parity test; here its MoE variant.
    "vtw_gemma4": lambda path: build_tiny_gemma4(path, moe=True),
}


@pytest.mark.cli
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backend_cli_run_with_calibration_and_accounting(backend, tmp_path):
    path = BACKENDS[backend](tmp_path / "model")
    model_args = (
        f"pretrained={path},withdraw_layer=1,device=cpu,"
        f"calibration_dir={tmp_path}/cal,accounting_file={tmp_path}/r.jsonl"
    )
    results_file = run_lmms_eval(
        backend, model_args, "vtw_tiny_mme,vtw_calibration_tiny", tmp_path / "out", "--batch_size", "3", "--log_samples"
    )
    results = json.loads(results_file.read_text())
    assert "mme_perception_score,none" in results["results"]["vtw_tiny_mme"]
    record = results["results"]["vtw_calibration_tiny"]["vtw_calibration,none"]
    assert record["num_samples"] == 16 and record["mean_kl"][-1] == 0.0
    assert (record["withdraw_layer"], record["threshold_met"]) == choose_withdraw_layer(record["mean_kl"], 0.003)
    assert (tmp_path / "cal").is_dir() and len(list((tmp_path / "cal").glob("*.png"))) == 1

    # Accounting: the visual tokens recorded are those the processor puts in the doc's prompt.
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(records) == 16 and all(r["withdraw_layer"] == 1 for r in records)
    assert results["throughput"]["avg_withdraw_layer"] == 1
    samples = [
        json.loads(line)
        for line in next(results_file.parent.glob("*_samples_vtw_tiny_mme.jsonl")).read_text().splitlines()
    ]
    assert len(samples) == 16
    assert all(
        0 < r["visual_tokens"] < r["prompt_tokens"] and r["kept_tokens"] == r["prompt_tokens"] - r["visual_tokens"]
        for r in records
    )
    # The whole forward is modelled for LLaVA-1.5 (tested in test_cost), Qwen2-VL and the Qwen3
    # family, not for tiles or windows.
    modelled = backend in ("vtw_qwen2_vl", "vtw_qwen3_vl", "vtw_qwen3_5")  # vtw_llava runs LLaVA-NeXT here
    assert all(("prefill_flops_whole_model_vtw" in r) == modelled for r in records)
    assert ("avg_prefill_flops_whole_model_saved" in results["throughput"]) == modelled


def write_video(path, frames: int = 8, size: int = 56) -> str:
    container = av.open(str(path), mode="w")
    stream = container.add_stream("mpeg4", rate=4)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    for index in range(frames):
        frame = np.zeros((size, size, 3), np.uint8)
        frame[:, : (index + 1) * size // frames] = (200, 40, 40)
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return str(path)


def test_qwen2_vl_backend_reads_a_video_file(tmp_path):
    path = build_tiny_qwen2_vl(tmp_path / "model", "2")
    video = write_video(tmp_path / "clip.mp4")
    lm = VTWQwen2VL(
        pretrained=str(path),
        withdraw_layer=1,
        device="cpu",
        max_num_frames=4,
        accounting_file=str(tmp_path / "r.jsonl"),
    )
    lm.task_dict = {"video": {"test": [{"video": video}]}}
    metadata = {"task": "video", "doc_id": 0, "repeats": 1}
    arguments = ("What colour is it ?", {"max_new_tokens": 3}, lambda doc: [doc["video"]], 0, "video", "test")
    (answer,) = lm.generate_until([Instance("generate_until", arguments, idx=0, metadata=metadata)])
    assert isinstance(answer, str)
    (record,) = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    # 4 frames of 56x56 -> 2 temporal patches x (4x4 patches / 2x2 merge) = 8 video tokens.
    processor = AutoProcessor.from_pretrained(path)
    frames = lm.video_frames(video)
    assert frames.shape == (4, 56, 56, 3)
    inputs = processor(videos=[frames], text=[lm.build_prompt("What colour is it ?", [frames])], return_tensors="pt")
    assert record["visual_tokens"] == int((inputs["input_ids"] == lm.model.config.video_token_id).sum()) == 8
    assert "prefill_flops_whole_model_vtw" not in record  # a video's frames are not known from its tokens


def test_qwen3_vl_video_answers_as_lmms_eval_backend(tmp_path):
    """A video doc: read and sampled by qwen_vl_utils with the frame budget, as lmms-eval's chat
    qwen3_vl does (compared in-process: its CLI reads videos only from hub datasets)."""
    from lmms_eval.models.chat.qwen3_vl import Qwen3_VL

    from vtw_eval.backends.qwen3_vl import VTWQwen3VL

    path = str(build_tiny_qwen3(tmp_path / "model", "qwen3_vl"))
    videos = [write_video(tmp_path / f"clip{seed}.mp4", frames=8 - 2 * seed) for seed in range(2)]
    budget = dict(max_num_frames=4, min_pixels=2 * 32 * 32, max_pixels=64 * 64)
    question = "What colour is it ?"
    docs = [{"video": video} for video in videos]
    metadata = {"task": "video", "doc_id": 0, "repeats": 1}
    gen_kwargs = {"max_new_tokens": 4, "temperature": 0}

    def messages(doc):
        return [
            {"role": "user", "content": [{"type": "video", "url": doc["video"]}, {"type": "text", "text": question}]}
        ]

    theirs = Qwen3_VL(pretrained=path, device="cpu", device_map="cpu", **budget)
    theirs.task_dict = {"video": {"test": docs}}
    chat = [
        Instance("generate_until", (question, messages, gen_kwargs, i, "video", "test"), 0, metadata) for i in (0, 1)
    ]
    expected = [result.text for result in theirs.generate_until(chat)]

    ours = VTWQwen3VL(pretrained=path, withdraw_layer="none", dtype="bfloat16", device="cpu", **budget)
    ours.task_dict = {"video": {"test": docs}}
    simple = [
        Instance("generate_until", (question, gen_kwargs, lambda doc: [doc["video"]], i, "video", "test"), 0, metadata)
        for i in (0, 1)
    ]
    assert ours.generate_until(simple) == expected
    inputs = ours.batch_inputs([Request.of(request) for request in simple[:1]])
    assert int((inputs["input_ids"] == ours.model.config.video_token_id).sum()) > 0
    withdrawn = VTWQwen3VL(pretrained=path, withdraw_layer=0, dtype="bfloat16", device="cpu", **budget)
    withdrawn.task_dict = ours.task_dict
    assert withdrawn.generate_until(simple) != expected  # the guard: the video tokens mattered


def test_qwen3_answers_and_arguments(tmp_path):
    """Thinking: the answer is what follows </think>, nothing when it never ends (lmms-eval's
    qwen3_5 rule); off, the text as decoded. A bad switch is refused by name."""
    from vtw_eval.backends.qwen3_5 import VTWQwen3_5

    path = build_tiny_qwen3(tmp_path / "model", "qwen3_5")
    thinking = VTWQwen3_5(pretrained=str(path), device="cpu")
    assert thinking.finish_answer("plan it </think>\n\n Yes ") == "Yes"
    assert thinking.finish_answer("still thinking") == ""
    assert "<think>\n" in thinking.build_prompt("Is it red ?", [])
    plain = VTWQwen3_5(pretrained=str(path), device="cpu", enable_thinking=False)
    assert plain.finish_answer(" Yes </think> no") == " Yes </think> no"
    assert plain.build_prompt("Is it red ?", []).endswith("<think>\n\n</think>\n\n")
    with pytest.raises(ValueError, match=r"enable_thinking='maybe' is not accepted; use true or false"):
        VTWQwen3_5.create_from_arg_string(f"pretrained={path},device=cpu,enable_thinking=maybe")


def test_gemma3_video_answers_as_lmms_eval_backend(tmp_path):
    """A video doc, compared in-process with lmms-eval's gemma3: its frames become images, read as
    lmms-eval reads them. InternVL's processor needs torchcodec to read a video file, which the lock
    does not hold: vtw_internvl stops naming the doc (lmms-eval's internvl_hf scores "")."""
    from lmms_eval.models.simple.gemma3 import Gemma3

    from vtw_eval.backends.gemma3 import VTWGemma3
    from vtw_eval.backends.internvl import VTWInternVL

    videos = [write_video(tmp_path / f"clip{seed}.mp4", frames=8 - 2 * seed) for seed in range(2)]
    task_dict = {"video": {"test": [{"video": video} for video in videos]}}
    question, metadata = "What colour is it ?", {"task": "video", "doc_id": 0, "repeats": 1}
    requests = [
        Instance("generate_until", (question, {"max_new_tokens": 4}, lambda doc: [doc["video"]], i, "video", "test"),
                 0, metadata)
        for i in (0, 1)
    ]  # fmt: skip
    path = str(build_tiny_gemma3(tmp_path / "gemma3"))
    theirs = Gemma3(pretrained=path, device="cpu", device_map="cpu", max_num_frames=3)
    theirs.task_dict = task_dict
    expected = theirs.generate_until(requests)
    answers = {}
    for layer in ("none", 0):
        ours = VTWGemma3(pretrained=path, withdraw_layer=layer, dtype="bfloat16", device="cpu", max_num_frames=3)
        ours.task_dict = task_dict
        answers[layer] = ours.generate_until(requests)
    assert answers["none"] == expected and len(set(expected)) == 2
    assert answers[0] != expected  # the guard: the frames' tokens mattered

    internvl = VTWInternVL(pretrained=str(build_tiny_internvl(tmp_path / "internvl")), device="cpu", num_frames=2)
    internvl.task_dict = task_dict
    with pytest.raises(RuntimeError, match=r"\('video', 0\).*torchcodec"):
        internvl.generate_until(requests[:1])


def video_backend(family: str, path, **kwargs):
    """A video-taking backend at its default ``max_num_frames`` (32), on the tiny model of its family."""
    from vtw_eval.backends.gemma3 import VTWGemma3
    from vtw_eval.backends.qwen3_vl import VTWQwen3VL

    if family == "qwen2_vl":
        return VTWQwen2VL(pretrained=str(build_tiny_qwen2_vl(path, "2")), device="cpu", **kwargs)
    if family == "qwen3_vl":  # a small pixel budget per frame, for the suite's time
        model = build_tiny_qwen3(path, "qwen3_vl")
        return VTWQwen3VL(pretrained=str(model), device="cpu", min_pixels=2 * 32 * 32, max_pixels=64 * 64, **kwargs)
    if family == "qwen3_5":  # its defaults: a whole-video pixel budget (total_pixels), frames at most 768
        from vtw_eval.backends.qwen3_5 import VTWQwen3_5

        model = build_tiny_qwen3(path, "qwen3_5")
        return VTWQwen3_5(pretrained=str(model), device="cpu", enable_thinking=False, **kwargs)
    return VTWGemma3(pretrained=str(build_tiny_gemma3(path)), device="cpu", **kwargs)


def video_request(video: str, doc_id: int = 0) -> Instance:
    arguments = ("What colour is it ?", {"max_new_tokens": 3}, lambda doc: [doc["video"]], doc_id, "video", "test")
    return Instance("generate_until", arguments, idx=0, metadata={"task": "video", "doc_id": doc_id, "repeats": 1})


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_5", "gemma3"])
def test_a_video_shorter_than_max_num_frames_runs(tmp_path, family):
    """7 frames under the default 32 (Qwen3.5: 768): every frame once (Qwen3-VL: 6, the even count
    its video input takes), where lmms-eval's chat qwen3_vl stops the run."""
    video = write_video(tmp_path / "clip.mp4", frames=7)
    lm = video_backend(family, tmp_path / "model", withdraw_layer=1)
    lm.task_dict = {"video": {"test": [{"video": video}]}}
    (answer,) = lm.generate_until([video_request(video)])
    assert isinstance(answer, str)
    if family == "qwen3_5":  # qwen_vl_utils samples at 2 fps within the video's length: at most 6 frames
        assert lm.video_kwargs["max_frames"] == 768 and "nframes" not in lm.video_kwargs
        inputs = lm.batch_inputs([Request.of(video_request(video))])
        assert 1 <= inputs["video_grid_thw"][0, 0].item() <= 3
    elif family == "qwen3_vl":
        assert lm.video_kwargs["nframes"] == 32
        assert lm._video_element(lm.video_frames(video))["nframes"] == 6
        inputs = lm.batch_inputs([Request.of(video_request(video))])
        assert inputs["video_grid_thw"][0, 0].item() == 3  # 6 frames, paired by the temporal patch
    else:
        assert lm.max_num_frames == 32
        frames = lm.video_frames(video)
        assert len(frames) == 7 and all((a != b).any() for a, b in zip(frames, frames[1:]))  # none twice


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_5", "gemma3"])
def test_an_unreadable_video_names_the_doc_the_path_and_the_cause(tmp_path, family):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    lm = video_backend(family, tmp_path / "model", withdraw_layer=1)
    lm.task_dict = {"video": {"test": [{"video": "unused"}, {"video": str(broken)}]}}
    with pytest.raises(RuntimeError, match=rf"doc 1 of task video: cannot read the video {broken}: \w+") as error:
        lm.generate_until([video_request(str(broken), doc_id=1)])
    assert "Invalid data found when processing input" in str(error.value)  # ffmpeg's reason
    assert "torchvision" not in str(error.value)  # not a later fallback's error


@pytest.mark.parametrize(
    "argument, message",
    [
        ("max_soft_tokens=100", r"max_soft_tokens='100' is not accepted; use one of 70, 140, 280, 560, 1120"),
        ("interleave_visuals=true", r"interleave_visuals=True is not supported by vtw_gemma4; accepted: False"),
    ],
)
def test_gemma4_arguments_are_refused_before_loading(argument, message):
    """Checked before anything loads: the checkpoint named does not exist."""
    from vtw_eval.backends.gemma4 import VTWGemma4

    with pytest.raises(ValueError, match=message):
        VTWGemma4.create_from_arg_string(f"pretrained=/nonexistent/gemma4,{argument}")
