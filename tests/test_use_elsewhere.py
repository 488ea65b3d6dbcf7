"""Using a Blueprint model with the tools people already use, each checked against PyTorch (not just "it ran"):

- serving: `python -m hf_blueprint.serve` (transformers' own OpenAI-compatible server) answers completion, chat and
  streaming requests with the text of `generate()`'s greedy decoding;
- ONNX: `python -m hf_blueprint.export onnx` graphs match PyTorch to 1e-4 (fp32), and greedy decoding in
  onnxruntime (causal LM and encoder-decoder, with a key/value cache) gives `generate()`'s tokens;
- torch.export with a static cache (the ExecuTorch path): the saved program's greedy tokens are `generate()`'s;
- PEFT: `LoraConfig()` / `IA3Config()` without target_modules build and train;
- lm-evaluation-harness on the local tasks: its perplexity and accuracy equal the same quantities computed with the
  model directly on the same tokens.

Each group skips, naming the missing package, when what it needs is not installed (`pip install "hf_blueprint[use]"`).
Every model is tiny and built here. The slower exports (the other ONNX heads, fp16, the encoder-decoder's static
cache, ExecuTorch .pte files) run with BLUEPRINT_RUN_ALL_EXPORTS=1.
"""

import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import TINY, build_tokenizer, random_ids
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_blueprint


REPO = Path(__file__).resolve().parents[1]
USE_EXTRA = 'pip install "hf_blueprint[use]"'


def requires(*modules: str):
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed ({USE_EXTRA})")


requires_onnx = requires("onnx", "onnxscript", "onnxruntime")
SERVING_PACKAGES = ("fastapi", "uvicorn", "openai")
requires_serving = requires(*SERVING_PACKAGES)
requires_peft = requires("peft")
requires_lm_eval = requires("lm_eval")
RUN_ALL_EXPORTS = os.environ.get("BLUEPRINT_RUN_ALL_EXPORTS", "") in ("1", "true")
every_export = pytest.mark.skipif(not RUN_ALL_EXPORTS, reason="about 10 s per export, over this suite's budget: set "
                                                              "BLUEPRINT_RUN_ALL_EXPORTS=1 to run it")

# Untied output layer: with tied embeddings these tiny random models repeat one token, and a comparison of greedy
# outputs would hardly test anything (each fixture checks that its outputs vary).
UNTIED = dict(tie_word_embeddings=False)


def save(model, folder: Path, tokenizer=None) -> Path:
    model.save_pretrained(folder)
    (tokenizer or build_tokenizer()).save_pretrained(folder)
    return folder


def build(cls_name: str, seed: int = 1, **overrides):
    config_class = {"BlueprintEncoder": hf_blueprint.BlueprintEncoderConfig,
                    "BlueprintDecoder": hf_blueprint.BlueprintDecoderConfig}
    family = "BlueprintEncoder" if cls_name.startswith("BlueprintEncoder") else "BlueprintDecoder"
    torch.manual_seed(seed)
    return getattr(hf_blueprint, cls_name)(config_class[family](**{**TINY, **UNTIED, **overrides})).eval()


def build_seq2seq(seed: int = 1, **overrides):
    torch.manual_seed(seed)
    config = hf_blueprint.BlueprintSeq2SeqConfig(**{**TINY, **UNTIED, "decoder_start_token_id": TINY["bos_token_id"],
                                                    **overrides})
    return hf_blueprint.BlueprintForConditionalGeneration(config).eval()


def new_tokens(sequences: torch.Tensor, prompt_length: int, eos: int) -> list[list[int]]:
    """The generated tokens of each row, up to its first EOS."""
    rows = []
    for row in sequences[:, prompt_length:].tolist():
        rows.append(row[: row.index(eos)] if eos in row else row)
    return rows


def assert_varied(rows: list[list[int]], at_least: int = 3):
    """A comparison of greedy outputs tests something only if the outputs are not one repeated token."""
    assert all(len(set(row)) >= at_least for row in rows), f"test model output too uniform: {rows}"


# ---------------------------------------------------------------------------------------------------------------------
# Chat template (hf_blueprint.chat)
# ---------------------------------------------------------------------------------------------------------------------


