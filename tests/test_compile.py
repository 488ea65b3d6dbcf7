"""torch.compile: the model traces as one graph (fullgraph=True) for a training step and for generation with a
static cache, and the compiled results equal the eager ones."""

import torch

import hf_blueprint


def tiny_decoder(**overrides):
    fields = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, hidden_dropout_prob=0.0, pad_token_id=0, position_embedding_type="rope",
                  norm_position="pre", norm_type="rmsnorm", ffn_type="glu", hidden_act="silu")
    torch.manual_seed(0)
    return hf_blueprint.BlueprintDecoderForCausalLM(hf_blueprint.BlueprintDecoderConfig(**{**fields, **overrides}))


def test_model_declares_fullgraph_compilation():
    assert hf_blueprint.BlueprintDecoderForCausalLM._can_compile_fullgraph


def test_compiled_training_step_matches_eager():
    model = tiny_decoder()
    input_ids = torch.randint(1, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    # return_logits: a training step with labels otherwise takes the blockwise loss and returns no logits.
    eager = model(input_ids, labels=input_ids, use_cache=False, return_logits=True)
    eager.loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True)(input_ids, labels=input_ids, use_cache=False, return_logits=True)
    compiled.loss.backward()
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=1e-5)
    for compiled_grad, eager_grad in zip((p.grad for p in model.parameters()), eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-5, rtol=1e-4)


def test_compiled_generate_with_static_cache_matches_eager():
    model = tiny_decoder(position_embedding_type="alibi").eval()
    input_ids = torch.tensor([[0, 0, 7, 3, 9], [4, 8, 15, 16, 23]])
    attention_mask = (input_ids != 0).long()
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=6, do_sample=False, cache_implementation="static")
    expected = model.generate(input_ids, **kwargs)
    model.forward = torch.compile(model.forward, fullgraph=True)
    torch.testing.assert_close(model.generate(input_ids, **kwargs), expected, atol=0, rtol=0)


def test_compiled_seq2seq_generate_with_static_cache_matches_eager():
    fields = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  hidden_dropout_prob=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                  max_position_embeddings=64, initializer_range=0.2, sliding_window=3)
    torch.manual_seed(0)
    model = hf_blueprint.BlueprintForConditionalGeneration(hf_blueprint.BlueprintSeq2SeqConfig(**fields)).eval()
    source = torch.tensor([[0, 0, 7, 3, 9], [4, 8, 15, 16, 23]])
    kwargs = dict(attention_mask=(source != 0).long(), max_new_tokens=6, do_sample=False, eos_token_id=-1,
                  cache_implementation="static")
    expected = model.generate(source, **kwargs)
    model.forward = torch.compile(model.forward, fullgraph=True)
    torch.testing.assert_close(model.generate(source, **kwargs), expected, atol=0, rtol=0)
