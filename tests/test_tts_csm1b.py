"""CSM-1B, the largest published shape: transformers' `CsmForConditionalGeneration` at its default (= sesame/csm-1b)
size fits our `csm-1b` preset tensor for tensor. The default test builds both models without memory (torch's
meta device, MLX's lazy arrays); the `long` one writes a real-shape random checkpoint with `save_pretrained`
(bf16, ~3.5 GB) and runs a frame from it.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import ROPE
from pipelines.tts.model import Model, ModelArgs
from pipelines.tts.weights import check_weights, detect_format, sanitize

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _csm1b_config():
    from transformers import CsmConfig

    # sesame/csm-1b's config.json: transformers' defaults plus Llama-3 RoPE scaling in both transformers
    return CsmConfig(rope_parameters=dict(ROPE), depth_decoder_config=dict(rope_parameters=dict(ROPE)))


def test_csm1b_transformers_layout_fits_the_preset():
    from transformers import CsmForConditionalGeneration

    cfg = _csm1b_config()
    assert ModelArgs.from_dict(cfg.to_dict()) == ModelArgs.preset("csm-1b")
    with torch.device("meta"):
        ref = CsmForConditionalGeneration(cfg)
    # what save_pretrained writes: persistent tensors, one of each tied pair
    tied_or_params = dict(ref.named_parameters(remove_duplicate=False))
    saved = {k: v.shape for k, v in ref.state_dict().items() if k not in tied_or_params}
    saved.update({k: v.shape for k, v in ref.named_parameters()})
    assert len(saved) == len(ref.state_dict()) - 1
    weights = {k: mx.zeros(tuple(shape), mx.bfloat16) for k, shape in saved.items()}  # lazy: never allocated
    args = ModelArgs.preset("csm-1b")
    check_weights(Model(args), sanitize(weights, args, detect_format(list(weights))), "csm-1b")


@pytest.mark.long
def test_csm1b_real_shape_save_pretrained_loads_and_runs_a_frame(tmp_path):
    import resource
    import time

    from transformers import CsmForConditionalGeneration

    from pipelines.tts.generator import MLXFrames
    from pipelines.tts.weights import load_checkpoint
    from tts_helpers import greedy, two_context_prompt

    start = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # half the memory; the real repos are bf16 too
    try:
        torch.manual_seed(0)
        CsmForConditionalGeneration(_csm1b_config()).save_pretrained(tmp_path)
    finally:
        torch.set_default_dtype(default)
    written = time.perf_counter()
    ck = load_checkpoint(tmp_path)
    assert ck.format == "transformers" and ck.args == ModelArgs.preset("csm-1b") and ck.codec_files
    loaded = time.perf_counter()
    tokens, mask = two_context_prompt(np.random.default_rng(0), text_vocab=1000)
    frames = greedy(MLXFrames(ck.model), tokens, mask, 1)
    done = time.perf_counter()
    assert frames.shape == (1, 32) and (frames >= 0).all() and (frames < ck.args.audio_vocab_size).all()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"csm-1b: save_pretrained {written - start:.0f} s, load {loaded - written:.0f} s, "
          f"first frame {done - loaded:.1f} s, peak RSS {peak_gb:.1f} GB")
