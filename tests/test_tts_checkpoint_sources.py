"""Checkpoints written by the reference library's own save path, other models given as the TTS, and a scan
that nothing in the project can unpickle."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import require_checkpoints
from pipelines.errors import CheckpointError
from pipelines.tts.weights import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _randomise_transformers_mimi(codec) -> None:
    # The default init leaves codebooks empty, layer scales at 0.01 and norms at 1/0: random values everywhere,
    # so that a swapped or mis-laid tensor changes the output.
    import torch

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buf in codec.named_buffers():
            if name.endswith("embed_sum"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.05)
            elif name.endswith(("cluster_usage", "initialized")):
                buf.fill_(1.0)
        for name, p in codec.named_parameters():
            if name.endswith("layer_scale.scale"):
                p.uniform_(0.05, 0.3, generator=gen)
            elif "layernorm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def pretrained(reference, tiny_tokenizer, tmp_path_factory):
    """What `CsmForConditionalGeneration.save_pretrained` writes (its Mimi codec included, randomised), plus the
    tokenizer; and the model it saved."""
    model = copy.deepcopy(reference)
    _randomise_transformers_mimi(model.codec_model)
    folder = tmp_path_factory.mktemp("csm_save_pretrained")
    model.save_pretrained(folder)
    shutil.copy(tiny_tokenizer / "tokenizer.json", folder)
    return folder, model


@pytest.fixture(scope="module")
def pretrained_dir(pretrained):
    return pretrained[0]


def test_transformers_save_pretrained_loads_with_tied_embedding(reference, pretrained_dir, tiny_tokenizer, mimi):
    from safetensors import safe_open

    from pipelines.tts.generator import GenerationConfig
    from pipelines.tts.prompt import Prompt, TextTokenizer
    from pipelines.tts.stage import MarvisTTS
    from tts_helpers import prompt_rows, reference_frames

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
    tokens, mask = prompt_rows(np.random.default_rng(3))
    ref_frames, _ = reference_frames(reference, tokens, mask, n_frames=8)
    prompt = Prompt(tokens, mask, context_used=2, max_frames=8)
    ours = np.array(list(tts.frames.frames(prompt, GenerationConfig(temperature=0.0, stop_on_eos=False))))
    np.testing.assert_array_equal(ours, ref_frames)


def test_tts_command_on_save_pretrained_and_mlx_8bit(pretrained_dir, tiny_args, tiny_tokenizer, tmp_path, capsys):
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
        log = capsys.readouterr().err
        if ckpt == pretrained_dir:  # no moshi Mimi file in checkpoints/: the folder's own codec is used
            assert "Mimi trained" in log and f"mimi={ckpt / 'model.safetensors'} (transformers Mimi codec_model.*)" in log
        else:
            assert "Mimi UNTRAINED random weights" in log


def test_mimi_from_transformers_codec_model_equals_transformers(pretrained):
    """The codec inside a transformers CSM folder, mapped onto moshi's Mimi: same codes, same audio as
    transformers' own `MimiModel` on real speech."""
    import torch
    from safetensors import safe_open

    from conftest import SHARED_FIXTURES
    from pipelines.audio import load_audio
    from pipelines.tts.codec import MimiCodec

    folder, model = pretrained
    speech = SHARED_FIXTURES / "jfk.flac"
    if not speech.is_file():
        pytest.skip(f"{speech} is missing")
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        assert any(k.startswith("codec_model.encoder.layers.") for k in f.keys())  # the flat layout, as published
    ck = load_checkpoint(folder)
    assert ck.codec_files == (folder / "model.safetensors",) and ck.codec_config["num_quantizers"] == 32
    codec = MimiCodec.from_transformers(ck.codec_files, config=ck.codec_config)
    assert not codec.random_weights and codec.source == f"{folder / 'model.safetensors'} (transformers Mimi codec_model.*)"

    audio = load_audio(speech, 24_000)[24_000: 3 * 24_000]  # 2 s of speech = 25 frames
    ref = model.codec_model
    with torch.no_grad():
        ref_codes = ref.encode(torch.from_numpy(audio)[None, None], num_quantizers=32).audio_codes[0].numpy()
        ref_audio = ref.decode(torch.from_numpy(ref_codes)[None]).audio_values[0, 0].numpy()
    codes = codec.encode(audio)
    assert codes.shape == (32, 25) and len(np.unique(codes[0])) > 5
    np.testing.assert_array_equal(codes, ref_codes)
    ours = codec.decode(ref_codes)
    # measured: max |diff| 1.4e-5 with samples up to ~7 (float32 rounding)
    np.testing.assert_allclose(ours, ref_audio, rtol=0, atol=1e-4 * np.abs(ref_audio).max())


def test_transformers_mimi_that_does_not_fit_is_one_line(pretrained, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from pipelines.tts.codec import MimiCodec

    folder, model = pretrained
    with pytest.raises(CheckpointError, match=r"x.safetensors: this transformers Mimi is not moshi's Mimi: "
                                              r"sliding_window=100 \(moshi's: 250\)"):
        MimiCodec.from_transformers([tmp_path / "x.safetensors"], config={**model.config.codec_config.to_dict(),
                                                                            "sliding_window": 100})
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k.startswith("codec_model.")}
    del state["codec_model.decoder_transformer.layers.3.mlp_layer_scale.scale"]
    save_file(state, str(tmp_path / "codec.safetensors"))
    with pytest.raises(CheckpointError) as err:
        MimiCodec.from_transformers([tmp_path / "codec.safetensors"])
    assert str(err.value) == (f"{tmp_path / 'codec.safetensors'}: the transformers Mimi does not fit moshi's Mimi; "
                              "missing 1: decoder_transformer.transformer.layers.3.layer_scale_2.scale")


@pytest.mark.parametrize("name,what", [("whisper-tiny.en", "Whisper model"), ("smollm2-135m-instruct", "text LLM")])
def test_other_models_are_named(name, what):
    folder = require_checkpoints(name)
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