def test_default_chat_template_writes_role_tagged_turns_and_the_generation_prompt():
    from hf_blueprint.chat import install_chat_template

    tokenizer = install_chat_template(build_tokenizer())
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "dog"}]  # OpenAI-style content parts
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"},
                    {"role": "assistant", "content": "sat"}, {"role": "user", "content": parts}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert text == "System: be brief\nUser: the cat\nAssistant: sat</s>\nUser: a dog\nAssistant:"
    assert not tokenizer.apply_chat_template(conversation, tokenize=False).endswith("Assistant:")


def test_a_broken_chat_template_is_refused_when_installed():
    from hf_blueprint.chat import install_chat_template

    tokenizer = build_tokenizer()
    with pytest.raises(ValueError, match="chat template"):
        install_chat_template(tokenizer, "{% for m in messages %}{{ m.missing() }}{% endfor %}")
    assert tokenizer.chat_template is None


def test_chat_command_installs_the_default_template_into_a_saved_tokenizer(tmp_path):
    from hf_blueprint.chat import DEFAULT_CHAT_TEMPLATE, main

    build_tokenizer().save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="unknown token"):
        assert main([str(tmp_path)]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == DEFAULT_CHAT_TEMPLATE
    assert main([str(tmp_path / "missing")]) == 2


# ---------------------------------------------------------------------------------------------------------------------
# ONNX: python -m hf_blueprint.export onnx
# ---------------------------------------------------------------------------------------------------------------------


def export_onnx(folder: Path, out: Path, *extra: str) -> Path:
    from hf_blueprint.export import main

    assert main(["onnx", str(folder), str(out), *extra]) == 0
    return out


def padded_batch(rows: list[int], length: int, left: bool, seed: int = 5):
    ids = random_ids(len(rows), length, seed=seed)
    mask = torch.zeros_like(ids)
    for row, real in enumerate(rows):
        if left:
            mask[row, length - real:] = 1
        else:
            mask[row, :real] = 1
    return ids.masked_fill(mask == 0, TINY["pad_token_id"]), mask


def onnx_session(path: Path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def causal_lm_onnx(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal_onnx")
    model = build("BlueprintDecoderForCausalLM", position_embedding_type="rope", num_key_value_heads=2)
    folder = save(model, root / "model")
    return model, export_onnx(folder, root / "onnx")


@requires_onnx
def test_onnx_causal_lm_has_named_inputs_outputs_and_dynamic_axes(causal_lm_onnx):
    _, out = causal_lm_onnx
    session = onnx_session(out / "model.onnx")
    inputs = {node.name: node.shape for node in session.get_inputs()}
    outputs = {node.name: node.shape for node in session.get_outputs()}
    layers = TINY["num_hidden_layers"]
    cache = [f"{layer}.{kind}" for layer in range(layers) for kind in ("key", "value")]
    assert list(inputs) == ["input_ids", "attention_mask", *(f"past_key_values.{name}" for name in cache)]
    assert list(outputs) == ["logits", *(f"present.{name}" for name in cache)]
    assert inputs["input_ids"] == ["batch", "sequence_length"]
    assert inputs["past_key_values.0.key"] == ["batch", 2, "past_sequence_length", TINY["hidden_size"] // 4]
    assert outputs["logits"] == ["batch", "sequence_length", TINY["vocab_size"]]


@requires_onnx
def test_onnx_causal_lm_step_matches_pytorch(causal_lm_onnx):
    model, out = causal_lm_onnx
    ids, mask = padded_batch([6, 3], 6, left=True)
    session = onnx_session(out / "model.onnx")
    empty = torch.zeros(2, 2, 0, model.config.head_dim).numpy()
    feed = {node.name: empty for node in session.get_inputs() if node.name.startswith("past_key_values.")}
    logits, *present = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), **feed})
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, use_cache=True)
    # Compared at real tokens: a left-padded position attends to nothing and its output is never read.
    real = mask.bool()
    torch.testing.assert_close(torch.from_numpy(logits)[real], expected.logits[real], atol=1e-4, rtol=1e-4)
    for layer in range(model.config.num_hidden_layers):
        keys = torch.from_numpy(present[2 * layer]).transpose(1, 2)[real]
        torch.testing.assert_close(keys, expected.cache.layers[layer].keys.transpose(1, 2)[real], atol=1e-4,
                                   rtol=1e-4)


