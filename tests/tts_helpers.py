"""Marvis test helpers shared by the parity tests (MLX == transformers) and the ONNX Runtime tests
(ONNX == MLX): prompts of the real row layout, each implementation's teacher-forced logits, greedy frames.
Test modules import these from here, never from each other."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from pipelines.tts.generator import FrameGenerator, GenerationConfig, MLXFrames
from pipelines.tts.ort import OrtFrameModel
from pipelines.tts.prompt import Prompt

K = 32


def prompt_rows(rng):
    """Two context segments (text rows, audio rows, EOS frame) + target text rows."""
    rows, masks = [], []

    def text(n):
        t = np.zeros((n, K + 1), np.int32)
        m = np.zeros_like(t, bool)
        t[:, -1] = rng.integers(3, 96, n)
        m[:, -1] = True
        rows.append(t)
        masks.append(m)

    def audio(n):
        t = np.zeros((n + 1, K + 1), np.int32)
        m = np.zeros_like(t, bool)
        t[:n, :K] = rng.integers(0, 2048, (n, K))
        m[:, :K] = True
        rows.append(t)
        masks.append(m)

    for part, n in ((text, 5), (audio, 4), (text, 6), (audio, 3), (text, 7)):
        part(n)
    return np.concatenate(rows), np.concatenate(masks)


def two_context_prompt(rng, text_vocab=96):
    """Two context segments (text rows, audio rows, EOS frame) + target text rows: tokens, mask [T, K+1]."""
    rows, masks = [], []
    for n_text, n_audio in ((5, 4), (6, 3)):
        t = np.zeros((n_text + n_audio + 1, K + 1), np.int32)
        m = np.zeros_like(t, bool)
        t[:n_text, -1] = rng.integers(3, text_vocab, n_text)
        m[:n_text, -1] = True
        t[n_text:n_text + n_audio, :K] = rng.integers(0, 2048, (n_audio, K))
        m[n_text:, :K] = True
        rows.append(t), masks.append(m)
    t = np.zeros((7, K + 1), np.int32)
    t[:, -1] = rng.integers(3, text_vocab, 7)
    rows.append(t), masks.append(np.zeros_like(t, bool))
    masks[-1][:, -1] = True
    return np.concatenate(rows), np.concatenate(masks)


def reference_embeds(model, tokens, mask):
    import torch

    t = torch.from_numpy(tokens).long()
    text = model.embed_text_tokens(t[:, -1])
    audio = model.backbone_model.embed_tokens(t[None, :, :K])[0]
    is_text = torch.from_numpy(mask[:, -1])[:, None]
    return torch.where(is_text, text, audio)[None]


def reference_frames(model, tokens, mask, n_frames, forced=None):
    """transformers' CSM: greedy frames with per-step logits; `forced` [F, K] teacher-forces the codes instead."""
    import torch

    with torch.no_grad():
        return _reference_frames_no_grad(torch, model, tokens, mask, n_frames, forced)


def _reference_frames_no_grad(torch, model, tokens, mask, n_frames, forced):
    emb = reference_embeds(model, tokens, mask)
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


def our_logits(model, tokens, mask, forced):
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


def ort_step_logits(ort, tokens, mask, forced):
    """The frame graph's per-codebook logits [K, V] for each frame, teacher-forced with `forced` codes."""
    cache = ort.make_cache()
    out = []
    for codes in forced:
        got, logits = ort.run(tokens, mask, cache, forced=codes)
        np.testing.assert_array_equal(got, codes)  # forcing really forces
        out.append(logits.copy())
        tokens = np.r_[codes, 0][None].astype(np.int32)
        mask = np.r_[np.ones(K, bool), False][None]
    return out


def greedy(backend, tokens, mask, n):
    cfg = GenerationConfig(temperature=0.0, stop_on_eos=False)
    return np.array(list(FrameGenerator(backend).frames(Prompt(tokens, mask, 0, n), cfg)))


def assert_dequantised_on_onnx(model, cache_dir) -> None:
    """The ONNX graphs built from an MLX-quantised model give its logits (rel 1e-3) over 2 forced frames."""
    tokens, mask = two_context_prompt(np.random.default_rng(8))
    forced = greedy(MLXFrames(model), tokens, mask, 2)
    ref = our_logits(model, tokens, mask, forced)
    got = ort_step_logits(OrtFrameModel(model, cache_dir=cache_dir), tokens, mask, forced)
    for a, b in zip(got, ref):
        assert np.abs(a - b).max() / np.abs(b).max() < 1e-3
