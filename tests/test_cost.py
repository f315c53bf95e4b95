"""The cost model against hand-computed values, and the backend's figures against the real cache."""

from __future__ import annotations

import json

import pytest
import torch
from backend_requests import backend, generation_requests
from tiny_models import NUM_LAYERS
from transformers import LlavaConfig, Qwen2Config

from vtw_eval.accounting import image_token_runs
from vtw_eval.architecture import layer_types
from vtw_eval.cost import DecoderGeometry, Qwen2VLWholeModel, WholeModel, analytic_prefill_speedup, whole_model_of
from vtw_eval.engine import cache_bytes, cache_in

LLAVA_7B = DecoderGeometry(
    num_layers=32, hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32, head_dim=128
)


def test_llava_7b_prefill_by_hand():
    # One layer over n tokens: 8*n*d^2 (q, k, v, o) + 6*n*d*m (gated MLP) + 4*n^2*d (attention).
    def layer(n):
        return 8 * n * 4096**2 + 6 * n * 4096 * 11008 + 4 * n * n * 4096

    assert LLAVA_7B.prefill_flops(651, 576, None) == 32 * layer(651)
    assert LLAVA_7B.prefill_flops(651, 576, 16) == 16 * layer(651) + 16 * layer(75)
    assert LLAVA_7B.prefill_flops(651, 576, 0) == 32 * layer(75)
    assert LLAVA_7B.prefill_flops(651, 576, 32) == 32 * layer(651)
    # NOTES.md gives these to two decimals: half a unit of the last one.
    assert LLAVA_7B.prefill_flops(651, 576, None) / 1e12 == pytest.approx(8.65, abs=0.005)
    assert LLAVA_7B.prefill_flops(651, 576, 16) / 1e12 == pytest.approx(4.81, abs=0.005)
    # pytest's default, relative 1e-6, wherever the same float64 quantities are summed in another order.
    assert analytic_prefill_speedup(LLAVA_7B, 651, 576, 16) == pytest.approx(layer(651) * 2 / (layer(651) + layer(75)))


def test_calibration_flops_by_hand():
    """One prompt of 651 tokens (576 visual): an unmodified forward, then layer j over j + 1 copies
    of the 75 kept tokens (1 + 2 + ... + 32 = 528 layer passes); with 3 answer tokens, also their
    greedy generation (a prefill and 2 decoding steps) and a forward over 654 tokens."""
    linear = 8 * 4096**2 + 6 * 4096 * 11008

    def layer(n):
        return n * linear + 4 * n * n * 4096

    assert LLAVA_7B.calibration_flops(651, 576) == 32 * layer(651) + 528 * layer(75)
    generation = 32 * layer(651) + sum(32 * linear + 32 * 4 * 4096 * (651 + s + 1) for s in range(2))
    assert LLAVA_7B.calibration_flops(651, 576, 3) == generation + 32 * layer(654) + 528 * layer(78)


def test_llava_7b_decode_and_kv_cache_by_hand():
    # A decode step after 700 tokens: every layer's linear maps for 1 token, attention over its keys.
    linear = 8 * 4096**2 + 6 * 4096 * 11008
    assert LLAVA_7B.decode_step_flops(700, 576, None) == 32 * linear + 32 * 4 * 4096 * 701
    assert LLAVA_7B.decode_step_flops(700, 576, 16) == 32 * linear + 16 * 4 * 4096 * 701 + 16 * 4 * 4096 * 125
    # fp16 cache, keys and values: 2 * 4096 values * 2 bytes per token and layer.
    assert LLAVA_7B.kv_cache_bytes(700, 576, None, 2) == 32 * 700 * 2 * 4096 * 2
    assert LLAVA_7B.kv_cache_bytes(700, 576, 16, 2) == (16 * 700 + 16 * 124) * 2 * 4096 * 2


def test_decode_step_bytes_by_hand():
    # fp16 weights: per layer q, k, v, o (4 x 4096^2) and the gated MLP (3 x 4096 x 11008); LM head 4096 x 32000.
    weights = 2 * (32 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000)
    cache = LLAVA_7B.kv_cache_bytes(700, 576, 16, 2)
    assert LLAVA_7B.decode_step_bytes(700, 576, 16, 2, batch_size=1, vocab_size=32000) == weights + cache
    assert LLAVA_7B.decode_step_bytes(700, 576, 16, 2, batch_size=8, vocab_size=32000) == weights + 8 * cache
    # At batch 1 the weights dominate: withdrawal saves a few percent of a step's traffic.
    full, vtw = (LLAVA_7B.decode_step_bytes(700, 576, k, 2, 1, 32000) for k in (None, 16))
    assert 1.0 < full / vtw < 1.05


