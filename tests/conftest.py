"""Shared fixtures: tiny random Marvis models, a tiny text tokenizer, the shared speech fixtures."""

from __future__ import annotations

import os
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
def mimi():
    from pipelines.tts.codec import MimiCodec

    return MimiCodec(seed=0)


@pytest.fixture()
def tiny_tts(tiny_args, tiny_tokenizer, mimi):
    from pipelines.tts.generator import GenerationConfig, MarvisTTS, TextTokenizer
    from pipelines.tts.weights import random_model

    return MarvisTTS(random_model(tiny_args, seed=0), TextTokenizer(tiny_tokenizer), mimi,
                     GenerationConfig(seed=0, max_audio_length_ms=800))


@pytest.fixture(scope="session")
def jfk_path() -> Path:
    path = FIXTURES / "jfk.flac"
    if not path.is_file():
        pytest.skip("tests/fixtures/jfk.flac is missing (copy it from ../shared/fixtures)")
    return path


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/bootstrap.sh installs it with apt)")
    return path
