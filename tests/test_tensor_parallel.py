"""Past one device: tensor parallelism through transformers' `tp_plan`, and the attention contract vLLM's Transformers
backend relies on. Distributed on CPU: 2 processes over gloo (torchrun), as the other distributed tests.

One launch of tests/tp_worker.py loads every case sharded (`tp_plan="auto"`), generates, saves, and trains; the same
worker run in this process gives the one-process reference."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import hf_blueprint
from hf_blueprint.tokenizer import train_tokenizer

from conftest import random_ids

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
import tp_worker  # noqa: E402

TOLERANCE = 1e-5
TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            hidden_dropout_prob=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64,
            initializer_range=0.2)
CASES = {
    # name: (head, config class, switches)
    "paper-decoder": ("causal_lm", hf_blueprint.BlueprintDecoderConfig, {}),
    "paper-encoder": ("masked_lm", hf_blueprint.BlueprintEncoderConfig, {}),
    "paper-seq2seq": ("seq2seq", hf_blueprint.BlueprintSeq2SeqConfig, {"decoder_start_token_id": 1}),
    "llama-style": ("causal_lm", hf_blueprint.BlueprintDecoderConfig,
                    dict(position_embedding_type="rope", norm_position="pre", norm_type="rmsnorm", ffn_type="glu",
                         hidden_act="silu", attention_bias=False, mlp_bias=False)),
    "gqa-untied": ("causal_lm", hf_blueprint.BlueprintDecoderConfig,
                   dict(num_key_value_heads=2, tie_word_embeddings=False, position_embedding_type="rope")),
    "alibi": ("causal_lm", hf_blueprint.BlueprintDecoderConfig, dict(position_embedding_type="alibi")),
}
MODEL_CLASSES = {"causal_lm": hf_blueprint.BlueprintDecoderForCausalLM,
                 "masked_lm": hf_blueprint.BlueprintEncoderForMaskedLM,
                 "seq2seq": hf_blueprint.BlueprintForConditionalGeneration}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tp")
    cases = []
    for name, (head, config_class, switches) in CASES.items():
        torch.manual_seed(0)
        model = MODEL_CLASSES[head](config_class(**{**TINY, **switches}))
        model.save_pretrained(root / name)
        cases.append({"name": name, "head": head, "folder": str(root / name), "vocab_size": TINY["vocab_size"],
                      "save_to": str(root / f"{name}-saved") if name == "llama-style" else None,
                      "train": name == "llama-style"})
    torch.manual_seed(0)
    hf_blueprint.BlueprintDecoderForCausalLM(hf_blueprint.BlueprintDecoderConfig(
        **{**TINY, "hidden_size": 48, "num_attention_heads": 3})).save_pretrained(root / "three-heads")
    # The recipe's case: a character model with its tokenizer, as a recipe saves one.
    text = (ROOT / "recipes/data/tinyshakespeare/input.txt").read_text(encoding="utf-8")[:4000]
    (root / "text.txt").write_text(text)
    tokenizer = train_tokenizer([text], tokenizer_type="char", family="decoder")
    torch.manual_seed(0)
    recipe_model = hf_blueprint.BlueprintDecoderForCausalLM(hf_blueprint.BlueprintDecoderConfig(**{
        **TINY, **CASES["llama-style"][2], "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}))
    recipe_model.save_pretrained(root / "recipe-model")
    tokenizer.save_pretrained(root / "recipe-model")
    plan = {"cases": cases, "input_ids": random_ids(2, 7, low=3, high=64).tolist(), "steps": 4,
            "output_dir": str(root), "indivisible_folder": str(root / "three-heads"),
            "recipe_model": str(root / "recipe-model"), "recipe_text": str(root / "text.txt")}
    plan_file = root / "plan.json"
    plan_file.write_text(json.dumps(plan))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(TESTS / "tp_worker.py"), str(plan_file)],
        capture_output=True, text=True, timeout=600, env=environment, cwd=root,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    tp_worker.main(str(plan_file))  # the one-process reference, in this process
    return {"tp": torch.load(root / "results-tp.pt", weights_only=False),
            "single": torch.load(root / "results-single.pt", weights_only=False), "root": root}


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_logits_equal_one_process(launch, name):
    assert launch["tp"][name]["sharded"] and not launch["single"][name]["sharded"]
    torch.testing.assert_close(launch["tp"][name]["logits"], launch["single"][name]["logits"], atol=TOLERANCE,
                               rtol=0)


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case[0] != "masked_lm"])
def test_sharded_greedy_generation_equals_one_process(launch, name):
    assert torch.equal(launch["tp"][name]["generated"], launch["single"][name]["generated"])


def test_folder_saved_from_the_sharded_model_loads_unchanged_on_one_process(launch):
    root = launch["root"]
    original = load_file(root / "llama-style" / "model.safetensors")
    saved = load_file(root / "llama-style-saved" / "model.safetensors")
    # transformers' sharded save writes a tied output layer as its own tensor (native Llama does the same): the
    # only extra key is lm_head, holding the embedding.
    assert set(saved) - set(original) <= {"lm_head.weight"} and set(original) <= set(saved)
    if "lm_head.weight" in saved:
        assert torch.equal(saved["lm_head.weight"], original["model.embed_tokens.weight"])
    reloaded = AutoModelForCausalLM.from_pretrained(root / "llama-style-saved")
    for name, tensor in original.items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


@pytest.mark.parametrize("loop", ["plain_loop", "trainer"])
def test_sharded_training_ends_with_the_losses_and_weights_of_one_process(launch, loop):
    sharded, single = launch["tp"]["llama-style"][loop], launch["single"]["llama-style"][loop]
    assert len(sharded["losses"]) == len(single["losses"]) == 4
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(single["losses"]), atol=TOLERANCE,
                               rtol=0)
    assert sharded["weights"].keys() == single["weights"].keys()
    for name, weight in sharded["weights"].items():
        difference = (weight - single["weights"][name]).abs().max().item()
        assert difference <= TOLERANCE, (name, difference)
    if loop == "trainer":
        assert sharded["tp_size"] == 2 and single["tp_size"] == 1


def test_the_causal_lm_recipe_trains_with_tensor_parallelism_as_one_process(launch):
    sharded, single = launch["tp"]["recipe"], launch["single"]["recipe"]
    assert sharded["train_loss"] == pytest.approx(single["train_loss"], abs=TOLERANCE)
    # The sharded save writes the tied output layer too (see the test above): the embedding, again.
    assert set(sharded["weights"]) - set(single["weights"]) <= {"lm_head.weight"}
    if "lm_head.weight" in sharded["weights"]:
        assert torch.equal(sharded["weights"]["lm_head.weight"], sharded["weights"]["model.embed_tokens.weight"])
    for name, weight in single["weights"].items():
        weight, expected = sharded["weights"][name], weight
        difference = (weight - expected).abs().max().item()
        assert difference <= TOLERANCE, (name, difference)


def test_heads_that_do_not_divide_over_the_ranks_are_refused_before_loading(launch):
    message = launch["tp"]["indivisible"]
    assert "num_attention_heads=3" in message and "tp_size=2" in message
    assert launch["single"]["indivisible"] == "loaded"


# -- the plans -------------------------------------------------------------------------------------------------------


def _names_a_module(rule: str, module_names: list[str]) -> bool:
    parts = rule.split(".")
    return any(len(parts) == len(name.split(".")) and all(
        p == n or (p == "*" and n.isdigit()) for p, n in zip(parts, name.split("."))) for name in module_names)


@pytest.mark.parametrize("name", list(CASES))
def test_every_tp_rule_names_a_module_and_every_projection_has_one(name):
    head, config_class, switches = CASES[name]
    model = MODEL_CLASSES[head](config_class(**{**TINY, **switches}))
    modules = [module_name for module_name, _ in model.named_modules()]
    assert all(_names_a_module(rule, modules) for rule in model.tp_plan), model.tp_plan
    projections = [module_name for module_name in modules if module_name.rsplit(".", 1)[-1] in
                   ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
    assert projections and all(any(_names_a_module(rule, [module]) for rule in model.tp_plan) for module in projections)
    assert model.tp_plan["lm_head"] == "colwise_gather_output"


def test_pipeline_plan_names_the_trunk_stages():
    config = hf_blueprint.BlueprintDecoderConfig(**TINY)
    assert list(config.base_model_pp_plan) == ["embed_tokens", "layers", "norm"]
    assert hf_blueprint.BlueprintDecoderForCausalLM(config).pp_plan["lm_head"] == (["hidden_states"], ["logits"])


# -- the attention contract of vLLM's Transformers backend ----------------------------------------------------------


@pytest.mark.parametrize("family", ["encoder", "decoder", "decoder-gqa-window"])
def test_a_registered_attention_function_serves_every_layer_as_sdpa_does(family):
    calls = []

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append({"layer": module.layer_idx, "is_causal": module.is_causal, "query": tuple(query.shape),
                      "key": tuple(key.shape), "scaling": kwargs.get("scaling"),
                      "sliding_window": kwargs.get("sliding_window")})
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    # A backend registers its attention function and, unless it builds its own masks (vLLM does), a mask function.
    AttentionInterface.register("blueprint_test_recording", recording_attention)
    AttentionMaskInterface.register("blueprint_test_recording", sdpa_mask)
    switches = {"encoder": {}, "decoder": {}, "decoder-gqa-window": dict(num_key_value_heads=2, sliding_window=3)}
    config_class = hf_blueprint.BlueprintEncoderConfig if family == "encoder" else hf_blueprint.BlueprintDecoderConfig
    model_class = hf_blueprint.BlueprintEncoderModel if family == "encoder" else hf_blueprint.BlueprintDecoderModel
    config = config_class(**{**TINY, **switches[family]})
    torch.manual_seed(0)
    recorded = model_class._from_config(config, attn_implementation="blueprint_test_recording").eval()
    reference = model_class._from_config(config_class(**{**TINY, **switches[family]}),
                                         attn_implementation="sdpa").eval()
    reference.load_state_dict(recorded.state_dict())
    ids = random_ids(2, 6, low=3, high=64)
    with torch.no_grad():
        torch.testing.assert_close(recorded(ids).last_hidden_state, reference(ids).last_hidden_state, atol=0, rtol=0)
    assert [call["layer"] for call in calls] == [0, 1]
    kv_heads = config.num_key_value_heads
    for call in calls:
        assert call["is_causal"] == (family != "encoder")
        assert call["query"] == (2, 4, 6, 8) and call["key"] == (2, kv_heads, 6, 8)
        assert call["scaling"] == 8 ** -0.5 and call["sliding_window"] == config.sliding_window


def test_alibi_is_refused_by_an_attention_backend_that_cannot_add_a_bias():
    AttentionInterface.register("blueprint_test_plain", sdpa_attention_forward)
    config = hf_blueprint.BlueprintDecoderConfig(**{**TINY, "position_embedding_type": "alibi"})
    model = hf_blueprint.BlueprintDecoderModel._from_config(config, attn_implementation="blueprint_test_plain")
    with pytest.raises(ValueError, match="alibi.*'blueprint_test_plain'.*sdpa"):
        model(random_ids(1, 4, low=3, high=64))


@pytest.mark.parametrize("switches", [dict(sliding_window=2, attention_dilation=2),
                                      dict(sliding_window=2, global_attention_tokens=1)])
def test_sparse_patterns_are_refused_by_a_backend_that_would_run_a_plain_window(switches):
    AttentionInterface.register("blueprint_test_plain", sdpa_attention_forward)
    config = hf_blueprint.BlueprintDecoderConfig(**{**TINY, **switches})
    model = hf_blueprint.BlueprintDecoderModel._from_config(config, attn_implementation="blueprint_test_plain")
    with pytest.raises(ValueError, match="'blueprint_test_plain' would attend to a plain window"):
        model(random_ids(1, 4, low=3, high=64))
