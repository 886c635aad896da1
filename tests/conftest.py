"""Shared fixtures: tiny random Marvis models, a tiny text tokenizer, the shared speech fixtures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"


def tiny_tokenizer_dir(folder: Path) -> Path:
    """A word-level tokenizer.json with SmolLM2's special tokens at ids 1 and 2 (BOS/EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<|im_start|>", "<|im_end|>", "[", "]", ".", ",", "!", "?", "'"] + [str(i) for i in range(10)]
    words += "hello there how are you i am fine thanks what is the weather like today it sunny and warm".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return tiny_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_args():
    from pipelines.tts.model import ModelArgs, TransformerArgs

    return ModelArgs(
        backbone=TransformerArgs(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128),
        decoder=TransformerArgs(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64),
        text_vocab_size=128,
    )


@pytest.fixture(scope="session")
def tiny_marvis(tmp_path_factory, tiny_args, tiny_tokenizer) -> Path:
    """A tiny random Marvis saved as a checkpoint folder (MLX format + tokenizer.json): `--tts.checkpoint` for CLI runs."""
    from pipelines.tts.weights import random_model, save_checkpoint

    folder = save_checkpoint(random_model(tiny_args, seed=0).model, tmp_path_factory.mktemp("tiny-marvis"))
    shutil.copy(tiny_tokenizer / "tokenizer.json", folder)
    return folder


@pytest.fixture(scope="session")
def mimi():
    from pipelines.tts.codec import MimiCodec

    return MimiCodec(seed=0)


@pytest.fixture()
def tiny_tts(tiny_args, tiny_tokenizer, mimi):
    from pipelines.tts.generator import GenerationConfig
    from pipelines.tts.prompt import TextTokenizer
    from pipelines.tts.stage import MarvisTTS
    from pipelines.tts.weights import random_model

    return MarvisTTS(random_model(tiny_args, seed=0), TextTokenizer(tiny_tokenizer), mimi,
                     GenerationConfig(seed=0, max_audio_length_ms=800))


@pytest.fixture(scope="session")
def jfk_path() -> Path:
    path = FIXTURES / "jfk.flac"
    if not path.is_file():
        pytest.skip("tests/fixtures/jfk.flac is missing (copy it from ../shared/fixtures)")
    return path


def tiny_llama(rope_scaling: dict | None = None):
    """A fresh tiny random Llama (mlx-lm's own model class), the same weights every call."""
    import mlx.core as mx
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(0)
    args = ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=300,
                     rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=256,
                     rope_scaling=rope_scaling)
    model = Model(args)
    mx.eval(model.parameters())
    return model


def require_checkpoints(*names: str) -> Path:
    """Skip the test unless every `checkpoints/<name>` is prepared (a non-empty folder); the first one's path."""
    for name in names:
        folder = ROOT / "checkpoints" / name
        if not folder.is_dir() or not any(folder.iterdir()):
            pytest.skip(f"checkpoints/{name} is missing: run scripts/bootstrap.sh (voice-agent models prepare)")
    return ROOT / "checkpoints" / names[0]


def assert_config_holds(cfg, data: dict, defaults=None, where: str = "") -> None:
    """Every value in `data` (a config file's or overrides' nested dict: section -> key -> value, as written) is
    what the loaded `cfg` holds, typed as the field's default is (TOML's 3.0 for an int field, "true" for a bool)."""
    if defaults is None:
        from agent.config import AgentConfig

        defaults = AgentConfig()
    for key, value in data.items():
        got, default = getattr(cfg, key), getattr(defaults, key)
        if isinstance(value, dict):
            assert_config_holds(got, value, default, f"{where}{key}.")
            continue
        if isinstance(default, bool):
            want = value if isinstance(value, bool) else str(value).lower() in ("true", "1", "yes", "on")
        elif isinstance(default, (int, float, str)):
            want = type(default)(value)
        else:
            want = value
        assert got == want, f"{where}{key}: {got!r} != {want!r}"


