"""Converting the public RetNet checkpoints: logits of the source's own code in every form of retentive.

- torchscale 0.3.0's ``RetNetDecoder`` (``pip install --no-deps torchscale==0.3.0 fairscale==0.4.0 einops``; ``make
  test`` runs under the peers' environment that has it), in its 2023-09-28 generation and, with its modules swapped
  for those the earlier generation built (LayerNorm, biased projections, FeedForwardNetwork with subln: torchscale
  0.3.0 still ships them), in the earlier one: the forward code of the two generations is the same.
- syncdoth/RetNet (not on PyPI): its math is torchscale's later generation, so its layout is checked on torchscale's
  weights renamed into its keys and config.json, against torchscale's logits.
- flash-linear-attention (``flash-linear-attention`` and ``fla-core``, --no-deps): its own model, run on the CPU by
  Triton's interpreter in a separate process (``fla_reference.py``).

Logits in float32: max |difference| <= 1e-4 in the parallel, chunkwise and recurrent forms, prompts of 1 to 80 tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from retentive.cli import main as cli
from retentive.models import RetNetConfig, RetNetForCausalLM
from retentive.models.convert import ConversionError, convert

ATOL = 1e-4
FORMS = ({"mode": "parallel"}, {"mode": "chunkwise", "chunk_size": 8}, {"mode": "recurrent"})
LENGTHS = (1, 7, 33)
V = 97

needs_torchscale = pytest.mark.skipif(
    importlib.util.find_spec("torchscale") is None or importlib.util.find_spec("fairscale") is None,
    reason="torchscale 0.3.0 is not installed (pip install --no-deps torchscale==0.3.0 fairscale==0.4.0 einops)",
)


def _stub_timm() -> None:
    """torchscale imports timm's drop_path only (unused at drop_path_rate 0); timm would pull torchvision."""
    if "timm" in sys.modules or importlib.util.find_spec("timm") is not None:
        return
    modules = {name: types.ModuleType(name) for name in ("timm", "timm.models", "timm.models.layers")}
    modules["timm.models.layers"].drop_path = lambda x, drop_prob=0.0, training=False: x
    sys.modules.update(modules)


def torchscale_decoder(old: bool, seed: int = 0, scale: float = 0.1, **fields) -> tuple[nn.Module, dict]:
    """torchscale's RetNetDecoder with random weights; ``old``: the generation before 2023-09-28.

    Returns the model (eval mode) and its settings as a fairseq checkpoint stores them.
    """
    _stub_timm()
    from torchscale.architecture.config import RetNetConfig as TorchScaleConfig
    from torchscale.architecture.retnet import RetNetDecoder
    from torchscale.component.feedforward_network import FeedForwardNetwork

    settings = dict(decoder_embed_dim=48, decoder_retention_heads=4, decoder_layers=2, vocab_size=V) | fields
    if old:
        settings |= dict(decoder_value_embed_dim=2 * settings["decoder_embed_dim"], layernorm_eps=1e-5)
    args = TorchScaleConfig(**settings)
    torch.manual_seed(seed)
    d = args.decoder_embed_dim
    embed = nn.Embedding(V, d)
    model = RetNetDecoder(args, embed_tokens=embed)
    if old:  # what torchscale built before 2023-09-28; the forward code is unchanged
        eps = args.layernorm_eps
        for layer in model.layers:
            layer.retention_layer_norm, layer.final_layer_norm = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
            msr = layer.retention
            for name, (n_in, n_out) in dict(q=(d, d), k=(d, d), v=(d, 2 * d), g=(d, 2 * d), out=(2 * d, d)).items():
                setattr(msr, f"{name}_proj", nn.Linear(n_in, n_out, bias=True))
            msr.group_norm = nn.LayerNorm(msr.head_dim, eps=1e-6, elementwise_affine=False)
            ffn = args.decoder_ffn_embed_dim
            layer.ffn = FeedForwardNetwork(d, ffn, args.activation_fn, 0.0, 0.0, eps, subln=args.subln)
        model.layer_norm = nn.LayerNorm(d, eps=eps)
        if args.layernorm_embedding:
            model.layernorm_embedding = nn.LayerNorm(d, eps=eps)
    with torch.no_grad():  # away from the init: norm weights and biases other than 1 and 0
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval(), vars(args)


def prompts(lengths=LENGTHS) -> list[torch.Tensor]:
    return [torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(n)) for n in lengths]