def test_grouped_query_config_by_hand():
    config = Qwen2Config(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2
    )
    geometry = DecoderGeometry.from_config(config)
    assert (geometry.num_heads, geometry.num_kv_heads, geometry.head_dim) == (12, 2, 128)
    # q and o: 1536x1536 each; k and v: 1536x256 each; MLP: 3 x 1536x8960; 2 FLOPs per multiply-add.
    per_token = 2 * (2 * 1536 * 1536 + 2 * 1536 * 256 + 3 * 1536 * 8960)
    per_pair = 2 * 2 * 1536
    n, visual = 1200, 1000
    expected = 10 * (n * per_token + n * n * per_pair) + 18 * ((n - visual) * per_token + (n - visual) ** 2 * per_pair)
    assert geometry.prefill_flops(n, visual, 10) == expected
    assert geometry.kv_cache_bytes(n, visual, 10, 2) == (10 * n + 18 * (n - visual)) * 2 * 256 * 2


def test_geometry_from_a_multimodal_config():
    config = LlavaConfig(
        text_config={
            "model_type": "llama",
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
        }
    )
    assert DecoderGeometry.from_config(config) == LLAVA_7B


def test_out_of_range_layer_is_refused():
    with pytest.raises(ValueError, match="withdraw_layer must be in 0..32"):
        LLAVA_7B.prefill_flops(651, 576, 33)


@pytest.mark.parametrize("withdraw_layer", [1, "none"])
def test_recorded_figures_equal_the_real_cache(tiny_llava_path, tmp_path, withdraw_layer):
    accounting_file = tmp_path / "requests.jsonl"
    lm = backend(tiny_llava_path, withdraw_layer, batch_size=1, accounting_file=str(accounting_file))
    caches = []
    lm.model.register_forward_pre_hook(lambda m, a, kw: caches.append(cache_in(kw)), with_kwargs=True)
    request = generation_requests()[3]  # two images
    lm.generate_until([request])
    (record,) = [json.loads(line) for line in accounting_file.read_text().splitlines()]

    input_ids = lm.processor(
        images=request.args[2](lm.task_dict["tiny"]["test"][3]),
        text=[lm.build_prompt(request.args[0], request.args[2](lm.task_dict["tiny"]["test"][3]))],
        return_tensors="pt",
    )["input_ids"]
    assert record["prompt_tokens"] == input_ids.shape[1]
    assert record["visual_tokens"] == int((input_ids == lm.model.config.image_token_id).sum()) == 32
    layer = NUM_LAYERS if withdraw_layer == "none" else withdraw_layer
    assert record["withdraw_layer"] == layer
    assert record["kept_tokens"] == record["prompt_tokens"] - (32 if layer < NUM_LAYERS else 0)
    assert record["generated_tokens"] == len(caches)  # one forward per generated token
    key = "kv_cache_bytes_baseline" if withdraw_layer == "none" else "kv_cache_bytes_vtw"
    assert record[key] == cache_bytes(caches[-1])
    assert record["prefill_flops_baseline"] == DecoderGeometry.from_config(lm.model.config).prefill_flops(
        record["prompt_tokens"], 32, None
    )
    assert record["prefill_flops_vtw"] == DecoderGeometry.from_config(lm.model.config).prefill_flops(
        record["prompt_tokens"], 32, layer
    )
    assert record["batch_prefill_seconds"] > 0 and record["batch_decode_steps"] == len(caches) - 1
    whole = WholeModel.from_config(lm.model.config)
    assert record["prefill_flops_whole_model_baseline"] == whole.prefill_flops(record["prompt_tokens"], [16, 16], None)
    assert record["prefill_flops_whole_model_vtw"] == whole.prefill_flops(record["prompt_tokens"], [16, 16], layer)