def proc_status_mb(pid: int | str, *keys: str) -> tuple[float, ...]:
    """Sizes from a process's /proc status (VmRSS, RssAnon, RssFile, ...) in MB, one read for all: `pid` or
    "self". Linux only."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                found[key] = int(value.split()[0]) / 1024
    return tuple(found[key] for key in keys)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/bootstrap.sh installs it with apt)")
    return path


# ---- a random transformers CsmForConditionalGeneration: the reference, and checkpoints in two formats ----

K, V = 32, 2051  # Mimi codebooks, audio vocabulary (2048 codes + 3 specials)
ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


@pytest.fixture(scope="session")
def reference():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import CsmConfig, CsmForConditionalGeneration

    torch.manual_seed(0)
    cfg = CsmConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        text_vocab_size=96, vocab_size=V, num_codebooks=K, rope_parameters=dict(ROPE),
        depth_decoder_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, backbone_hidden_size=64, vocab_size=V, num_codebooks=K,
                                  rope_parameters=dict(ROPE)),
    )
    model = CsmForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random non-trivial values everywhere (the default init leaves some at zero/one)
        for name, p in model.named_parameters():
            if not name.startswith("codec_model."):
                p.normal_(0, 0.5 if "norm" in name else 0.08)
                if "norm" in name:
                    p.add_(1.0)
    return model


def _state(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if not k.startswith("codec_model.")}


@pytest.fixture(scope="session")
def transformers_dir(reference, tmp_path_factory, tiny_tokenizer):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("csm_transformers")
    save_file(_state(reference), str(folder / "model.safetensors"))
    shutil.copy(tiny_tokenizer / "tokenizer.json", folder)
    (folder / "config.json").write_text(json.dumps(reference.config.to_dict()))
    return folder


def _interleave(w, heads):
    out, inp = w.shape
    hd = out // heads
    return w.reshape(heads, 2, hd // 2, inp).transpose(1, 2).reshape(out, inp)


@pytest.fixture(scope="session")
def torchtune_file(reference, tmp_path_factory, tiny_tokenizer):
    """The same weights under the original names, q/k in interleaved order, config from our own schema."""
    cfg = reference.config
    names = {"self_attn.o_proj": "attn.output_proj", "self_attn.": "attn.", "input_layernorm.weight": "sa_norm.scale",
             "post_attention_layernorm.weight": "mlp_norm.scale", "mlp.gate_proj": "mlp.w1",
             "mlp.down_proj": "mlp.w2", "mlp.up_proj": "mlp.w3"}
    out = {}
    for k, v in _state(reference).items():
        if k.startswith("depth_decoder.model.embed_tokens"):
            continue
        heads = None
        if ".q_proj." in k:
            heads = cfg.num_attention_heads if k.startswith("backbone") else cfg.depth_decoder_config.num_attention_heads
        if ".k_proj." in k:
            heads = cfg.num_key_value_heads if k.startswith("backbone") else cfg.depth_decoder_config.num_key_value_heads
        if heads:
            v = _interleave(v, heads).contiguous()
        k = (k.replace("backbone_model.embed_tokens.embed_audio_tokens.weight", "audio_embeddings.weight")
              .replace("depth_decoder.model.inputs_embeds_projector.weight", "projection.weight")
              .replace("depth_decoder.codebooks_head.weight", "audio_head")
              .replace("embed_text_tokens.weight", "text_embeddings.weight")
              .replace("lm_head.weight", "codebook0_head.weight")
              .replace("backbone_model.", "backbone.").replace("depth_decoder.model.", "decoder."))
        for a, b in names.items():
            k = k.replace(a, b)
        k = k.replace("backbone.norm.weight", "backbone.norm.scale").replace("decoder.norm.weight", "decoder.norm.scale")
        out[k] = v
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("csm_torchtune")
    save_file(out, str(folder / "csm.safetensors"))
    shutil.copy(tiny_tokenizer / "tokenizer.json", folder)
    dd = cfg.depth_decoder_config
    part = lambda c: dict(num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                          num_kv_heads=c.num_key_value_heads, embed_dim=c.hidden_size,
                          intermediate_dim=c.intermediate_size)
    (folder / "csm.json").write_text(json.dumps({"backbone": part(cfg), "decoder": part(dd), "text_vocab_size": 96}))
    return folder / "csm.safetensors"


