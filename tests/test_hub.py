"""Hub sharing: saved folders are self-contained remote code that loads without hf_blueprint installed."""

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hf_blueprint
from transformers import AutoConfig

# The child process hides hf_blueprint before anything imports it, so only the copied code files can serve.
CLEAN_ROOM_PRELUDE = "import sys; sys.modules['hf_blueprint'] = None\n"

TINY = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            hidden_dropout_prob=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
FAMILIES = {
    "encoder": hf_blueprint.BlueprintEncoderConfig(position_embedding_type="sinusoidal", type_vocab_size=2,
                                                   add_pooling_layer=True, classifier_pooling="first", **TINY),
    "decoder": hf_blueprint.BlueprintDecoderConfig(position_embedding_type="rope", norm_position="pre",
                                                   norm_type="rmsnorm", ffn_type="glu", hidden_act="silu",
                                                   num_key_value_heads=2, **TINY),
    "seq2seq": hf_blueprint.BlueprintSeq2SeqConfig(position_embedding_type="alibi", decoder_layers=3,
                                                   decoder_start_token_id=1, **TINY),
}
INPUT_IDS = torch.tensor([[1, 5, 9, 14, 20, 33], [1, 7, 7, 40, 2, 0]])
ATTENTION_MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])


def _main_output(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def _model_inputs(config) -> dict:
    inputs = dict(input_ids=INPUT_IDS.tolist(), attention_mask=ATTENTION_MASK.tolist())
    if config.is_encoder_decoder:
        inputs["decoder_input_ids"] = INPUT_IDS[:, :4].tolist()
    return inputs


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    """One folder per (family, Auto class of its auto_map), with the outputs the installed package computes."""
    root = tmp_path_factory.mktemp("remote_code")
    cases = []
    for family, config in FAMILIES.items():
        for auto_name, class_ref in config.auto_map.items():
            if auto_name == "AutoConfig":
                continue
            model_class = getattr(hf_blueprint, class_ref.split(".")[-1])
            torch.manual_seed(0)
            model = model_class(config).eval()
            folder = root / f"{family}-{auto_name}"
            model.save_pretrained(folder)
            inputs = _model_inputs(config)
            with torch.no_grad():
                expected = _main_output(model(**{key: torch.tensor(value) for key, value in inputs.items()}))
            torch.save(expected, folder / "expected_output.pt")
            case = {"folder": str(folder), "auto_class": auto_name, "config_class": config.auto_map["AutoConfig"],
                    "inputs": inputs}
            if auto_name in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM"):
                generated = model.generate(INPUT_IDS[:1], max_new_tokens=8, do_sample=False)
                case["generated"] = generated.tolist()
            cases.append(case)
    return cases


def test_every_saved_folder_carries_the_code_and_a_complete_auto_map(saved_folders):
    expected_maps = {family: set(config.auto_map) for family, config in FAMILIES.items()}
    for case in saved_folders:
        folder = Path(case["folder"])
        saved = json.loads((folder / "config.json").read_text())
        family = folder.name.split("-")[0]
        assert set(saved["auto_map"]) == expected_maps[family], folder.name
        assert {path.name for path in folder.glob("*.py")} == REMOTE_CODE_FILES, folder.name
        assert (folder / "model.safetensors").is_file() and not (folder / "pytorch_model.bin").exists()


def test_clean_room_load_with_remote_code_matches_bitwise(saved_folders, tmp_path):
    child = CLEAN_ROOM_PRELUDE + textwrap.dedent(
        """
        import json, torch, transformers
        try:
            import hf_blueprint
            raise SystemExit("hf_blueprint is importable in the clean room")
        except ImportError:
            pass
        cases = json.loads(sys.argv[1])
        report = []
        for case in cases:
            inputs = {key: torch.tensor(value) for key, value in case["inputs"].items()}
            auto_class = getattr(transformers, case["auto_class"])
            model = auto_class.from_pretrained(case["folder"], trust_remote_code=True).eval()
            config = transformers.AutoConfig.from_pretrained(case["folder"], trust_remote_code=True)
            with torch.no_grad():
                output = model(**inputs)
            output = output.logits if hasattr(output, "logits") else output.last_hidden_state
            expected = torch.load(case["folder"] + "/expected_output.pt")
            entry = {"folder": case["folder"], "module": type(model).__module__,
                     "config_class": type(config).__name__, "equal": bool(torch.equal(output, expected))}
            if "generated" in case:
                entry["generated"] = model.generate(inputs["input_ids"][:1], max_new_tokens=8,
                                                    do_sample=False).tolist()
            report.append(entry)
        print("REPORT" + json.dumps(report))
        """
    )
    result = subprocess.run([sys.executable, "-c", child, json.dumps(saved_folders)], capture_output=True,
                            text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT", 1)[1])
    assert len(report) == len(saved_folders)
    for case, entry in zip(saved_folders, report):
        assert entry["module"].startswith("transformers_modules."), entry  # the copied code ran, not the package
        assert entry["config_class"] == case["config_class"].split(".")[-1]
        assert entry["equal"], f"remote-code output differs for {entry['folder']}"
        if "generated" in case:
            assert entry["generated"] == case["generated"]


def test_clean_room_load_without_trust_remote_code_fails_with_transformers_error(saved_folders, tmp_path):
    folder = next(case["folder"] for case in saved_folders if case["auto_class"] == "AutoModelForCausalLM")
    child = CLEAN_ROOM_PRELUDE + textwrap.dedent(
        f"""
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({folder!r})
        except ValueError as error:
            print("ERROR:" + str(error))
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300, stdin=subprocess.DEVNULL)
    assert "ERROR:" in result.stdout, result.stderr[-2000:]
    message = result.stdout.split("ERROR:", 1)[1]
    assert "trust_remote_code=True" in message
    assert "modeling_blueprint" not in result.stderr  # not a traceback from inside our code


def test_installed_package_takes_precedence_over_remote_code(saved_folders):
    folder = saved_folders[0]["folder"]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__module__ == "hf_blueprint.configuration_blueprint"


# Network and process access is excluded by the module list; these catch code execution and file writes.
FORBIDDEN_BUILTINS = {"open", "eval", "exec", "compile", "__import__"}  # as bare calls (torch.compile is fine)
FORBIDDEN_CALLS = {"system", "popen", "urlopen", "remove", "unlink", "rmtree", "write_text", "write_bytes", "mkdir",
                   "rename"}
FORBIDDEN_MODULES = {"os", "subprocess", "socket", "urllib", "requests", "httpx", "shutil", "pickle", "pathlib",
                     "huggingface_hub", "importlib", "ctypes"}


SAFE_STANDARD_MODULES = {"torch", "transformers", "math", "collections", "typing", "inspect", "copy", "functools",
                         "contextlib", "dataclasses"}
# The code every saved folder carries: the config and model files and the siblings they import.
REMOTE_CODE_FILES = {"configuration_blueprint.py", "losses.py", "modeling_blueprint.py", "modeling_checks.py", "packing.py",
                     "presets.py", "sparse_attention.py"}


@pytest.mark.parametrize("filename", sorted(REMOTE_CODE_FILES))
def test_remote_code_files_import_only_torch_transformers_and_siblings(filename, saved_folders):
    """The files a Hub user executes with trust_remote_code: no network, subprocess, eval/exec or file writes."""
    folder = Path(saved_folders[0]["folder"])
    copied = sorted(path.name for path in folder.glob("*.py"))
    assert filename in copied
    tree = ast.parse((folder / filename).read_text())
    # An optional accelerator kernel imported under `try: ... except ImportError:` is skipped where it is not
    # installed (transformers' own import check ignores such imports too); it may not be a forbidden module.
    optional = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.Try)
                and any(isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in node.handlers)
                for statement in node.body for inner in ast.walk(statement)
                if isinstance(inner, (ast.Import, ast.ImportFrom)) and getattr(inner, "level", 0) == 0}
    for node in ast.walk(tree):
        if id(node) in optional:
            modules = [node.module] if isinstance(node, ast.ImportFrom) else [alias.name for alias in node.names]
            assert not {module.split(".")[0] for module in modules} & FORBIDDEN_MODULES, modules
        elif isinstance(node, ast.Import):
            for alias in node.names:
                # inspect: read-only introspection (the heads store forward's signature for generate());
                # copy, functools, contextlib, dataclasses: copies, decorators, context managers, no I/O.
                assert alias.name.split(".")[0] in SAFE_STANDARD_MODULES, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                root = node.module.split(".")[0]
                assert root in SAFE_STANDARD_MODULES, node.module
                assert root not in FORBIDDEN_MODULES
            else:
                assert node.level == 1 and (folder / f"{node.module}.py").is_file(), node.module
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            assert name not in FORBIDDEN_CALLS, f"{filename}:{node.lineno} calls {name}"
            assert not (isinstance(node.func, ast.Name) and name in FORBIDDEN_BUILTINS), f"{filename}:{node.lineno}"


# -- push/pull round trip over HTTP against tests/hub_server.py ------------------------------------------------------
# Xet uploads need Hugging Face's token service, which no local server can offer: the Xet path cannot be exercised
# offline, so the two modes tested are "regular" (base64 inside the commit) and "lfs" (with HF_HUB_DISABLE_XET=1).

PUSH_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, hf_blueprint
    config = hf_blueprint.BlueprintDecoderConfig(**json.loads(sys.argv[1]))
    torch.manual_seed(0)
    model = hf_blueprint.BlueprintDecoderForCausalLM(config).eval()
    model.push_to_hub("tester/tiny-blueprint", commit_message="push from test")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 14]])).logits
    torch.save(logits, sys.argv[2])
    """
)
PULL_SCRIPT = CLEAN_ROOM_PRELUDE + textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("tester/tiny-blueprint", trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 14]])).logits
    print("EQUAL" if torch.equal(logits, torch.load(sys.argv[1])) else "DIFFERENT")
    """
)


def hub_environment(url: str, home: Path, upload_mode: str) -> dict:
    import os

    env = dict(os.environ, HF_ENDPOINT=url, HF_TOKEN="hf_test_dummy", HF_HOME=str(home),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_HUB_OFFLINE="0")  # the suite runs offline; this server is the one reachable Hub
    if upload_mode == "lfs":
        env["HF_HUB_DISABLE_XET"] = "1"
    return env


@pytest.fixture
def hub(request):
    sys.path.insert(0, str(Path(__file__).parent))
    from hub_server import serve

    server, state = serve(request.param)
    yield f"http://127.0.0.1:{server.server_address[1]}", state, request.param
    server.shutdown()


@pytest.mark.parametrize("hub", ["regular", "lfs"], indirect=True)
def test_push_to_hub_then_clean_room_pull_gives_equal_logits(hub, tmp_path):
    url, state, upload_mode = hub
    config = {key: value for key, value in FAMILIES["decoder"].to_diff_dict().items()
              if key in FAMILIES["decoder"].__dataclass_fields__ and key != "transformers_version"}
    expected = tmp_path / "expected.pt"
    env = hub_environment(url, tmp_path / "push_home", upload_mode)
    pushed = subprocess.run([sys.executable, "-c", PUSH_SCRIPT, json.dumps(config), str(expected)],
                            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert pushed.returncode == 0, pushed.stderr[-3000:]

    repo = state.repos["tester/tiny-blueprint"]
    assert {"config.json", "model.safetensors", "modeling_blueprint.py", "configuration_blueprint.py"} <= set(
        repo["files"])
    if upload_mode == "lfs":
        assert state.lfs_objects, "the LFS mode uploaded no object through the batch API"

    env = hub_environment(url, tmp_path / "pull_home", upload_mode)  # an empty cache: a real download
    pulled = subprocess.run([sys.executable, "-c", PULL_SCRIPT, str(expected)], env=env, capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    assert "EQUAL" in pulled.stdout


# -- model card --------------------------------------------------------------------------------------------------------


def test_trainer_writes_the_blueprint_model_card_with_model_index(tmp_path):
    from datasets import Dataset
    from huggingface_hub import ModelCard
    from transformers import Trainer, TrainingArguments

    from hf_blueprint.model_card import use_blueprint_model_card

    torch.manual_seed(0)
    model = hf_blueprint.BlueprintDecoderForCausalLM(FAMILIES["decoder"])
    rows = [{"input_ids": [1, 5, 9, 14, 20, 33], "labels": [1, 5, 9, 14, 20, 33]}] * 8
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-3, seed=7)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      eval_dataset=Dataset.from_list(rows))
    use_blueprint_model_card(trainer)
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    trainer.create_model_card(tasks="text-generation", dataset="recipes/data/tinyshakespeare/input.txt")

    card = ModelCard.load(tmp_path / "run" / "README.md")  # parses the YAML front matter
    assert card.data.library_name == "transformers"
    assert {"hf_blueprint", "blueprint_decoder"} <= set(card.data.tags)
    assert card.data.datasets == ["tinyshakespeare"]
    metrics = card.data.to_dict()["model-index"][0]["results"][0]["metrics"]
    assert {"type": "loss", "value": round(eval_loss, 4), "name": "Validation loss"} in metrics
    for switch, value in [("position_embedding_type", "'rope'"), ("norm_position", "'pre'"),
                          ("norm_type", "'rmsnorm'"), ("ffn_type", "'glu'"), ("hidden_act", "'silu'"),
                          ("num_key_value_heads", "2"), ("hidden_size", "32"), ("sliding_window", "None"),
                          ("scale_embeddings", "True"), ("tie_word_embeddings", "True"), ("norm_bias", "True"),
                          ("attention_bias", "False"), ("hidden_dropout_prob", "0.0"), ("rope_theta", "10000.0")]:
        assert f"| `{switch}` | `{value}` |" in card.text, switch
    assert "is_causal" not in card.text and "transformers_version" not in card.text
    assert "| `learning_rate` | `0.001` |" in card.text and "| `seed` | `7` |" in card.text
    assert f"{sum(p.numel() for p in model.parameters()):,}" in card.text
    assert "trust_remote_code=True" in card.text and "import hf_blueprint" in card.text


@pytest.mark.parametrize(("model_class", "switches", "expected"), [
    ("BlueprintDecoderModel", {}, ["full: each token attends to itself and every token before it", "square"]),
    ("BlueprintEncoderModel", {}, ["full: each token attends to every token of the input", "square"]),
    ("BlueprintEncoderModel", {"sliding_window": 4}, ["7 keys (itself and 3 on each side)", "linear"]),
    ("BlueprintDecoderModel", {"sliding_window": 4, "attention_dilation": 2, "global_attention_tokens": 2},
     ["4 keys (itself and the 3 before it) spaced 2 apart (dilated window)", "the first 2 tokens are global",
      "linear"]),
    ("BlueprintForConditionalGeneration", {"sliding_window": 8}, ["8 keys", "cross-attention sees the whole source"]),
])
def test_model_card_describes_the_attention_pattern_and_its_cost(model_class, switches, expected):
    from hf_blueprint.model_card import build_model_card

    model_class = getattr(hf_blueprint, model_class)
    model = model_class(model_class.config_class(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32, **switches))
    attention = next(line for line in build_model_card(model, task="fill-mask").text.splitlines()
                     if line.startswith("**Attention:**"))
    for phrase in expected:
        assert phrase in attention


@pytest.mark.parametrize("hub", ["regular"], indirect=True)
def test_recipe_push_to_hub_uploads_model_tokenizer_and_card(hub, tmp_path):
    """A recipe run with the Trainer's own --push_to_hub flags, then a clean-room pull of what it pushed."""
    url, state, upload_mode = hub
    recipes = Path(__file__).parents[1] / "recipes"
    text = (recipes / "data" / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:20000]
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    output_dir = tmp_path / "run"
    env = hub_environment(url, tmp_path / "push_home", upload_mode)
    trained = subprocess.run(
        [sys.executable, str(recipes / "pretrain_causal_lm.py"), "--train_file", str(tmp_path / "train.txt"),
         "--tokenizer_type", "char", "--block_size", "32", "--config_overrides",
         "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,max_position_embeddings=32",
         "--max_steps", "4", "--per_device_train_batch_size", "4", "--save_strategy", "no", "--report_to", "none",
         "--use_cpu", "true", "--sample_max_new_tokens", "8", "--output_dir", str(output_dir),
         "--push_to_hub", "true", "--hub_model_id", "tester/recipe-push", "--hub_private_repo", "true"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]

    repo = state.repos["tester/recipe-push"]
    assert repo["private"]
    assert {"model.safetensors", "config.json", "modeling_blueprint.py", "tokenizer.json", "README.md"} <= set(
        repo["files"])
    card = repo["files"]["README.md"].decode()
    assert "model-index" in card and "## Architecture" in card and "trust_remote_code=True" in card

    import transformers

    local = transformers.AutoModelForCausalLM.from_pretrained(output_dir).eval()
    with torch.no_grad():
        torch.save(local(torch.tensor([[1, 5, 9, 14]])).logits, tmp_path / "expected.pt")
    pull = PULL_SCRIPT.replace("tester/tiny-blueprint", "tester/recipe-push")
    pulled = subprocess.run([sys.executable, "-c", pull, str(tmp_path / "expected.pt")],
                            env=hub_environment(url, tmp_path / "pull_home", upload_mode), capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    assert "EQUAL" in pulled.stdout


def test_safetensors_is_preferred_over_a_pickle_in_the_same_folder(tmp_path):
    """Weights are saved as safetensors only; a pytorch_model.bin planted beside them is not what loads."""
    torch.manual_seed(0)
    model = hf_blueprint.BlueprintDecoderForCausalLM(FAMILIES["decoder"]).eval()
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "pytorch_model.bin").exists()
    planted = {name: torch.zeros_like(tensor) for name, tensor in model.state_dict().items()}
    torch.save(planted, tmp_path / "pytorch_model.bin")
    reloaded = hf_blueprint.BlueprintDecoderForCausalLM.from_pretrained(tmp_path).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