@pytest.mark.cli
def test_results_json_holds_the_aggregates(tiny_llava_path, tmp_path):
    from vtw_eval.diff import efficiency_rows
    from vtw_eval.results import LMMS_EVAL_KEYS, THROUGHPUT_KEYS, load_run
    from vtw_eval.run import run_lmms_eval

    results_file = run_lmms_eval(
        "vtw_llava", f"pretrained={tiny_llava_path},withdraw_layer=1,device=cpu", "vtw_tiny_mme", tmp_path,
        "--batch_size", "4",
    )  # fmt: skip
    throughput = json.loads(results_file.read_text())["throughput"]
    (accounting,) = (tmp_path / "vtw_accounting").glob("*_rank0.jsonl")  # beside --output_path's results
    records = [json.loads(line) for line in accounting.read_text().splitlines()]
    assert len(records) == 16
    assert throughput["avg_withdraw_layer"] == 1
    assert throughput["avg_visual_tokens"] == 16
    assert 0 < throughput["avg_prefill_flops_whole_model_saved"] < throughput["avg_prefill_flops_saved"]
    mean_saved = sum(r["prefill_flops_saved"] for r in records) / 16
    assert throughput["avg_prefill_flops_saved"] == pytest.approx(mean_saved)
    assert 0 < mean_saved < 1
    assert throughput["avg_kv_cache_mb_vtw"] < throughput["avg_kv_cache_mb_baseline"]
    # lmms-eval's latency names, from the records' batch timings.
    assert throughput["avg_ttft"] == pytest.approx(sum(r["batch_prefill_seconds"] for r in records) / 16)
    decoding = [r["batch_decode_seconds"] / r["batch_decode_steps"] for r in records if r["generated_tokens"] > 1]
    assert decoding and throughput["avg_tpot"] == pytest.approx(sum(decoding) / len(decoding))
    assert throughput["avg_ttft"] != throughput["avg_tpot"]
    figures = {row["figure"]: row["values"][0] for row in efficiency_rows([load_run(results_file, "run")])}
    # vtw-diff knows every figure the backend logs (vtw_eval.results names them once).
    logged = {key.removeprefix("avg_") for key in throughput if "/" not in key and key not in LMMS_EVAL_KEYS}
    assert logged <= set(THROUGHPUT_KEYS) and "prefill_flops_saved" in logged
    for figure in ("ttft", "tpot", "total_gen_tokens", "total_elapsed_time", "avg_speed", "prefill_flops_saved"):
        assert figures[figure] is not None, figure
    assert figures["total_gen_tokens"] == sum(r["generated_tokens"] for r in records)


def test_whole_model_terms_by_hand(tiny_llava_path):
    from transformers import AutoConfig

    whole = WholeModel.from_config(AutoConfig.from_pretrained(tiny_llava_path))
    # Tiny CLIP: 32 px images, 8 px patches (16 patches + a class token = 17), width 32, MLP 64, 2 layers.
    convolution = 2 * 16 * (3 * 8 * 8) * 32
    layer = 8 * 17 * 32 * 32 + 4 * 17 * 32 * 64 + 4 * 17 * 17 * 32
    assert whole.image_flops() == convolution + 2 * layer
    assert whole.projector_flops(16) == 2 * 16 * (32 * 64 + 64 * 64)  # into the decoder's width 64
    assert whole.head_flops() == 2 * 64 * whole.vocab_size
    decoder = whole.decoder.prefill_flops(40, 32, 2)
    assert (
        whole.prefill_flops(40, [16, 16], 2)
        == 2 * whole.image_flops() + whole.projector_flops(32) + whole.head_flops() + decoder
    )
    assert WholeModel.from_config(Qwen2Config()) is None  # not a LLaVA-1.5: not modelled


@pytest.mark.parametrize("withdraw_layer", [None, 2, 0])
def test_whole_model_flops_equal_torchs_flop_counter(tiny_llava_path, withdraw_layer):
    """The whole prefill forward as generate runs it (logits_to_keep=1), counted by PyTorch: the
    counter sees every matrix product (convolution, linear layers, attention), as the model does."""
    from tiny_models import encode, load_model, withdrawal
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoProcessor

    model = load_model(tiny_llava_path, "eager")
    processor = AutoProcessor.from_pretrained(tiny_llava_path)
    inputs = encode(processor, [("Is there a red square ?", 2)])
    withdrawal(model, withdraw_layer)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs, use_cache=False, logits_to_keep=1)
    tokens = inputs["input_ids"].shape[1]
    whole = WholeModel.from_config(model.config)
    images = image_token_runs(inputs["input_ids"], model.config.image_token_id)[0]
    assert images == [32]  # two adjacent images of 16 tokens: one run; LLaVA counts images by their size
    assert counter.get_total_flops() == whole.prefill_flops(tokens, images, withdraw_layer)