def assert_forms_match(model: RetNetForCausalLM, reference, lengths=LENGTHS) -> float:
    """Max |logit difference| over prompts and forms; asserts <= ATOL. ``reference``: tokens -> logits."""
    worst = 0.0
    with torch.no_grad():
        for tokens in prompts(lengths):
            want = reference(tokens)
            for form in FORMS:
                got = model(tokens, use_cache=False, **form).logits
                worst = max(worst, (got - want).abs().max().item())
    assert worst <= ATOL, worst
    return worst


def torchscale_recurrent(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """torchscale's own recurrent form: one token at a time through its incremental state."""
    state: dict = {"is_first_step": False}
    return torch.cat([model(tokens[:, : t + 1], incremental_state=state)[0] for t in range(tokens.shape[1])], dim=1)


def greedy(step, tokens: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        tokens = torch.cat([tokens, step(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


TORCHSCALE_CASES = {
    # 2023-09-28 on: RMSNorm, swish GLU, a value width that is no multiple of d, scaled and normed embeddings
    "new-swish-embed": (False, dict(decoder_value_embed_dim=72, decoder_ffn_embed_dim=80, activation_fn="swish",
                                    no_scale_embedding=False, layernorm_embedding=True)),
    # its defaults: gelu GLU, value width 1280 for d = 48 (8 heads), tied output layer
    "new-defaults-tied": (False, dict(decoder_retention_heads=8, share_decoder_input_output_embed=True)),
    # before: LayerNorm, biases, FFN with sub-LayerNorm (subln), gelu
    "old-subln": (True, dict(decoder_ffn_embed_dim=96, layernorm_embedding=True, no_scale_embedding=False)),
    "old-relu-no-subln": (True, dict(decoder_ffn_embed_dim=64, activation_fn="relu", subln=False, deepnorm=False)),
}  # fmt: skip


@needs_torchscale
@pytest.mark.parametrize("case", list(TORCHSCALE_CASES))
def test_torchscale_logits_in_every_form_and_greedy_tokens(case, tmp_path):
    old, fields = TORCHSCALE_CASES[case]
    source, args = torchscale_decoder(old, **fields)
    file = tmp_path / "checkpoint_best.pt"  # fairseq's layout: {"model": ..., "args": Namespace}
    state = {f"decoder.{k}": v for k, v in source.state_dict().items()}
    torch.save({"model": state, "args": argparse.Namespace(**args)}, file)
    cli(["convert", str(file), str(tmp_path / "out")])
    model = RetNetForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.config.norm == ("layernorm" if old else "rmsnorm")
    assert_forms_match(model, lambda t: source(t)[0])
    tokens = prompts([5])[0]
    with torch.no_grad():
        want = greedy(lambda t: source(t)[0], tokens, 10)
    got = model.generate(tokens, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, want)


@needs_torchscale
def test_torchscale_recurrent_form_agrees_where_its_normalization_is_idle(tmp_path):
    """torchscale's recurrent form skips the retention normalization of its parallel form; at its own init scale the
    score sums stay below 1, where that normalization does nothing, and retentive's recurrent form matches it too."""
    source, _ = torchscale_decoder(False, scale=0.0, decoder_value_embed_dim=96, activation_fn="swish")
    file = tmp_path / "weights.pt"
    torch.save(source.state_dict(), file)  # a bare state dict: the settings come from source_config
    model = RetNetForCausalLM.from_pretrained(file, source_config={"activation_fn": "swish"}, dtype=torch.float32)
    assert_forms_match(model, lambda t: torchscale_recurrent(source, t))
    with torch.no_grad():
        tokens = prompts([9])[0]
        assert (torchscale_recurrent(source, tokens) - source(tokens)[0]).abs().max() <= ATOL


# --- syncdoth/RetNet (hf-retnet) ---------------------------------------------------------------------------------


def hf_retnet_folder(folder: Path, source: nn.Module, args: dict, **config) -> Path:
    """torchscale's later-generation weights in syncdoth/RetNet's keys, config.json and a tokenizer."""
    from tokenizers import Tokenizer, models

    folder.mkdir(parents=True)
    state = {f"model.{k}": v.contiguous() for k, v in source.state_dict().items() if k != "output_projection.weight"}
    state["lm_head.weight"] = source.output_projection.weight.detach().clone()
    save_file(state, folder / "model.safetensors")
    names = ("vocab_size", "decoder_embed_dim", "decoder_value_embed_dim", "decoder_retention_heads",
             "decoder_ffn_embed_dim", "decoder_layers", "activation_fn", "no_scale_embedding", "layernorm_embedding",
             "layernorm_eps")  # fmt: skip
    fields = {k: args[k] for k in names} | {"model_type": "retnet", "use_glu": True, "eos_token_id": 0} | config
    (folder / "config.json").write_text(json.dumps(fields))
    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))
    return folder


@needs_torchscale
@pytest.mark.parametrize("use_lm_decay", [False, True])
def test_hf_retnet_layout_gives_torchscale_logits(use_lm_decay, tmp_path):
    fields = dict(decoder_value_embed_dim=64, activation_fn="swish", no_scale_embedding=False, layernorm_embedding=True)
    source, args = torchscale_decoder(False, **fields)
    if use_lm_decay:  # syncdoth's other schedule: gamma = 1 - exp(linspace(log 1/32, log 1/512, H))
        h = torch.linspace(torch.log(torch.tensor(1 / 32)), torch.log(torch.tensor(1 / 512)), 4)
        source.retnet_rel_pos.decay.copy_(torch.log(1 - torch.exp(h)))
    folder = hf_retnet_folder(tmp_path / "hf", source, args, use_lm_decay=use_lm_decay)
    model = RetNetForCausalLM.from_pretrained(folder, dtype=torch.float32)  # converted on load
    assert model.config.decay == ("linspace" if use_lm_decay else "retnet") and model.config.eos_token_id == 0
    assert_forms_match(model, lambda t: source(t)[0])
    convert_out = tmp_path / "out"
    cli(["convert", str(folder), str(convert_out), "--from", "hf-retnet"])
    assert (convert_out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_hub_ids_resolve_through_the_local_cache_offline(tmp_path, monkeypatch, torchscale_file):
    """Folders laid out like Hub snapshots in HF_HUB_CACHE, with HF_HUB_OFFLINE=1: nothing is downloaded. A foreign
    layout is converted on load, retentive's own folder loads as saved; a repository not in the cache is refused."""
    import huggingface_hub.constants as hub_constants

    cache, commit = tmp_path / "hub", "0" * 40

    def snapshot(repo_id: str) -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        return repo / "snapshots" / commit

    _, state = torchscale_file  # in syncdoth/RetNet's layout
    folder = snapshot("someone/tiny-retnet")
    folder.mkdir(parents=True)
    hf_state = {f"model.{k}": v for k, v in state.items() if k != "output_projection.weight"}
    save_file(hf_state | {"lm_head.weight": state["output_projection.weight"]}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "retnet", "decoder_embed_dim": 16}))
    native = RetNetForCausalLM(RetNetConfig(vocab_size=V, dim_model=16, num_layers=1, num_heads=2))
    native.save_pretrained(snapshot("someone/native-retnet"))
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    tokens = prompts([7])[0]
    with torch.no_grad():
        got = RetNetForCausalLM.from_pretrained("someone/tiny-retnet", dtype=torch.float32)(tokens).logits
        want = RetNetForCausalLM.from_pretrained(folder, dtype=torch.float32)(tokens).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        loaded = RetNetForCausalLM.from_pretrained("someone/native-retnet")
        torch.testing.assert_close(loaded(tokens).logits, native.eval()(tokens).logits, rtol=0, atol=0)
    with pytest.raises(OSError, match="someone/no-such-model: neither a local folder nor a Hub repository"):
        RetNetForCausalLM.from_pretrained("someone/no-such-model")


# --- flash-linear-attention --------------------------------------------------------------------------------------

FLA_CASES = {"fused-norm": {"fuse_norm": True}, "plain-norm-tied": {"fuse_norm": False, "tie_word_embeddings": True}}


@pytest.fixture(scope="module", params=list(FLA_CASES))
def fla_reference(request, tmp_path_factory) -> tuple[Path, dict]:
    if importlib.util.find_spec("fla") is None:
        pytest.skip("flash-linear-attention is not installed (pip install --no-deps flash-linear-attention fla-core)")
    out = tmp_path_factory.mktemp(f"fla-{request.param}")
    script = Path(__file__).with_name("fla_reference.py")
    env = os.environ | {"TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, str(script), str(out), json.dumps(FLA_CASES[request.param])],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return out, torch.load(out / "reference.pt")


def test_fla_logits_in_every_form_and_greedy_tokens(fla_reference, tmp_path):
    out, ref = fla_reference
    cli(["convert", str(out / "model"), str(tmp_path / "converted")])
    model = RetNetForCausalLM.from_pretrained(tmp_path / "converted").float().eval()
    assert model.config.rotary_layout == "halves" and model.config.head_norm_weight
    worst = 0.0
    with torch.no_grad():
        for tokens, want in zip(ref["prompts"], ref["logits"], strict=True):
            for form in FORMS:
                worst = max(worst, (model(tokens, use_cache=False, **form).logits - want).abs().max().item())
    assert worst <= ATOL, worst
    start = ref["prompts"][1]
    assert torch.equal(model.generate(start, max_new_tokens=8, do_sample=False), ref["greedy"])


def test_fla_older_fused_gate_proj_converts_to_the_same_model(fla_reference, tmp_path):
    out, ref = fla_reference
    folder = tmp_path / "old"
    folder.mkdir()
    state = load_file(out / "model" / "model.safetensors")
    for key in [k for k in state if k.endswith("mlp.up_proj.weight")]:  # [gate; up] in one matrix
        gate = key.replace("up_proj", "gate_proj")
        state[gate] = torch.cat([state[gate], state.pop(key)], dim=0)
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_bytes((out / "model" / "config.json").read_bytes())
    model = RetNetForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        got = model(ref["prompts"][2], use_cache=False).logits
    assert (got - ref["logits"][2]).abs().max() <= ATOL


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.fixture
def torchscale_file(tmp_path) -> tuple[Path, dict]:
    """A small later-generation torchscale state dict (built by hand: no torchscale needed) and its path."""
    d, F_, H = 16, 32, 2
    log_decay = torch.log(1 - 2.0 ** (-5 - torch.arange(H)))
    state = {"embed_tokens.weight": torch.randn(V, d), "output_projection.weight": torch.randn(V, d),
             "layer_norm.weight": torch.ones(d), "retnet_rel_pos.decay": log_decay}  # fmt: skip
    p = "layers.0."
    for name, shape in dict(q=(d, d), k=(d, d), v=(2 * d, d), g=(2 * d, d), out=(d, 2 * d)).items():
        state[f"{p}retention.{name}_proj.weight"] = torch.randn(shape)
    state |= {f"{p}retention_layer_norm.weight": torch.ones(d), f"{p}final_layer_norm.weight": torch.ones(d)}
    state |= {f"{p}ffn.fc1.weight": torch.randn(F_, d), f"{p}ffn.gate.weight": torch.randn(F_, d),
              f"{p}ffn.fc2.weight": torch.randn(d, F_)}  # fmt: skip
    file = tmp_path / "model.pt"
    torch.save(state, file)
    return file, state


def test_a_hand_built_torchscale_state_dict_converts(torchscale_file):
    config, state, _ = convert(torchscale_file[0])
    assert (config.num_heads, config.ffn_activation, config.norm) == (2, "geglu", "rmsnorm")
    assert "model.retnet.blocks.0.retention.q_proj.weight" in state


def test_unknown_layout_names_the_file_and_the_layouts(tmp_path):
    file = tmp_path / "weights.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, file)
    with pytest.raises(ConversionError, match=rf"{file}.*unknown checkpoint layout.*torchscale.*--from"):
        convert(file)


def test_missing_key_names_the_file_and_the_key(torchscale_file):
    file, state = torchscale_file
    del state["layers.0.ffn.fc2.weight"]
    torch.save(state, file)
    with pytest.raises(ConversionError, match=rf"{file}: missing key 'layers.0.ffn.fc2.weight'"):
        convert(file)


def test_shape_that_disagrees_with_the_config_names_the_key(torchscale_file):
    file, state = torchscale_file
    state["layers.0.retention.k_proj.weight"] = torch.randn(8, 16)
    torch.save(state, file)
    with pytest.raises(ConversionError, match=r"'layers.0.retention.k_proj.weight' has shape \(8, 16\).*implies"):
        convert(file)


def test_unsupported_tensors_are_refused_by_name(torchscale_file):
    file, state = torchscale_file
    state["layers.0.moe_layer.gate.wg.weight"] = torch.zeros(2)
    torch.save(state, file)
    with pytest.raises(ConversionError, match="moe_layer"):
        convert(file)


class NeedsCode:
    """Unpickling this class would need its code, which weights_only refuses."""


def test_pickle_that_needs_code_is_refused_naming_the_file_and_the_way_out(torchscale_file):
    file, state = torchscale_file
    torch.save({"model": state, "cfg": NeedsCode()}, file)
    with pytest.raises(ConversionError, match=rf"{file}: cannot be read with torch.load\(weights_only=True\).*plain"):
        convert(file)
    with pytest.raises(SystemExit, match="weights_only"):
        cli(["convert", str(file), str(file.parent / "out")])


def test_missing_source_and_wrong_layout_name(tmp_path, torchscale_file):
    with pytest.raises(ConversionError, match=r"no-such-file\.pt: no such file"):
        convert(tmp_path / "no-such-file.pt")
    with pytest.raises(ConversionError, match="unknown layout 'gpt'"):
        convert(torchscale_file[0], layout="gpt")