@requires_onnx
def test_onnx_greedy_loop_with_cache_gives_generates_tokens(causal_lm_onnx):
    from hf_blueprint.export import onnx_generate

    model, out = causal_lm_onnx
    ids, mask = padded_batch([5, 3], 5, left=True, seed=3)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert_varied(new_tokens(expected, 5, model.config.eos_token_id))
    got = onnx_generate(out, ids, mask, max_new_tokens=10)
    assert got.tolist() == expected.tolist()


@requires_onnx
def test_onnx_encoder_head_matches_pytorch_with_padding(tmp_path):
    model = build("BlueprintEncoderForSequenceClassification", num_labels=3, classifier_pooling="mean")
    out = export_onnx(save(model, tmp_path / "model"), tmp_path / "onnx")
    session = onnx_session(out / "model.onnx")
    assert [node.name for node in session.get_inputs()] == ["input_ids", "attention_mask"]
    for rows, length in (([4, 2, 4], 4), ([9, 5], 9)):  # other batch sizes and lengths than the traced ones
        ids, mask = padded_batch(rows, length, left=False)
        (logits,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            expected = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-4, rtol=1e-4)


@requires_onnx
def test_onnx_encoder_decoder_greedy_loop_gives_generates_tokens(tmp_path):
    from hf_blueprint.export import onnx_generate

    model = build_seq2seq(decoder_layers=3, position_embedding_type="learned")
    out = export_onnx(save(model, tmp_path / "model"), tmp_path / "onnx")
    assert sorted(path.name for path in out.glob("*.onnx")) == ["decoder_model.onnx", "encoder_model.onnx"]
    source, source_mask = padded_batch([6, 4], 6, left=False, seed=7)
    expected = model.generate(source, attention_mask=source_mask, max_new_tokens=10, do_sample=False)
    assert_varied(new_tokens(expected, 1, model.config.eos_token_id))
    assert onnx_generate(out, source, source_mask, max_new_tokens=10).tolist() == expected.tolist()
    (states,) = onnx_session(out / "encoder_model.onnx").run(
        ["last_hidden_state"], {"input_ids": source.numpy(), "attention_mask": source_mask.numpy()})
    with torch.no_grad():
        expected_states = model.get_encoder()(source, attention_mask=source_mask).last_hidden_state
    torch.testing.assert_close(torch.from_numpy(states), expected_states, atol=1e-4, rtol=1e-4)


HEADS = [
    ("BlueprintEncoderForMaskedLM", {}),
    ("BlueprintEncoderForTokenClassification", {"num_labels": 5}),
    ("BlueprintDecoderForSequenceClassification", {"num_labels": 2}),
    ("BlueprintEncoderModel", {"add_pooling_layer": True, "type_vocab_size": 2, "sliding_window": 3}),
    ("BlueprintDecoderModel", {"position_embedding_type": "alibi"}),
]


@requires_onnx
@every_export
@pytest.mark.parametrize("cls_name, overrides", HEADS, ids=[name for name, _ in HEADS])
def test_onnx_every_other_head_matches_pytorch(cls_name, overrides, tmp_path):
    model = build(cls_name, **overrides)
    out = export_onnx(save(model, tmp_path / "model"), tmp_path / "onnx")
    session = onnx_session(out / "model.onnx")
    ids, mask = padded_batch([5, 3, 5], 5, left=model.config.is_causal)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    if model.config.type_vocab_size:
        feed["token_type_ids"] = (torch.arange(5) >= 2).long().expand(3, 5).numpy()
    names = [node.name for node in session.get_outputs()]
    with torch.no_grad():
        expected = model(**{name: torch.from_numpy(value) for name, value in feed.items()})
    real = mask.bool()
    for name, value in zip(names, session.run(names, feed)):
        want, got = expected[name], torch.from_numpy(value)
        if want.dim() == 3:  # per position: the real tokens
            want, got = want[real], got[real]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@requires_onnx
@every_export
def test_onnx_float16_greedy_loop_gives_generates_tokens(tmp_path):
    from hf_blueprint.export import onnx_generate

    model = build("BlueprintDecoderForCausalLM").to(torch.float16)
    out = export_onnx(save(model, tmp_path / "model"), tmp_path / "onnx", "--dtype", "float16")
    session = onnx_session(out / "model.onnx")
    assert session.get_inputs()[2].type == "tensor(float16)"
    ids, mask = padded_batch([5, 5], 5, left=True, seed=3)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert onnx_generate(out, ids, mask, max_new_tokens=8).tolist() == expected.tolist()


