"""A busy machine: the cores other programs leave free are measured, and the TTS's pools and chunks follow them."""

from __future__ import annotations

import time

import pytest

from agent.bench.load import busy_core, parse_loads
from pipelines.cores import CoreMeter, threads_for


def test_threads_follow_the_cores_left_free():
    assert threads_for(2.0, 2) == 2
    assert threads_for(1.8, 2) == 2
    assert threads_for(1.33, 2) == 1  # another program on one core of two: a pool of one
    assert threads_for(0.2, 2) == 1  # never none
    assert threads_for(7.9, 8) == 8


def test_another_busy_process_is_seen(tmp_path):
    """A busy loop in another process shows as cores taken; this process's own work does not. Judged against a
    quiet window measured just before (this machine is shared: other tenants' load, and steal time, count as
    cores taken too), and tried up to three times so that a neighbour's burst is not read as our error."""
    meter = CoreMeter(least=0.0)
    if meter._last is None:
        pytest.skip("no /proc/stat here: every core counts as free")

    def window(seconds: float, spin: bool = False) -> float:
        meter.others()  # the window starts here
        end = time.monotonic() + seconds
        while spin and time.monotonic() < end:  # our own busy loop: not another program's
            pass
        time.sleep(max(0.0, end - time.monotonic()))
        return meter.others()

    for _ in range(3):
        quiet = window(0.6)
        own = window(0.6, spin=True)
        with busy_core(1.0):
            time.sleep(0.2)
            loaded = window(0.8)
        if own <= quiet + 0.4 and loaded >= quiet + 0.6:
            break
    assert own <= quiet + 0.4, (quiet, own)
    assert loaded >= quiet + 0.6, (quiet, loaded)


def test_bench_loads_are_shares_of_one_core():
    assert parse_loads("0,0.5,1") == [0.0, 0.5, 1.0]
    for bad in ("2", "-0.5", "half", ""):
        with pytest.raises(SystemExit, match="--load"):
            parse_loads(bad)


def test_chunks_never_so_small_that_mimi_makes_the_stream_slower_than_real_time(tiny_tts):
    """Mimi costs ~35 ms a call whatever its length: one-frame chunks at 50 ms a frame would run at 1.06x real
    time and never catch up. When the audio ahead cannot cover even one frame, the chunk has a floor where the
    decode's share keeps the stream at 90 %."""
    from pipelines.tts.stage import steady_chunk

    tiny_tts.frame_seconds, tiny_tts.decode_seconds = 0.050, 0.035
    assert steady_chunk(0.050, 0.035, 8) == 2  # 0.050 + 0.035 / 2 = 0.0675 s a frame: under 0.072
    assert tiny_tts._next_chunk(0.0, 8) == 2  # nothing ahead: still not one frame
    assert tiny_tts._next_chunk(0.11, 8, greedy=True) == 1  # the buffer was planned: the one frame that fits
    assert tiny_tts._next_chunk(0.11, 8) == 2  # the listener started at the first chunk: not below the floor
    assert tiny_tts._next_chunk(2.0, 8) == 8  # far ahead: the longest
    tiny_tts.frame_seconds = 0.075  # slower than 90 % of real time on its own: amortise Mimi all the way
    assert tiny_tts._next_chunk(0.0, 8) == 8


def test_no_stage_pool_spins(tmp_path, tiny_args):
    """Every ONNX Runtime pool of the agent sleeps between ops instead of spinning: with another program on one of
    two cores, a spinning pool waits at each op for its descheduled thread (the reply LLM spun inside a run: 22-26 ms
    a delta with a core taken against 17 on one idle thread; scripts/bench_threads.py). The one exception is the
    TTS frame graph's second session, which spins inside a run and is used only while every core is free."""
    from agent.build import build_asr, build_llm
    from agent.config import load_config
    from conftest import require_checkpoints
    from pipelines.tts.ort import OrtFrameModel
    from pipelines.tts.weights import random_model

    require_checkpoints("whisper-tiny.en", "smollm2-135m-instruct")
    cfg = load_config("default")
    sessions = {"llm": build_llm(cfg).net.session}
    asr = build_asr(cfg)
    net = asr._network()
    sessions.update(asr_encoder=net.encoder.session, asr_decoder=net.decoder.session, asr_cross=net.decoder.cross)
    tts = OrtFrameModel(random_model(tiny_args, seed=0).model, cache_dir=tmp_path / "tts")
    sessions["tts"] = tts.session
    for name, session in sessions.items():
        assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0", name
    spinning = tts.spinning.get_session_options()
    assert spinning.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert spinning.get_session_config_entry("session.force_spinning_stop") == "1"  # sleeps once a run ends


def test_the_frame_pool_spins_only_while_every_core_is_free(tiny_args, tiny_tokenizer, mimi, tmp_path_factory,
                                                            monkeypatch):
    """The TTS stage looks at the cores other programs leave free at each chunk: the frames run on the spinning
    session only while every core is free (idle: ~50 ms a frame against 59 sleeping; with a core taken a spinning
    pool takes 126 against 71), and both sessions make the same frames."""
    import numpy as np

    from pipelines.tts.generator import GenerationConfig
    from test_tts import make_tts

    tts = make_tts(tiny_args, tiny_tokenizer, mimi, "onnx", tmp_path_factory)
    ort = tts.frames.backend.ort
    assert ort.spinning is not ort.session
    cfg = GenerationConfig(seed=0, max_audio_length_ms=800, chunk_frames=2, first_chunk_frames=2, stop_on_eos=False)
    seen = [2.0, 2.0, 1.0, 1.0, 2.0] + [2.0] * 20  # the cores free at the stream's start, then after each chunk
    looks = iter(seen)
    monkeypatch.setattr(tts.cores, "cores", 2)
    monkeypatch.setattr(tts.cores, "free", lambda: next(looks))
    used = []
    run = ort.run

    def spied(*a, **k):
        used.append(ort.spin)
        return run(*a, **k)

    monkeypatch.setattr(ort, "run", spied)
    chunks = [c.codes for c in tts.stream("hello there how are you", 0, config=cfg)]
    frames = used[-sum(c.shape[1] for c in chunks):]  # the session each frame ran on
    # a chunk's frames run on the session chosen from the look before it (how many frames a chunk has follows
    # the measured rate, so it is taken from the chunks made)
    expected = [seen[k] >= 1.75 for k, c in enumerate(chunks) for _ in range(c.shape[1])]
    assert len(chunks) >= 5 and False in frames and frames == expected, (frames, [c.shape[1] for c in chunks])
    monkeypatch.setattr(tts.cores, "free", lambda: 1.0)  # a core taken all along: the sleeping pool, same frames
    again = [c.codes for c in tts.stream("hello there how are you", 0, config=cfg)]
    assert np.array_equal(np.concatenate(chunks, axis=1), np.concatenate(again, axis=1))
