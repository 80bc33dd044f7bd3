"""The Transformer baseline: Llama sized to a parameter budget, with d, layers, heads and vocabulary as given."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from retentive import RetNet
from retentive.baselines import (
    count_parameters,
    llama_config_matching,
    model_from_preset,
    retnet_preset_for,
    transformer_config_from_preset,
    transformer_from_preset,
    transformer_presets,
)
from retentive.models import RetNetConfig, RetNetForCausalLM


@settings(max_examples=8, deadline=None)
@given(
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([8, 16, 24]),
    layers=st.integers(1, 3),
    vocab=st.integers(50, 300),
)
def test_parameters_match_a_retnet_within_2_percent(heads, head_dim, layers, vocab):
    d = heads * head_dim
    with torch.device("meta"):
        retnet = torch.nn.ModuleList(
            [torch.nn.Embedding(vocab, d), RetNet(layers, heads, d), torch.nn.Linear(d, vocab)]
        )
        target = count_parameters(retnet)
        config = llama_config_matching(d, layers, heads, vocab, target)
        llama = LlamaForCausalLM(config)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (d, layers, heads)
    assert config.vocab_size == vocab and config._attn_implementation == "sdpa"
    assert abs(count_parameters(llama) - target) <= 0.02 * target


def test_tied_embeddings_are_counted_once():
    config = llama_config_matching(32, 2, 2, 100, 60_000, tie_word_embeddings=True)
    with torch.device("meta"):
        llama = LlamaForCausalLM(config)
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    assert abs(count_parameters(llama) - 60_000) <= 0.02 * 60_000


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_params": 10}, "target_params"),
        ({"num_heads": 3}, "divisible"),
        ({"num_layers": 0}, "num_layers"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = {"dim_model": 32, "num_layers": 2, "num_heads": 2, "vocab_size": 100, "target_params": 100_000} | kwargs
    with pytest.raises(ValueError, match=match):
        llama_config_matching(**args)


def test_preset_names_mirror_retnet():
    assert retnet_preset_for("transformer-tiny") == "retnet-tiny"
    with pytest.raises(ValueError, match="transformer-"):
        retnet_preset_for("retnet-tiny")


@pytest.mark.parametrize("name", ["transformer-tiny", "transformer-small", "transformer-1.3b"])
def test_presets_mirror_the_retnet_presets(name):
    retnet_cfg = RetNetConfig.from_preset(retnet_preset_for(name))
    config = transformer_config_from_preset(name)
    with torch.device("meta"):
        want = count_parameters(RetNetForCausalLM(retnet_cfg))
        got = count_parameters(LlamaForCausalLM(config))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.vocab_size) == (
        retnet_cfg.dim_model,
        retnet_cfg.num_layers,
        retnet_cfg.num_heads,
        retnet_cfg.vocab_size,
    )
    assert config.tie_word_embeddings == retnet_cfg.tie_word_embeddings
    assert abs(got - want) <= 0.02 * want


def test_every_retnet_preset_has_a_baseline_and_one_trainer_api():
    assert "transformer-tiny" in transformer_presets() and len(transformer_presets()) >= 3
    tokens = torch.randint(0, 64, (2, 9))
    for name in ("retnet-tiny", "transformer-tiny"):
        model = model_from_preset(name, vocab_size=64)
        out = model(input_ids=tokens, labels=tokens)
        assert out.loss.ndim == 0
        assert model.eval()(input_ids=tokens, labels=tokens).logits.shape == (2, 9, 64)
    with torch.device("meta"):
        retnet, twin = (
            model_from_preset("retnet-tiny", vocab_size=64),
            model_from_preset("transformer-tiny", vocab_size=64),
        )
    assert abs(count_parameters(twin) - count_parameters(retnet)) <= 0.02 * count_parameters(retnet)


def test_the_lm_recipe_trains_a_transformer_preset(tmp_path):
    from retentive.training import TrainConfig
    from retentive.training.lm import LMConfig, train_language_model

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be, or not to be, that is the question\n" * 200)
    small = {"dim_model": 32, "num_layers": 1, "num_heads": 2, "ffn_dim": 64}
    lm = LMConfig(
        preset="transformer-tiny", data=str(corpus), tokenizer="bytes", seq_len=16, batch_size=2, eval_batches=1
    )
    lm.model_overrides = small
    config = TrainConfig(steps=2, warmup=0, eval_interval=0, device="cpu", progress=False)
    run = train_language_model(lm, config, tmp_path / "run", cache_dir=tmp_path / "cache")
    assert isinstance(run.model, LlamaForCausalLM)
    assert run.model.config.hidden_size == 32 and run.model.config.vocab_size == run.tokenizer.vocab_size
    assert 1 < run.result.eval["val_ppl"] < float("inf")


def test_the_twin_starts_its_embedding_as_the_retnet_does() -> None:
    twin = transformer_from_preset("transformer-tiny", vocab_size=2048, dim_model=128, num_layers=1)
    assert twin.get_input_embeddings().weight.std().item() == pytest.approx(128**-0.5, rel=0.03)
    llama = transformer_from_preset("transformer-tiny", vocab_size=2048, dim_model=128, embedding_init_std=0.02)
    assert llama.get_input_embeddings().weight.std().item() == pytest.approx(0.02, rel=0.03)