def test_export_refuses_a_folder_that_is_not_a_blueprint_model(tmp_path, capsys):
    from hf_blueprint.export import main

    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["onnx", str(folder), str(tmp_path / "out")]) == 2
    assert "MODEL" in capsys.readouterr().err
    assert main(["onnx", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "MODEL" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_output_and_the_model_folder(tmp_path, capsys):
    from hf_blueprint.export import main

    folder = save(build("BlueprintDecoderForCausalLM"), tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for command in (["onnx", str(folder), str(out)], ["executorch", str(folder), str(out)],
                    ["onnx", str(folder), str(folder), "--overwrite"]):
        assert main(command) == 2
        assert "OUT" in capsys.readouterr().err
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]


def test_a_failed_export_leaves_no_output_folder(tmp_path, monkeypatch):
    from hf_blueprint import export

    folder = save(build("BlueprintEncoderForMaskedLM"), tmp_path / "model")

    def write_then_fail(graph, staging):
        (staging / graph.file_name).write_bytes(b"half a graph")
        raise export.ExportError("the check failed")

    monkeypatch.setattr(export, "_import_onnx_tools", lambda: None)
    monkeypatch.setattr(export, "write_onnx_graph", write_then_fail)
    with pytest.raises(export.ExportError):
        export.export_onnx(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# torch.export with a static cache (ExecuTorch path): python -m hf_blueprint.export executorch
# ---------------------------------------------------------------------------------------------------------------------


def test_static_cache_program_greedy_tokens_are_generates(tmp_path):
    from hf_blueprint.export import main, static_cache_generate

    model = build("BlueprintDecoderForCausalLM", position_embedding_type="alibi", sliding_window=4)
    folder = save(model, tmp_path / "model")
    assert main(["executorch", str(folder), str(tmp_path / "program"), "--max-cache-len", "32"]) == 0
    prompt = random_ids(1, 5, seed=11)
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert_varied(new_tokens(expected, 5, model.config.eos_token_id))
    assert static_cache_generate(tmp_path / "program", prompt, max_new_tokens=12).tolist() == expected.tolist()


@every_export
def test_static_cache_encoder_decoder_greedy_tokens_are_generates(tmp_path):
    from hf_blueprint.export import export_executorch, static_cache_generate

    model = build_seq2seq()
    folder = save(model, tmp_path / "model")
    export_executorch(folder, tmp_path / "program", max_cache_len=24)
    source = random_ids(1, 6, seed=12)
    expected = model.generate(source, max_new_tokens=10, do_sample=False)
    assert_varied(new_tokens(expected, 1, model.config.eos_token_id))
    assert static_cache_generate(tmp_path / "program", source, max_new_tokens=10).tolist() == expected.tolist()


@requires("executorch")
@every_export
def test_executorch_pte_greedy_tokens_are_generates(tmp_path):
    from hf_blueprint.export import main, static_cache_generate

    model = build("BlueprintDecoderForCausalLM", position_embedding_type="rope", norm_position="pre")
    folder = save(model, tmp_path / "model")
    assert main(["executorch", str(folder), str(tmp_path / "program"), "--max-cache-len", "24", "--pte"]) == 0
    prompt = random_ids(1, 4, seed=13)
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False)
    assert_varied(new_tokens(expected, 4, model.config.eos_token_id))
    got = static_cache_generate(tmp_path / "program", prompt, max_new_tokens=10, runtime="pte")
    assert got.tolist() == expected.tolist()


def test_static_cache_export_refuses_an_encoder_and_a_cache_longer_than_the_model(tmp_path, capsys):
    from hf_blueprint.export import main

    encoder = save(build("BlueprintEncoderForMaskedLM"), tmp_path / "encoder")
    assert main(["executorch", str(encoder), str(tmp_path / "out")]) == 2
    assert "onnx" in capsys.readouterr().err
    decoder = save(build("BlueprintDecoderForCausalLM"), tmp_path / "decoder")
    assert main(["executorch", str(decoder), str(tmp_path / "out"), "--max-cache-len", "65"]) == 2
    assert "--max-cache-len" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# PEFT without target_modules
# ---------------------------------------------------------------------------------------------------------------------


PEFT_MODELS = {
    "decoder": lambda: build("BlueprintDecoderForCausalLM"),
    "encoder": lambda: build("BlueprintEncoderForMaskedLM"),
    "seq2seq": lambda: build_seq2seq(),
}


def wrapped_module_names(peft_model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "base_layer")}


@requires_peft
@pytest.mark.parametrize("family", list(PEFT_MODELS))
def test_lora_config_without_target_modules_wraps_q_and_v_and_trains(family):
    from peft import LoraConfig, get_peft_model

    model = PEFT_MODELS[family]()
    ids = random_ids(2, 6)
    inputs = {"input_ids": ids, "labels": ids}
    with torch.no_grad():
        before = model(**inputs).loss
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8))
    assert wrapped_module_names(peft_model) == {"q_proj", "v_proj"}
    frozen = {name: p.detach().clone() for name, p in peft_model.named_parameters() if not p.requires_grad}
    trainable = {name: p.detach().clone() for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    with torch.no_grad():  # LoRA's B starts at zero: the adapted model is the base model until it trains
        torch.testing.assert_close(peft_model(**inputs).loss, before, rtol=0, atol=0)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    peft_model.train()
    for _ in range(2):
        peft_model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    parameters = dict(peft_model.named_parameters())
    assert all(torch.equal(parameters[name], value) for name, value in frozen.items())
    assert any(not torch.equal(parameters[name], value) for name, value in trainable.items() if "lora_B" in name)


@requires_peft
def test_ia3_config_without_target_modules_uses_llamas_choice():
    from peft import IA3Config, get_peft_model

    peft_model = get_peft_model(build("BlueprintDecoderForCausalLM"), IA3Config())
    assert wrapped_module_names(peft_model) == {"k_proj", "v_proj", "down_proj"}


# ---------------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness on the local tasks (recipes/evaluate_lm.py)
# ---------------------------------------------------------------------------------------------------------------------


TASKS_DIR = REPO / "recipes" / "data" / "lm_eval_tasks"
LM_EVAL_LIMIT = 4


def load_evaluate_lm():
    spec = importlib.util.spec_from_file_location("evaluate_lm", REPO / "recipes" / "evaluate_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def task_utils():
    spec = importlib.util.spec_from_file_location("lm_eval_task_utils", TASKS_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_next_line_items_are_what_their_builder_writes():
    utils = task_utils()
    shipped = [json.loads(line) for line in (TASKS_DIR / "shakespeare_next_line.jsonl").read_text().splitlines()]
    assert shipped == utils.build_next_line_items()
    assert [item["label"] for item in shipped] == [index % 4 for index in range(len(shipped))]


@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory):
    """A tiny causal LM with a character tokenizer of tinyshakespeare, evaluated by recipes/evaluate_lm.py (card
    update included) on the first documents of both local tasks."""
    from hf_blueprint.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("lm_eval") / "model"
    text = (REPO / "recipes" / "data" / "tinyshakespeare" / "input.txt").read_text()
    tokenizer = train_tokenizer([text], "char", vocab_size=100, model_max_length=256)
    config = hf_blueprint.BlueprintDecoderConfig(**{
        **TINY, **UNTIED, "vocab_size": len(tokenizer), "max_position_embeddings": 256,
        "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id})
    torch.manual_seed(0)
    model = hf_blueprint.BlueprintDecoderForCausalLM(config).eval()
    save(model, folder, tokenizer)
    evaluate_lm = load_evaluate_lm()
    results_file = folder.parent / "results.json"
    assert evaluate_lm.main(["--model", str(folder), "--limit", str(LM_EVAL_LIMIT), "--device", "cpu",
                             "--bootstrap_iters", "0", "--output_file", str(results_file), "--update_card"]) == 0
    return model, tokenizer, folder, json.loads(results_file.read_text())


def direct_log_likelihood(model, context_ids: list[int], continuation_ids: list[int]) -> float:
    """sum log p(continuation | context) computed with the model in one forward pass."""
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits.double(), dim=-1)[0]
    positions = range(len(context_ids) - 1, len(context_ids) + len(continuation_ids) - 1)
    return sum(float(log_probs[position, token]) for position, token in zip(positions, continuation_ids))


@requires_lm_eval
def test_lm_eval_perplexity_equals_the_models_on_the_same_tokens(lm_eval_run):
    model, tokenizer, _, results = lm_eval_run
    documents = task_utils().validation_paragraphs()[:LM_EVAL_LIMIT]
    total, tokens = 0.0, 0
    for document in documents:
        ids = tokenizer(document, add_special_tokens=False).input_ids
        assert len(ids) < model.config.max_position_embeddings  # one window: every token after all before it
        total += direct_log_likelihood(model, [tokenizer.bos_token_id], ids)  # lm-eval's prefix: the BOS token
        tokens += len(ids)
    metrics = results["tinyshakespeare_perplexity"]["metrics"]
    assert metrics["tokens"] == tokens and metrics["documents"] == LM_EVAL_LIMIT
    # Same tokens, same model, float32: only the batching differs, which moves the sum by float rounding.
    assert metrics["token_perplexity"] == pytest.approx(math.exp(-total / tokens), rel=1e-5)
    words = sum(len(document.split()) for document in documents)
    assert metrics["word_perplexity"] == pytest.approx(math.exp(-total / words), rel=1e-5)
    # One character per token and per byte (ASCII text): per-token and per-byte perplexity are the same number.
    assert metrics["token_perplexity"] == pytest.approx(metrics["byte_perplexity"], rel=1e-9)


@requires_lm_eval
def test_lm_eval_multiple_choice_accuracy_equals_the_models_choices(lm_eval_run):
    model, tokenizer, _, results = lm_eval_run
    items = [json.loads(line) for line in (TASKS_DIR / "shakespeare_next_line.jsonl").read_text().splitlines()]
    correct = 0
    for item in items[:LM_EVAL_LIMIT]:
        context = tokenizer(item["context"] + "\n", add_special_tokens=False).input_ids
        scores = [direct_log_likelihood(model, context, tokenizer(choice, add_special_tokens=False).input_ids)
                  for choice in item["choices"]]
        correct += max(range(len(scores)), key=scores.__getitem__) == item["label"]
    assert results["shakespeare_next_line"]["metrics"]["acc"] == correct / LM_EVAL_LIMIT


@requires_lm_eval
def test_lm_eval_results_are_written_into_the_model_cards_model_index(lm_eval_run):
    from huggingface_hub import ModelCard

    _, _, folder, results = lm_eval_run
    card = ModelCard.load(folder / "README.md")
    values = {(entry.dataset_type, entry.metric_name): entry.metric_value for entry in card.data.eval_results}
    token_perplexity = results["tinyshakespeare_perplexity"]["metrics"]["token_perplexity"]
    key = ("tinyshakespeare", "perplexity per token (lm-eval tinyshakespeare_perplexity)")
    assert values[key] == round(token_perplexity, 4)
    assert ("shakespeare_next_line", "accuracy (lm-eval shakespeare_next_line)") in values
    # Writing the same results again replaces the entries instead of adding a second copy.
    evaluate_lm = load_evaluate_lm()
    evaluate_lm.update_model_card(folder, results, "test")
    again = ModelCard.load(folder / "README.md")
    assert len(again.data.eval_results) == len(card.data.eval_results)
    assert again.text.count("## Evaluation with lm-evaluation-harness") == 1


# ---------------------------------------------------------------------------------------------------------------------
# Serving: transformers' server through python -m hf_blueprint.serve
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_folder_factory(tmp_path_factory):
    """The served model: a tiny causal LM with the default chat template, saved once."""
    folders = []

    def make() -> Path:
        if not folders:
            from hf_blueprint.chat import install_chat_template

            with pytest.warns(UserWarning, match="unknown token"):  # the tiny word vocabulary has no "User:" token
                tokenizer = install_chat_template(build_tokenizer())
            folder = tmp_path_factory.mktemp("served") / "model"
            folders.append(save(build("BlueprintDecoderForCausalLM"), folder, tokenizer))
        return folders[0]

    return make


@pytest.fixture(scope="module")
def served_folder(served_folder_factory):
    return served_folder_factory()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 60):
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def http_stream(url: str, body: dict, timeout: float = 60) -> list[dict]:
    """The events of a server-sent-events response, until [DONE] or the end."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
    return events


@pytest.fixture(scope="module", autouse=True)
def server_process(request, served_folder_factory):
    """Starts the module's one server as soon as the module starts, when a selected test needs it, so that it boots
    (about 15 s: two processes import transformers) while the other tests run. Its own process group: the server
    starts the model's process, and both are stopped together."""
    wanted = any("server" in item.fixturenames for item in request.session.items if item.module is request.module)
    if not wanted or any(importlib.util.find_spec(name) is None for name in SERVING_PACKAGES):
        yield None
        return
    folder = served_folder_factory()
    port = free_port()
    log_path = folder.parent / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "hf_blueprint.serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
             "--device", "cpu", "--log-level", "warning"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process, f"http://127.0.0.1:{port}", log_path
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def server(server_process):
    """The base URL of the server, once it answers /health."""
    process, base, log_path = server_process
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if http_json(f"{base}/health", timeout=2).get("status") == "ok":
                return base
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the server did not answer /health in 180 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def greedy_text(folder: Path, input_ids: torch.Tensor, max_new_tokens: int) -> str:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                            do_sample=False)
    assert_varied(new_tokens(output, input_ids.shape[1], model.config.eos_token_id))
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


COMPLETION = dict(prompt="the cat sat on the", max_tokens=8, temperature=0)
CHAT = dict(messages=[{"role": "user", "content": "a big dog ran"}], max_tokens=8, temperature=0)


@requires_serving
def test_served_completion_is_generates_greedy_text(server, served_folder):
    tokenizer = AutoTokenizer.from_pretrained(served_folder)
    expected = greedy_text(served_folder, tokenizer(COMPLETION["prompt"], return_tensors="pt").input_ids, 8)
    answer = http_json(f"{server}/v1/completions", COMPLETION)
    assert answer["choices"][0]["text"] == expected


@requires_serving
def test_served_completion_stream_adds_up_to_generates_greedy_text(server, served_folder):
    tokenizer = AutoTokenizer.from_pretrained(served_folder)
    expected = greedy_text(served_folder, tokenizer(COMPLETION["prompt"], return_tensors="pt").input_ids, 8)
    events = http_stream(f"{server}/v1/completions", {**COMPLETION, "stream": True})
    assert "".join(choice.get("text", "") for event in events for choice in event["choices"]) == expected
    assert len([event for event in events if event["choices"] and event["choices"][0].get("text")]) > 1  # streamed


@requires_serving
def test_served_chat_is_generates_greedy_text_after_the_chat_template(server, served_folder):
    tokenizer = AutoTokenizer.from_pretrained(served_folder)
    prompt = tokenizer.apply_chat_template(CHAT["messages"], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]
    expected = greedy_text(served_folder, prompt, 8)
    answer = http_json(f"{server}/v1/chat/completions", CHAT)
    assert answer["choices"][0]["message"]["content"] == expected
    events = http_stream(f"{server}/v1/chat/completions", {**CHAT, "stream": True})
    streamed = "".join((choice.get("delta") or {}).get("content") or "" for event in events
                       for choice in event.get("choices", []))
    assert streamed == expected


@requires_serving
def test_serve_refuses_a_model_that_is_not_a_causal_lm(tmp_path, capsys):
    from hf_blueprint.serve import main

    folder = save(build("BlueprintEncoderForMaskedLM"), tmp_path / "encoder")
    assert main([str(folder), "--port", "1"]) == 2
    error = capsys.readouterr().err
    assert "MODEL" in error and "BlueprintDecoderForCausalLM" in error


@requires_serving
def test_served_classes_are_what_the_servers_loader_looks_up(served_folder):
    """The server's loader resolves `getattr(transformers, config.architectures[0])` (the upstream lookup)."""
    import transformers
    from hf_blueprint.serve import expose_blueprint_classes

    expose_blueprint_classes()
    config = transformers.AutoConfig.from_pretrained(served_folder)
    architecture = getattr(transformers, config.architectures[0])
    assert issubclass(architecture, hf_blueprint.BlueprintDecoderForCausalLM)
    # What the server passes to generate() for stop strings must not break the model.
    model = architecture.from_pretrained(served_folder)
    tokenizer = AutoTokenizer.from_pretrained(served_folder)
    ids = tokenizer("the cat", return_tensors="pt").input_ids
    torch.testing.assert_close(model.generate(ids, max_new_tokens=3, do_sample=False, tokenizer=tokenizer),
                               model.generate(ids, max_new_tokens=3, do_sample=False), rtol=0, atol=0)
