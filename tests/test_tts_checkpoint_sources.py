"""Checkpoints written by the reference library's own save path, other models given as the TTS, and a scan
that nothing in the project can unpickle."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines.errors import CheckpointError
from pipelines.tts.weights import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrained_dir(reference, tiny_tokenizer, tmp_path_factory):
    """What `CsmForConditionalGeneration.save_pretrained` writes (codec included), plus the tokenizer."""
    folder = tmp_path_factory.mktemp("csm_save_pretrained")
    reference.save_pretrained(folder)
    shutil.copy(tiny_tokenizer / "tokenizer.json", folder)
    return folder


def test_transformers_save_pretrained_loads_with_tied_embedding(reference, pretrained_dir, tiny_tokenizer, mimi):
    from safetensors import safe_open
    from test_tts_parity import _prompt, _reference_frames

    from pipelines.tts.generator import GenerationConfig
    from pipelines.tts.prompt import Prompt, TextTokenizer
    from pipelines.tts.stage import MarvisTTS

    with safe_open(str(pretrained_dir / "model.safetensors"), "np") as f:
        keys = set(f.keys())
    # transformers writes only one of the two tied audio embeddings; either must do
    tied = {"backbone_model.embed_tokens.embed_audio_tokens.weight", "depth_decoder.model.embed_tokens.weight"}
    assert len(keys & tied) == 1
    ck = load_checkpoint(pretrained_dir)
    assert ck.format == "transformers" and not ck.random_weights
    ref = reference.backbone_model.embed_tokens.embed_audio_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(np.array(ck.model.audio_embeddings.weight), ref)

    tts = MarvisTTS(ck, TextTokenizer(tiny_tokenizer), mimi)
    tokens, mask = _prompt(np.random.default_rng(3))
    ref_frames, _ = _reference_frames(reference, tokens, mask, n_frames=8)
    prompt = Prompt(tokens, mask, context_used=2, max_frames=8)
    ours = np.array(list(tts.frames.frames(prompt, GenerationConfig(temperature=0.0, stop_on_eos=False))))
    np.testing.assert_array_equal(ours, ref_frames)


def test_tts_command_on_save_pretrained_and_mlx_8bit(pretrained_dir, tiny_args, tiny_tokenizer, tmp_path):
    import json

    import mlx.nn as nn
    import soundfile as sf

    from agent.cli import main
    from pipelines.tts.weights import random_model, save_checkpoint

    q8 = random_model(tiny_args, seed=1).model
    nn.quantize(q8, group_size=32, bits=8)
    q8_dir = save_checkpoint(q8, tmp_path / "q8")
    cfg = json.loads((q8_dir / "config.json").read_text())
    (q8_dir / "config.json").write_text(json.dumps({**cfg, "quantization": {"group_size": 32, "bits": 8}}))
    shutil.copy(tiny_tokenizer / "tokenizer.json", q8_dir)
    for ckpt in (pretrained_dir, q8_dir):
        out = tmp_path / f"{ckpt.name}.wav"
        assert main(["tts", "hello there", "-o", str(out), "--checkpoint", str(ckpt), "--seed", "2",
                     "--max-ms", "400"]) == 0
        audio, rate = sf.read(out)
        assert rate == 24000 and len(audio) == 5 * 1920


@pytest.mark.parametrize("name,what", [("whisper-tiny.en", "Whisper model"), ("smollm2-135m-instruct", "text LLM")])
def test_other_models_are_named(name, what):
    folder = ROOT / "checkpoints" / name
    if not folder.is_dir():
        pytest.skip(f"checkpoints/{name} is not bootstrapped")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    msg = str(err.value)
    assert f"this is a {what}, not Marvis" in msg and str(folder) in msg and "\n" not in msg


def test_tokenizer_that_does_not_fit_is_refused(tiny_args, tmp_path):
    from tokenizers import Tokenizer, models

    from pipelines.tts.weights import random_model, save_checkpoint

    folder = save_checkpoint(random_model(tiny_args, seed=1).model, tmp_path / "ck")
    vocab = {f"w{i}": i for i in range(tiny_args.text_vocab_size + 5)}
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(folder / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"tokenizer.json: the tokenizer has 133 tokens but the model's text "
                                              r"embedding has 128; use the tokenizer that came with"):
        load_checkpoint(folder)
    vocab = {f"w{i}": i for i in range(tiny_args.text_vocab_size)}
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(folder / "tokenizer.json"))
    assert load_checkpoint(folder).tokenizer_dir == folder


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02never opened")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"only pickle files \(pytorch_model.bin\).*convert them to safetensors"):
        load_checkpoint(tmp_path)


# (file, reason): must stay empty or each entry justified
ALLOWED_UNPICKLING: list[tuple[str, str]] = []
_UNPICKLING = [
    (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
    (re.compile(r"\b(c?pickle|dill|joblib)\.loads?\("), "pickle.load"),
]


def test_nothing_in_the_project_unpickles():
    sources = [p for d in ("agent", "pipelines", "scripts", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py")]
    assert len(sources) > 20
    found = []
    for path in sources:
        if path == Path(__file__).resolve():
            continue
        text = path.read_text(errors="replace")
        for pattern, what in _UNPICKLING:
            for m in pattern.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                rel = str(path.relative_to(ROOT))
                if rel not in {f for f, _ in ALLOWED_UNPICKLING}:
                    found.append(f"{rel}:{line}: {what}")
    assert not found, "\n".join(found)
    # the scan itself can fail
    assert _UNPICKLING[0][0].search("torch.load(f)") and not _UNPICKLING[0][0].search("torch.load(f, weights_only=True)")
