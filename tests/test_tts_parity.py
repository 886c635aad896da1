"""Our MLX Marvis == transformers' CsmForConditionalGeneration, number for number, on random weights.

The same random weights go through our loader in two formats: the transformers layout (q/k permuted
for rotate-half RoPE) and the original torchtune layout (interleaved q/k).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pipelines.tts.generator import GenerationConfig  # noqa: E402
from pipelines.tts.prompt import Prompt, TextTokenizer  # noqa: E402
from pipelines.tts.stage import MarvisTTS  # noqa: E402
from pipelines.tts.weights import load_checkpoint  # noqa: E402
from tts_helpers import our_logits, prompt_rows, reference_frames  # noqa: E402

K, V = 32, 2051


@pytest.mark.parametrize("fmt", ["transformers", "torchtune", "transformers, CPU layout"])
def test_logits_match_reference(fmt, reference, transformers_dir, torchtune_file):
    """Also with the layout the MLX frame loop runs on a CPU (`Model.prepare_for_cpu`: the depth decoder as
    `(W @ x.T).T`, the backbone over [in, out] buffers): the fast path carries the same parity."""
    ck = load_checkpoint(transformers_dir if fmt.startswith("transformers") else torchtune_file)
    assert ck.format == fmt.split(",")[0]
    if fmt.endswith("CPU layout"):
        ck.model.prepare_for_cpu()
        assert type(ck.model.decoder.layers[0].mlp.down_proj).__name__ == "ColumnLinear"
    tokens, mask = prompt_rows(np.random.default_rng(1))
    ref_frames, ref_logits = reference_frames(reference, tokens, mask, n_frames=3)
    ours = our_logits(ck.model, tokens, mask, ref_frames)
    for f, (a, b) in enumerate(zip(ours, ref_logits)):
        assert a.shape == b.shape == (K, V)
        err = np.abs(a - b).max() / max(1.0, np.abs(b).max())
        assert err < 1e-4, f"frame {f}: max relative logit error {err:.2e}"


def test_greedy_generation_matches_reference(reference, transformers_dir, tiny_tokenizer, mimi):
    ck = load_checkpoint(transformers_dir)
    tts = MarvisTTS(ck, TextTokenizer(tiny_tokenizer), mimi)
    tokens, mask = prompt_rows(np.random.default_rng(2))
    n = 12
    ref_frames, _ = reference_frames(reference, tokens, mask, n_frames=n)
    prompt = Prompt(tokens, mask, context_used=2, max_frames=n)
    ours = np.array(list(tts.frames.frames(prompt, GenerationConfig(temperature=0.0, stop_on_eos=False))))
    assert ours.shape == (n, K)
    np.testing.assert_array_equal(ours, ref_frames)
    # the codes are not degenerate: the comparison means something
    assert len(np.unique(ref_frames)) > 50
