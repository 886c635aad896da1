"""Our MLX Marvis == transformers' CsmForConditionalGeneration, number for number, on random weights.

The same random weights go through our loader in two formats: the transformers layout (q/k permuted
for rotate-half RoPE) and the original torchtune layout (interleaved q/k).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pipelines.tts.generator import GenerationConfig  # noqa: E402
from pipelines.tts.prompt import Prompt, TextTokenizer  # noqa: E402
from pipelines.tts.stage import MarvisTTS  # noqa: E402
from pipelines.tts.weights import load_checkpoint  # noqa: E402

K, V = 32, 2051


def _prompt(rng):
    """Two context segments (text rows, audio rows, EOS frame) + target text rows."""
    rows, masks = [], []

    def text(n):
        t = np.zeros((n, K + 1), np.int32); m = np.zeros_like(t, bool)
        t[:, -1] = rng.integers(3, 96, n); m[:, -1] = True
        rows.append(t); masks.append(m)

    def audio(n):
        t = np.zeros((n + 1, K + 1), np.int32); m = np.zeros_like(t, bool)
        t[:n, :K] = rng.integers(0, 2048, (n, K)); m[:, :K] = True
        rows.append(t); masks.append(m)

    text(5); audio(4); text(6); audio(3); text(7)
    return np.concatenate(rows), np.concatenate(masks)


def _ref_embeds(model, tokens, mask):
    t = torch.from_numpy(tokens).long()
    text = model.embed_text_tokens(t[:, -1])
    audio = model.backbone_model.embed_tokens(t[None, :, :K])[0]
    is_text = torch.from_numpy(mask[:, -1])[:, None]
    return torch.where(is_text, text, audio)[None]


@torch.no_grad()
def _reference_frames(model, tokens, mask, n_frames, forced=None):
    """Greedy frames with per-step logits; `forced` [F, K] teacher-forces the codes instead."""
    emb = _ref_embeds(model, tokens, mask)
    out = model.backbone_model(inputs_embeds=emb, use_cache=True)
    cache, h = out.cache, out.last_hidden_state[:, -1]
    frames, logits_log = [], []
    for f in range(n_frames):
        step_logits = [model.lm_head(h)[0]]
        c0 = forced[f, 0] if forced is not None else int(step_logits[0].argmax())
        codes = [int(c0)]
        dec = model.depth_decoder(input_ids=torch.tensor([[0, codes[0]]]), backbone_last_hidden_state=h,
                                  use_cache=True, logits_to_keep=1)
        for k in range(1, K):
            lg = dec.logits[0, -1]
            step_logits.append(lg)
            ck = int(forced[f, k]) if forced is not None else int(lg.argmax())
            codes.append(ck)
            if k < K - 1:
                dec = model.depth_decoder(input_ids=torch.tensor([[ck]]), cache=dec.cache, use_cache=True,
                                          logits_to_keep=1)
        frames.append(codes)
        logits_log.append(torch.stack(step_logits).numpy())
        row = model.backbone_model.embed_tokens(torch.tensor([[codes]]))
        out = model.backbone_model(inputs_embeds=row, cache=cache, use_cache=True)
        cache, h = out.cache, out.last_hidden_state[:, -1]
    return np.array(frames), logits_log


def _our_logits(model, tokens, mask, forced):
    """Per-step logits of our network, teacher-forced with the reference's codes."""
    cache = model.make_backbone_cache()
    t, m = mx.array(tokens)[None], mx.array(mask)[None]
    logs = []
    for codes in forced:
        h = model.backbone_hidden(t, m, cache)
        step = [model.codebook0_head(h)[0]]
        dcache = model.make_decoder_cache()
        x = mx.concatenate([h[:, None], model.embed_audio(0, mx.array([int(codes[0])]))], axis=1)
        for k in range(1, K):
            d = model.decoder_hidden(x, dcache)
            step.append(model.codebook_logits(d, k)[0])
            x = model.embed_audio(k, mx.array([int(codes[k])]))
        logs.append(np.array(mx.stack(step)))
        t = mx.array(np.r_[codes, 0].astype(np.int32))[None, None]
        m = mx.array(np.r_[np.ones(K, bool), False])[None, None]
    return logs


@pytest.mark.parametrize("fmt", ["transformers", "torchtune"])
def test_logits_match_reference(fmt, reference, transformers_dir, torchtune_file):
    ck = load_checkpoint(transformers_dir if fmt == "transformers" else torchtune_file)
    assert ck.format == fmt
    tokens, mask = _prompt(np.random.default_rng(1))
    ref_frames, ref_logits = _reference_frames(reference, tokens, mask, n_frames=3)
    ours = _our_logits(ck.model, tokens, mask, ref_frames)
    for f, (a, b) in enumerate(zip(ours, ref_logits)):
        assert a.shape == b.shape == (K, V)
        err = np.abs(a - b).max() / max(1.0, np.abs(b).max())
        assert err < 1e-4, f"frame {f}: max relative logit error {err:.2e}"


def test_greedy_generation_matches_reference(reference, transformers_dir, tiny_tokenizer, mimi):
    ck = load_checkpoint(transformers_dir)
    tts = MarvisTTS(ck, TextTokenizer(tiny_tokenizer), mimi)
    tokens, mask = _prompt(np.random.default_rng(2))
    n = 12
    ref_frames, _ = _reference_frames(reference, tokens, mask, n_frames=n)
    prompt = Prompt(tokens, mask, context_used=2, max_frames=n)
    ours = np.array(list(tts.frames.frames(prompt, GenerationConfig(temperature=0.0, stop_on_eos=False))))
    assert ours.shape == (n, K)
    np.testing.assert_array_equal(ours, ref_frames)
    # the codes are not degenerate: the comparison means something
    assert len(np.unique(ref_frames)) > 50