def test_qwen2_vl_whole_model_terms_by_hand(tmp_path):
    from tiny_models import build_tiny_qwen2_vl
    from transformers import AutoConfig

    whole = whole_model_of(AutoConfig.from_pretrained(build_tiny_qwen2_vl(tmp_path / "qwen2_vl", "2")))
    assert isinstance(whole, Qwen2VLWholeModel)
    # Tiny Qwen2-VL ViT: width 32, MLP 64 (mlp_ratio 2), 1 block, 14 px patches over 2 frames,
    # 2x2 merge into the decoder's width 64. One image of 4 visual tokens = 16 patches.
    convolution = 2 * 16 * (3 * 2 * 14 * 14) * 32
    block = 8 * 16 * 32 * 32 + 4 * 16 * 32 * 64 + 4 * 16 * 16 * 32
    merger = 2 * 4 * 128 * 128 + 2 * 4 * 128 * 64
    assert whole.image_flops(4) == convolution + block + merger
    assert whole.prefill_flops(30, [4, 9], 1) == (
        whole.image_flops(4) + whole.image_flops(9) + 2 * 64 * whole.vocab_size + whole.decoder.prefill_flops(30, 13, 1)
    )
    assert whole_model_of(AutoConfig.from_pretrained(build_tiny_qwen2_vl(tmp_path / "qwen25", "2.5"))) is None


