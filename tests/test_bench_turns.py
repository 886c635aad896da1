"""`voice-agent bench turns`: the pause events are labelled right, and the rule table counts right."""

from __future__ import annotations

import math

import pytest

from agent.bench import turns as bench
from agent.config import load_config
from conftest import require_checkpoints, require_tool


def event(group: str, label: str, pause_ms: float, p: float, s: float = 0.0, asr_ms: float = 100.0,
          llm_ms: float = 20.0, smart_turn_ms: float = 30.0) -> dict:
    return {"group": group, "label": label, "pause_ms": pause_ms, "p": p, "s": s, "asr_ms": asr_ms, "llm_ms": llm_ms,
            "smart_turn_ms": smart_turn_ms}


HAND_MADE = [
    event("espeak", "hold", 450, p=0.0001),  # "I'd like to book |450"
    event("espeak", "hold", 900, p=0.4, s=0.9),  # a finished-sounding clause, then more
    event("real", "hold", 1100, p=0.02),
    event("espeak", "end", math.inf, p=0.5, asr_ms=600, llm_ms=50),
    event("real", "end", math.inf, p=0.005, s=0.8),
]


def test_rule_table_counts_cut_offs_and_waits():
    rows = {r["rule"]: r for r in (bench.evaluate(rule, HAND_MADE, 300, ("espeak", "real"))
                                   for rule in bench.rules(smart_turn=True))}
    silence = rows["silence 700"]  # cuts the 900 and 1100 ms pauses, not the 450 ms one
    assert (silence["espeak"]["cut"], silence["espeak"]["holds"], silence["real"]["cut"]) == (1, 2, 1)
    assert silence["all"] == {"cut": 2, "holds": 3, "pct": pytest.approx(200 / 3)}
    assert (silence["mean_wait"], silence["mean_ready"], silence["missed"], silence["ends"]) == (700, 700, 0, 2)
    assert rows["silence 1500"]["all"]["cut"] == 0 and rows["silence 300"]["all"]["cut"] == 3

    words = rows["words(p>=0.01: 200, else 1000)"]  # holds: 1000 (kept), 200 (cut at 900), 200 (cut at 1100)
    assert (words["espeak"]["cut"], words["real"]["cut"]) == (1, 1)
    assert words["mean_wait"] == pytest.approx((200 + 1000) / 2)
    # the words exist 300 ms (SpeechPaused) + ASR + score after the last voice: 950 and 1000 (w itself is later)
    assert words["mean_ready"] == pytest.approx((950 + 1000) / 2)
    assert words["p90_ready"] == pytest.approx(950 + 0.9 * 50)

    hold = rows["words+hold(p>=0.3: 200, p<0.001: 1500, else 700)"]  # holds: 1500, 200, 700 -> cuts 900, 1100
    assert hold["all"]["cut"] == 2 and hold["mean_wait"] == pytest.approx((200 + 700) / 2)

    smart = rows["smart turn (s>0.5: 200, else 700)"]  # holds: 700 (cut at 450), 200 (cut at 900), 700 (kept)
    assert smart["all"]["cut"] == 2 and smart["mean_wait"] == (700 + 200) / 2  # ends: s 0.0 and 0.8
    assert smart["mean_ready"] == pytest.approx((700 + 330) / 2)  # 330: 300 + Smart Turn's 30 ms

    either = rows["words|smart(p>=0.3 or s>0.5: 200, else 700)"]
    assert either["all"]["cut"] == 2 and either["mean_wait"] == 200  # each end: words or Smart Turn say done
    assert either["mean_ready"] == pytest.approx(((300 + 680) + (300 + 150)) / 2)  # both inputs, one after another


def test_a_missed_end_is_counted():
    short = [event("espeak", "end", 600, p=0.0)]  # an "end" whose silence stopped at 600 ms
    row = bench.evaluate(bench.Rule("silence 700", lambda e: 700), short, 300, ("espeak",))
    assert row["missed"] == 1 and math.isnan(row["espeak"]["pct"])


def test_scripted_pause_gives_holds_then_the_end(tmp_path):
    require_tool("espeak-ng")
    turn = bench.synthetic_turn(tmp_path, "test", "Can you recommend |700 a book about |400 birds?")
    assert [round(b - a, 2) for a, b, _ in turn.pauses] == [0.7, 0.4]
    events = bench.detect_events(turn, bench.bench_vad_config(load_config("default")))
    labels = [e["label"] for e in events]
    assert labels[-1] == "end" and set(labels[:-1]) == {"hold"}
    scripted = [e for e in events if e["origin"] == "scripted"]
    assert len(scripted) == 2
    # the VAD's silence run is the pause, give or take its frames and the words' soft edges
    assert 600 <= scripted[0]["pause_ms"] <= 800 and 300 <= scripted[1]["pause_ms"] <= 500
    assert math.isinf(events[-1]["pause_ms"])
    # the cache gives the same turn back
    again = bench.synthetic_turn(tmp_path, "test", "Can you recommend |700 a book about |400 birds?")
    assert (again.audio == turn.audio).all() and again.text == "Can you recommend a book about birds?"


@pytest.fixture(scope="module")
def jfk_events():
    turn = next(t for t in bench.real_turns() if t.source == "jfk")
    return bench.detect_events(turn, bench.bench_vad_config(load_config("default")))


def test_jfk_pauses_are_holds_and_silence_700_cuts_them(jfk_events):
    holds = [e for e in jfk_events if e["label"] == "hold"]
    assert len(holds) >= 3 and [e["label"] for e in jfk_events].count("end") == 1
    assert jfk_events[-1]["label"] == "end"
    long_ones = [e for e in holds if e["pause_ms"] >= 1000]  # after "Americans," and after "ask not"
    assert len(long_ones) == 2
    rows = {rule.name: bench.evaluate(rule, [dict(e, p=0.0, s=0.0) for e in jfk_events], 300, ("real",))
            for rule in bench.rules(smart_turn=False)[:5]}
    assert rows["silence 700"]["real"]["cut"] >= 2  # both 1.1 s pauses cut the speaker off
    assert rows["silence 1500"]["real"]["cut"] == 0


@pytest.mark.slow
def test_features_on_jfk_with_the_real_models(jfk_events, tmp_path):
    require_checkpoints("whisper-tiny.en", "smollm2-135m-instruct")
    features = bench.Features(load_config("default"), tmp_path, smart_turn=False, log=lambda _: None)
    end = features.of(jfk_events[-1]["audio"])
    assert "country" in end["transcript"].lower() and 0.0 <= end["p"] <= 1.0 and end["asr_ms"] > 0
    cut = features.of(next(e for e in jfk_events if e["pause_ms"] >= 1000 and e["index"] > 0)["audio"])
    assert cut["transcript"].lower().rstrip(".").endswith("not") and cut["p"] < end["p"]
    features.save()
    assert bench.audio_key(jfk_events[-1]["audio"]) in bench.Features(load_config("default"), tmp_path,
                                                                       smart_turn=False).known
