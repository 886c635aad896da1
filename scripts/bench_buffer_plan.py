"""How well the playback buffer is planned, on frame timings recorded from the real TTS.

    .venv/bin/python scripts/bench_buffer_plan.py record /tmp/traces.json [--loads 0,0.5,1] [--reps 3]
    .venv/bin/python scripts/bench_buffer_plan.py replay /tmp/traces.json [more.json ...] [--margin-streams N]

`record` streams four sentences `--reps` times with the default config's TTS, with another process busy on each
share of one core in `--loads` (agent/bench/load.py), and keeps each stream's frame-to-frame intervals.
`replay` plays every recorded stream again through the stage's own chunk rule and `ReplyVoice` on a simulated
clock: frame n takes the time it took when recorded, a Mimi call of n frames (23.4 + 4 n) ms on an idle machine
and 1.6x / 1.9x that with half / one core taken (scripts/bench_mimi_chunks.py). Per load it prints the wait from
the first chunk to the first sample and the stalls, for the margin the stage chooses (`rate_margin`), for fixed
margins, and for the oracle: the margin each stream turned out to need (`rate_need`), known in advance; each
with the buffer planned at the first chunk only (as before 2026-12-06) and planned again while the listener waits.
The stage's own plan is what is timed; only the clock and Mimi's audio are simulated.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXTS = ["Sure, the capital of France is Paris, a city known for its museums.",
         "I would suggest a short walk by the sea in the morning, then a quiet lunch somewhere nearby.",
         "That is a good question.",
         "Penguins live in the south, and they cannot fly, but they swim very well indeed."]
MIMI_SCALE = {0.0: 1.0, 0.5: 1.6, 1.0: 1.9}  # a Mimi call's cost with that share of a core taken, over idle


def record(path: Path, loads: list[float], reps: int) -> None:
    from agent.bench.load import busy_core
    from agent.build import build_tts
    from agent.config import load_config

    tts = build_tts(load_config("default"), log=lambda line: None)
    out: dict[str, list[list[float]]] = {}
    for load in loads:
        with busy_core(load):
            time.sleep(1.0)
            for _ in range(reps):
                for text in TEXTS:
                    for _ in tts.stream(text):
                        pass
                    out.setdefault(str(load), []).append(list(tts._intervals))
                    iv = np.array(tts._intervals)
                    print(f"load {load:g}: {len(iv) + 1} frames, mean {iv.mean() * 1000:.1f} ms, "
                          f"first {iv[0] * 1000:.1f} ms", flush=True)
    path.write_text(json.dumps(out))


def replay(paths: list[Path]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    import pipelines.tts.stage as stage
    from agent.metrics import play
    from agent.sinks import ReplaySink
    from agent.voice import ReplyVoice
    from pipelines.messages import AudioChunk
    from pipelines.tts.codec import FRAME_SIZE, MimiCodec
    from pipelines.tts.generator import GenerationConfig
    from pipelines.tts.model import ModelArgs, TransformerArgs
    from pipelines.tts.prompt import TextTokenizer
    from pipelines.tts.weights import random_model

    traces: dict[float, list[list[float]]] = {}
    for p in paths:
        for load, rows in json.loads(p.read_text()).items():
            traces.setdefault(float(load), []).extend(rows)
    folder = Path(tempfile.mkdtemp())  # a tiny word-level tokenizer: the frames are simulated, not made
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "hello": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    small = TransformerArgs(num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=16, intermediate_dim=32)
    tts = stage.MarvisTTS(random_model(ModelArgs(backbone=small, decoder=small, text_vocab_size=16), seed=0),
                          TextTokenizer(folder), MimiCodec(seed=0), GenerationConfig(seed=0))
    now, cur = [0.0], {"iv": [0.05], "scale": 1.0}

    def frames(*a, **k):  # frame n takes the recorded interval before it (the first one: the first interval)
        for n in range(len(cur["iv"]) + 1):
            now[0] += cur["iv"][max(0, n - 1)]
            yield np.zeros(tts.num_codebooks, np.int32)

    def chunk(decoder, pending, first):
        tts.decode_seconds, tts.decode_frames = (0.0234 + 0.004 * len(pending)) * cur["scale"], len(pending)
        now[0] += tts.decode_seconds
        codes = np.stack(pending, axis=1)
        return AudioChunk(np.zeros(len(pending) * FRAME_SIZE, np.float32), codes, first, tts.sample_rate, FRAME_SIZE)

    tts.clock, tts.frames.frames, tts._chunk = (lambda: now[0]), frames, chunk
    tts.max_chars = lambda config=None: None  # one piece per stream, as recorded
    stage.frame_cap = lambda *a, **k: len(cur["iv"]) + 1  # the plan covers the frames the stream made
    own = stage.MarvisTTS.rate_margin

    def fixed(m):
        return lambda rows, i, seen: m

    policies = {"the stage's plan": None, "margin 1.0": fixed(1.0), "margin 1.1": fixed(1.1),
                "margin 1.2": fixed(1.2), "oracle": lambda rows, i, seen: max(1.0, stage.rate_need(rows[i], seen) or 1.0)}
    again = ReplyVoice._plan_again
    print("load  plan                         wait p50   p90 ms   stalls p50   p90   max ms   streams with a stall")
    for load, rows in sorted(traces.items()):
        cur["scale"] = MIMI_SCALE.get(load, 1.0 + load)
        for (name, policy), once in [(item, once) for item in policies.items() for once in (True, False)]:
            # once: the buffer planned at the first chunk only (as before 2026-12-06); else planned again while
            # the listener waits
            ReplyVoice._plan_again = (lambda self, text, out_s: None) if once else again
            tts.frame_seconds, tts.decode_seconds, tts.decode_frames, tts._intervals = None, 0, 0, []
            tts.past_intervals = []
            waits, stalls = [], []
            for i, iv in enumerate(rows):
                cur["iv"] = iv
                tts.rate_margin = ((lambda seen=1: own(tts, seen)) if policy is None
                                   else (lambda seen=1, rows=rows, i=i, policy=policy: policy(rows, i, seen)))
                cfg = GenerationConfig(seed=0, max_audio_length_ms=(len(iv) + 1) * 80, chunk_frames=8,
                                       first_chunk_frames=2, stop_on_eos=False)
                voice = ReplyVoice(tts, cfg, 0, sink=ReplaySink(tts.sample_rate), clock=lambda: now[0],
                                   least_prebuffer_s=0.08)
                voice.say("hello")
                heard = play(voice.timeline, tts.sample_rate, voice.prebuffer)
                waits.append((heard.start - voice.timeline[0][0]) * 1000)
                stalls.append(voice.playback()["stall_ms"])
            w, s = np.array(waits), np.array(stalls)
            label = name + (", first chunk only" if once else ", planned again")
            print(f"{load:<5g} {label:28s} {np.percentile(w, 50):8.0f} {np.percentile(w, 90):8.0f} "
                  f"{np.percentile(s, 50):12.0f} {np.percentile(s, 90):5.0f} {s.max():8.0f}   "
                  f"{int((s > 0).sum())} of {len(s)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("out", type=Path)
    rec.add_argument("--loads", default="0,0.5,1")
    rec.add_argument("--reps", type=int, default=3)
    rep = sub.add_parser("replay")
    rep.add_argument("traces", type=Path, nargs="+")
    rep.add_argument("--margin-streams", type=int, default=None,
                     help="plan with the most the last N streams needed (the stage's MARGIN_STREAMS otherwise)")
    opts = ap.parse_args()
    if opts.what == "record":
        record(opts.out, [float(x) for x in opts.loads.split(",")], opts.reps)
    else:
        if opts.margin_streams is not None:
            import pipelines.tts.stage as stage

            stage.MARGIN_STREAMS = max(1, opts.margin_streams)
        replay(opts.traces)


if __name__ == "__main__":
    main()