@pytest.mark.parametrize("withdraw_layer", [None, 2, 0])
def test_qwen2_vl_whole_model_flops_equal_torchs_flop_counter(tmp_path, withdraw_layer):
    """Two images of different sizes (so per-image attention counts), one prefill with
    logits_to_keep=1, counted by PyTorch."""
    from tiny_models import build_tiny_qwen2_vl, picture, withdrawal
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = build_tiny_qwen2_vl(tmp_path / "qwen2_vl", "2")
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(path)
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Is there a red square ?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [picture(0, size=(56, 56)), picture(1, size=(84, 112))]
    inputs = processor(images=images, text=[text], return_tensors="pt")
    withdrawal(model, withdraw_layer)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs, use_cache=False, logits_to_keep=1)
    image_tokens = image_token_runs(inputs["input_ids"], model.config.image_token_id)[0]
    assert image_tokens == (inputs["image_grid_thw"].prod(-1) // 4).tolist() and len(set(image_tokens)) == 2
    whole = whole_model_of(model.config)
    assert counter.get_total_flops() == whole.prefill_flops(inputs["input_ids"].shape[1], image_tokens, withdraw_layer)


QWEN3_5_4B = DecoderGeometry.from_config(
    __import__("transformers").Qwen3_5TextConfig(
        hidden_size=2560, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=16,
        num_key_value_heads=4, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
        linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
    )
)  # fmt: skip


def test_gated_deltanet_layers_by_hand():
    """Qwen3.5-4B's geometry: 24 Gated DeltaNet layers and 8 gated attention layers (every 4th)."""
    g = QWEN3_5_4B
    assert [g.is_linear(i) for i in range(4)] == [True, True, True, False] and g.attention_output_gate
    d, mlp = 2560, 6 * 2560 * 9216
    # Linear layer per token: qkv 2*d*(2*2048 + 4096), z 2*d*4096, a and b 2*d*32 each, out 2*4096*d;
    # the convolution, 2*4*8192 per output, computes 3 more outputs than tokens in prefill.
    linear_token = 2 * d * 8192 + 2 * d * 4096 + 2 * 2 * d * 32 + 2 * 4096 * d
    assert g.token_flops(0) == linear_token + mlp

    def conv(n):
        return 2 * 4 * 8192 * (n + 3)

    # Attention layer per token: q and its gate 2*d*2*4096, k and v 2*d*1024 each, o 2*4096*d.
    attention_token = 2 * d * 8192 + 2 * 2 * d * 1024 + 2 * 4096 * d
    assert g.token_flops(3) == attention_token + mlp
    # Delta rule over 700 tokens = 11 chunks of 64, per value head: 4*64^2*128 + 2*64^2*128 + 6*64*128^2.
    chunks = 32 * 11 * (4 * 64 * 64 * 128 + 2 * 64 * 64 * 128 + 6 * 64 * 128 * 128)
    assert g.layer_flops(700, 0) == 700 * (linear_token + mlp) + conv(700) + chunks
    assert g.layer_flops(700, 3) == 700 * (attention_token + mlp) + 700 * 700 * 4 * 4096
    one_chunk = 32 * (4 * 64 * 64 * 128 + 2 * 64 * 64 * 128 + 6 * 64 * 128 * 128)
    k8 = 6 * (700 * (linear_token + mlp) + conv(700) + 11 * one_chunk)
    k8 += 2 * (700 * (attention_token + mlp) + 700**2 * 4 * 4096)
    k8 += 18 * (124 * (linear_token + mlp) + conv(124) + 2 * one_chunk)
    k8 += 6 * (124 * (attention_token + mlp) + 124**2 * 4 * 4096)
    assert g.prefill_flops(700, 576, 8) == k8
    # Decoding after 700 tokens: a linear layer convolves its last 4 inputs, reads and writes its
    # state, 6*128*128 per value head.
    linear_step = linear_token + mlp + 2 * 4 * 8192 + 32 * 6 * 128 * 128
    assert g.decode_step_flops(700, 576, 8) == 24 * linear_step + 8 * (attention_token + mlp) + 4 * 4096 * (
        2 * 701 + 6 * 125
    )
    # The cache: keys and values of 8 attention layers; per linear layer 8192 conv channels x 4 inputs
    # (bf16) and 32 float32 states of 128 x 128, whatever K.
    states = 24 * (8192 * 4 * 2 + 32 * 128 * 128 * 4)
    assert g.recurrent_state_bytes(2) == states
    assert g.kv_cache_bytes(700, 576, None, 2) == 8 * 700 * 2 * 1024 * 2 + states
    assert g.kv_cache_bytes(700, 576, 0, 2) == 8 * 124 * 2 * 1024 * 2 + states


def test_mixture_of_experts_mlp_by_hand():
    from transformers import Qwen3_5MoeTextConfig, Qwen3VLMoeTextConfig

    vl = DecoderGeometry.from_config(
        Qwen3VLMoeTextConfig(hidden_size=2048, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=4,
                             head_dim=128, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                             mlp_only_layers=[1])
    )  # fmt: skip
    assert vl.expert_layers == (0, 2, 3) and not vl.attention_output_gate
    attention = 2 * 2048 * (2 * 4096 + 2 * 512)
    assert vl.token_flops(0) == attention + 2 * 2048 * 128 + 8 * 6 * 2048 * 768  # router, 8 active experts
    assert vl.token_flops(1) == attention + 6 * 2048 * vl.intermediate_size  # a dense layer
    moe = DecoderGeometry.from_config(
        Qwen3_5MoeTextConfig(hidden_size=2048, num_hidden_layers=4, moe_intermediate_size=512, num_experts=256,
                             num_experts_per_tok=8, shared_expert_intermediate_size=512)
    )  # fmt: skip
    shared = 6 * 2048 * 512 + 2 * 2048  # the shared expert and its one-output gate
    assert moe.mlp_flops(0) == 2 * 2048 * 256 + 8 * 6 * 2048 * 512 + shared


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"])
def test_qwen3_whole_model_flops_equal_torchs_flop_counter(tmp_path, family):
    """Qwen3-VL's ViT with its DeepStack mergers, Qwen3.5's Gated DeltaNet layers (a prompt over
    two chunks of the delta rule), the experts: one prefill with logits_to_keep=1 at K = 2,
    counted by PyTorch."""
    from tiny_models import build_tiny_qwen3, picture, withdrawal
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = build_tiny_qwen3(tmp_path / family, family)
    # Eager experts: one matrix product per expert, which the counter sees (grouped kernels it does not).
    model = AutoModelForImageTextToText.from_pretrained(
        path, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    # transformers 5.25 hands Qwen3.5's conv1d weight to a function as an input: the counter's
    # module tracker then hooks the gradient of a leaf parameter and fails (torch asserts a grad_fn).
    model.requires_grad_(False)
    processor = AutoProcessor.from_pretrained(path)
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Is there a red square ? " * 12}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [picture(0, size=(64, 64)), picture(1, size=(96, 128))]
    inputs = processor(images=images, text=[text], return_tensors="pt")
    withdrawal(model, 2)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs, use_cache=False, logits_to_keep=1)
    image_tokens = image_token_runs(inputs["input_ids"], model.config.image_token_id)[0]
    assert image_tokens == (inputs["image_grid_thw"].prod(-1) // 4).tolist() and len(set(image_tokens)) == 2
    tokens = inputs["input_ids"].shape[1]
    assert tokens - sum(image_tokens) > 64  # the kept tokens span two chunks of the delta rule
    whole = whole_model_of(model.config)
    assert whole.mergers == (4 if family.startswith("qwen3_vl") else 1)
    assert counter.get_total_flops() == whole.prefill_flops(tokens, image_tokens, 2)


@pytest.mark.parametrize("withdraw_layer", [1, "none"])
def test_qwen3_5_recorded_cache_equals_the_real_cache(tmp_path, withdraw_layer):
    """Keys and values of the attention layer (kept tokens only from K on) and the fixed-size
    states of the three Gated DeltaNet layers, bfloat16 with float32 recurrent states."""
    from lmms_eval.api.instance import Instance
    from tiny_models import build_tiny_qwen3, picture

    from vtw_eval.backends.qwen3_5 import VTWQwen3_5

    accounting_file = tmp_path / "requests.jsonl"
    lm = VTWQwen3_5(
        pretrained=str(build_tiny_qwen3(tmp_path / "model", "qwen3_5")), withdraw_layer=withdraw_layer,
        device="cpu", dtype="bfloat16", accounting_file=str(accounting_file),
    )  # fmt: skip
    caches = []
    lm.model.register_forward_pre_hook(lambda m, a, kw: caches.append(cache_in(kw)), with_kwargs=True)
    lm.task_dict = {"tiny": {"test": [{"image": picture(0, (96, 64))}]}}
    arguments = ("Is it red ?", {"max_new_tokens": 4, "temperature": 0}, lambda doc: [doc["image"]], 0, "tiny", "test")
    lm.generate_until(
        [Instance("generate_until", arguments, idx=0, metadata={"task": "tiny", "doc_id": 0, "repeats": 1})]
    )
    (record,) = [json.loads(line) for line in accounting_file.read_text().splitlines()]
    geometry = DecoderGeometry.from_config(lm.model.config)
    assert record["recurrent_state_bytes"] == geometry.recurrent_state_bytes(2) > 0
    key = "kv_cache_bytes_baseline" if withdraw_layer == "none" else "kv_cache_bytes_vtw"
    assert record[key] == cache_bytes(caches[-1])
    if withdraw_layer == 1:  # the attention layer's keys shrink; the states do not
        saved = record["kv_cache_bytes_baseline"] - record["kv_cache_bytes_vtw"]
        assert saved == record["visual_tokens"] * 2 * 2 * 16 * 2  # K=1: layer 3's keys and values, 2 heads of 16


@pytest.mark.parametrize("withdraw_layer", [1, "none"])
def test_gemma3_recorded_cache_equals_the_real_cache(tmp_path, withdraw_layer):
    """Gemma 3's sliding layers (window 8) keep their last 7 tokens whatever the prompt's length,
    its full-attention layer every token (the kept ones from K on)."""
    from lmms_eval.api.instance import Instance
    from tiny_models import build_tiny_gemma3, picture

    from vtw_eval.backends.gemma3 import VTWGemma3

    accounting_file = tmp_path / "requests.jsonl"
    lm = VTWGemma3(
        pretrained=str(build_tiny_gemma3(tmp_path / "model")), withdraw_layer=withdraw_layer, device="cpu",
        accounting_file=str(accounting_file),
    )  # fmt: skip
    caches = []
    lm.model.register_forward_pre_hook(lambda m, a, kw: caches.append(cache_in(kw)), with_kwargs=True)
    lm.task_dict = {"tiny": {"test": [{"image": picture(0)}]}}
    arguments = ("Is it red ?", {"max_new_tokens": 4}, lambda doc: [doc["image"]], 0, "tiny", "test")
    request = Instance("generate_until", arguments, idx=0, metadata={"task": "tiny", "doc_id": 0, "repeats": 1})
    lm.generate_until([request])
    (record,) = [json.loads(line) for line in accounting_file.read_text().splitlines()]
    lengths = [layer.keys.shape[-2] for layer in caches[-1].layers]
    assert record["prompt_tokens"] > 8 and lengths[:3] == [7, 7, 7]
    # The processor pads the prompt to a multiple of 8 (as lmms-eval's gemma3 has it); the records
    # count each request's own tokens, so the padding the full-attention layer caches is left out.
    kept = record["kept_tokens"] if withdraw_layer == 1 else record["prompt_tokens"]
    padding = lengths[3] - (kept + record["generated_tokens"] - 1)
    assert padding == -record["prompt_tokens"] % 8
    key = "kv_cache_bytes_baseline" if withdraw_layer == "none" else "kv_cache_bytes_vtw"
    assert record[key] == cache_bytes(caches[-1]) - padding * 2 * 2 * 16 * 4
    if withdraw_layer == 1:  # only the full-attention layer's cache shrinks
        saved = record["kv_cache_bytes_baseline"] - record["kv_cache_bytes_vtw"]
        assert saved == record["visual_tokens"] * 2 * 2 * 16 * 4  # float32: 2 kv heads of 16, keys and values


# Visual tokens of a 64 x 40 picture, by hand. SmolVLM: 2 x 2 tiles of 32 px and the global image,
# 4 tokens each (pixel shuffle of 4 x 4 patches). Mistral 3: padded to 64 x 48 pixels, 8 px patches
# merged 2 x 2, so 4 columns x 3 rows of [IMG] (the rows' break and end tokens are not visual).
# Llama 4: 2 x 2 tiles of 32 px and the global image, 4 <|patch|> tokens each (pixel shuffle of 4 x 4 patches).
# Gemma 4 at lmms-eval's budget of 280 soft tokens: resized keeping its shape to the most 8 px patches
# within 4 x 280, sides multiples of 16 (336 x 208), then pooled 2 x 2: 21 x 13.
VISUAL_TOKENS_OF_A_64_BY_40_PICTURE = {"smolvlm": 20, "mistral3": 12, "llama4": 20, "gemma4": 273}


@pytest.mark.parametrize("family", sorted(VISUAL_TOKENS_OF_A_64_BY_40_PICTURE))
@pytest.mark.parametrize("withdraw_layer", [1, "none"])
def test_recorded_cache_of_newer_families_equals_the_real_cache(tmp_path, family, withdraw_layer):
    """Through their backends: only the tokens holding visual embeddings count as visual (SmolVLM's
    row/column markers and Mistral 3's row breaks stay), and every layer caches every token below
    K, the kept ones from K on."""
    from lmms_eval.api.instance import Instance
    from tiny_models import BUILDERS, adapter_for, picture
    from transformers import AutoConfig

    accounting_file = tmp_path / "requests.jsonl"
    path = BUILDERS[family](tmp_path / "model")
    backend = adapter_for(AutoConfig.from_pretrained(path))
    lm = backend(
        pretrained=str(path), withdraw_layer=withdraw_layer, device="cpu", accounting_file=str(accounting_file)
    )
    caches, lengths = [], []
    lm.model.register_forward_pre_hook(
        lambda m, a, kw: caches.append(cache_in(kw)) or lengths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    lm.task_dict = {"tiny": {"test": [{"image": picture(0, (64, 40))}]}}
    arguments = ("Is it red ?", {"max_new_tokens": 4}, lambda doc: [doc["image"]], 0, "tiny", "test")
    request = Instance("generate_until", arguments, idx=0, metadata={"task": "tiny", "doc_id": 0, "repeats": 1})
    lm.generate_until([request])
    (record,) = [json.loads(line) for line in accounting_file.read_text().splitlines()]
    visual = VISUAL_TOKENS_OF_A_64_BY_40_PICTURE[family]
    withdrawn = visual if withdraw_layer == 1 else 0
    assert record["visual_tokens"] == visual and record["kept_tokens"] == record["prompt_tokens"] - withdrawn
    # Gemma 4's processor pads prompts to a multiple of 8 tokens; the records count no padding.
    padding = lengths[0] - record["prompt_tokens"]
    assert padding == (0 if family != "gemma4" else -record["prompt_tokens"] % 8)
    seen = lengths[0] + record["generated_tokens"] - 1
    expected = [seen] + [seen - withdrawn] * (NUM_LAYERS - 1)
    text = lm.model.config.get_text_config()
    for layer, kind in enumerate(getattr(text, "layer_types", None) or []):
        if kind == "chunked_attention":  # Llama 4's chunked layers keep their last chunk - 1 tokens
            expected[layer] = min(expected[layer], text.attention_chunk_size - 1)
        if kind == "sliding_attention":  # Gemma 4's sliding layers their last window - 1
            expected[layer] = min(expected[layer], text.sliding_window - 1)
    # Gemma 4's KV-shared layers cache nothing: their keys are counted once, in their producers.
    producers = lm.architecture.key_producers(text)
    expected = [length for layer, length in enumerate(expected) if producers[layer] is None]
    cached = [layer for layer in caches[-1].layers if layer.keys is not None]
    assert [layer.keys.shape[-2] for layer in cached] == expected
    key = "kv_cache_bytes_baseline" if withdraw_layer == "none" else "kv_cache_bytes_vtw"
    # Padding's keys and values sit in the layers that keep every token (not in a full window).
    per_token = [2 * layer.keys[:, :, :1].numel() * layer.keys.element_size() for layer in cached]
    kinds = [kind for layer, kind in enumerate(layer_types(text)) if producers[layer] is None]
    padded = sum(size for size, kind in zip(per_token, kinds) if kind == "full_attention")
    assert record[key] == cache_bytes(caches[-1]) - padding * padded


@pytest.mark.parametrize(
    "family", ["gemma3", "glm4v", "internvl", "smolvlm", "mistral3", "llama4", "gemma4", "gemma4_moe"]
)
def test_decoder_flops_of_families_without_tower_model_equal_torchs_flop_counter(tmp_path, family):
    """The decoder layers' prefill at K = 2, counted by PyTorch per layer (eager attention: the
    full n x n products, as the cost model counts them, sliding windows included). Their towers are
    not modelled: no whole-forward figures."""
    import re

    from tiny_models import BUILDERS, MOE_BUILDERS, encode, withdrawal
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = {**BUILDERS, **MOE_BUILDERS}[family](tmp_path / family)
    # Experts one by one (transformers' default groups them in one _grouped_mm, which PyTorch's
    # counter does not count).
    model = AutoModelForImageTextToText.from_pretrained(
        path, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    inputs = encode(AutoProcessor.from_pretrained(path), [("Is there a red square in the image ? Say yes or no .", 2)])
    engine = withdrawal(model, 2)
    tokens = inputs["input_ids"].shape[1]
    visual = int(torch.isin(inputs["input_ids"], torch.tensor(engine.visual_token_ids)).sum())
    assert 0 < visual < tokens
    # Gemma 4's layers 2 and 3 read the keys of 0 and 1: K = 1 splits them (one reads every token's
    # keys, one the kept ones); generate's last logit only (its KV-shared layers then run on the last
    # position), or every logit.
    cases = [(2, 1), (1, 1), (1, 0)] if family == "gemma4" else [(2, 1)]
    for withdraw_layer, logits_to_keep in cases:
        engine.withdraw_layer = withdraw_layer
        with FlopCounterMode(display=False, depth=10) as counter, torch.no_grad():
            model(**inputs, use_cache=False, logits_to_keep=logits_to_keep)
        layers = [
            name
            for name in counter.get_flop_counts()
            if re.search(r"\.(language|text)_model(\.model)?\.layers\.\d+$", name)
        ]
        assert len(layers) == NUM_LAYERS
        decoder = sum(sum(counter.get_flop_counts()[name].values()) for name in layers)
        expected = DecoderGeometry.from_config(model.config).prefill_flops(
            tokens, visual, withdraw_layer, every_position=logits_to_keep == 0
        )
        assert decoder == expected, (withdraw_layer, logits_to_keep)
    assert whole_model_of(model.config) is None
