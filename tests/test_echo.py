"""Echo cancellation (agent/echo.py) on real speech: the agent's own voice leaking back into the mic.

The far end is espeak-ng speech at 24 kHz, played block by block; the mic hears it 100 ms later at -6 dB
(a laptop speaker next to its mic), and 4 s in, the user talks over it. The mic goes through the real
webrtcvad endpointer, as in the live loop: with the canceller the echo opens no turn and the user's speech
does (so it can interrupt the reply); without it the echo itself is a turn.
"""

from __future__ import annotations

import numpy as np
import pytest

from agent.echo import EchoCanceller, is_echo
from pipelines.audio import resample
from pipelines.vad import Endpointer, SpeechEnded, SpeechStarted, VADConfig
from virtual_audio import espeak_pcm16

pytest.importorskip("livekit.rtc")

MIC, FAR = 16_000, 24_000
BLOCK_S = 0.03  # the live loop's mic block
AGENT = ("Hello, I am the agent. I am talking through the laptop speaker right now, and I will keep talking "
         "for quite a while so that you can interrupt me.")
USER = "Stop, please wait."
LEAD_S, DELAY_S, GAIN, USER_AT_S = 0.5, 0.1, 0.5, 4.5


def db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(x, dtype=np.float64)) + 1e-12))


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    folder = tmp_path_factory.mktemp("echo")
    agent = espeak_pcm16(AGENT, folder, FAR)
    if agent is None:
        pytest.skip("espeak-ng is not installed (Debian: apt install espeak-ng); it makes the test speech")
    agent = agent.astype(np.float32) / 32768
    user = espeak_pcm16(USER, folder).astype(np.float32) / 32768
    far = np.concatenate([np.zeros(int(LEAD_S * FAR), np.float32), agent, np.zeros(3 * FAR, np.float32)])
    delay = int(DELAY_S * MIC)
    echo = GAIN * np.concatenate([np.zeros(delay, np.float32), resample(far, FAR, MIC)])[: len(far) * MIC // FAR]
    mic = echo.copy()
    at = int(USER_AT_S * MIC)
    mic[at:at + len(user)] += user
    return dict(far=far, mic=mic, echo=echo, user=(USER_AT_S, USER_AT_S + len(user) / MIC),
                agent_end=LEAD_S + DELAY_S + len(agent) / FAR)


def run_mic(scene, cancel: bool):
    """Block by block as live: the speaker plays a block, the mic delivers one; returns (mic out, VAD events)."""
    far, mic = scene["far"], scene["mic"]
    canceller = EchoCanceller(MIC) if cancel else None
    vad = Endpointer(VADConfig(), MIC)
    n_mic, n_far = int(BLOCK_S * MIC), int(BLOCK_S * FAR)
    out, events = [], []
    for i in range(len(mic) // n_mic):
        block = mic[i * n_mic:(i + 1) * n_mic]
        if canceller is not None:
            canceller.far_end(far[i * n_far:(i + 1) * n_far], FAR)
            block = canceller.near_end(block)
            assert len(block) == n_mic  # 30 ms blocks come back whole
        out.append(block)
        for ev in vad.process(block):
            if isinstance(ev, SpeechStarted):
                events.append(("start", i * BLOCK_S))
            elif isinstance(ev, SpeechEnded):
                events.append(("utterance", ev.utterance.start_s, ev.utterance.end_s))
    return np.concatenate(out), events


def test_without_cancellation_the_echo_is_a_turn(scene):
    _, events = run_mic(scene, cancel=False)
    utterances = [e for e in events if e[0] == "utterance"]
    assert utterances and utterances[0][1] < LEAD_S + DELAY_S + 0.5  # the agent's own voice opened a turn


def test_with_cancellation_only_the_user_starts_a_turn(scene):
    out, events = run_mic(scene, cancel=True)
    user_start, user_end = scene["user"]
    starts = [e[1] for e in events if e[0] == "start"]
    utterances = [e for e in events if e[0] == "utterance"]
    assert starts and all(user_start <= s <= user_end for s in starts), events  # no start before the user talks
    assert len(utterances) == 1, events
    _, start, end = utterances[0]
    assert user_start - 0.35 <= start and end <= user_end + 0.1, (utterances, scene["user"])
    assert start < scene["agent_end"]  # the user spoke over the reply: in full duplex this is the barge-in

    mic = scene["mic"]
    echo_only = slice(int((LEAD_S + 1.0) * MIC), int((user_start - 0.1) * MIC))  # after 1 s of convergence
    attenuation = db(mic[echo_only]) - db(out[echo_only])
    print(f"\necho attenuation (echo alone, after 1 s): {attenuation:.1f} dB")
    assert attenuation >= 25
    talk = slice(int(user_start * MIC), int(user_end * MIC))
    residual = out[talk] - scene["echo"][talk]  # not a measure of the AEC, just: the user's voice is still there
    assert db(out[talk]) > db(out[echo_only]) + 20 and db(residual) > db(mic[talk]) - 10


def test_blocks_that_are_not_whole_frames_keep_every_sample():
    canceller = EchoCanceller(MIC)
    blocks = [np.zeros(n, np.float32) for n in (100, 250, 7, 443)]
    out = [canceller.near_end(b) for b in blocks]
    assert sum(map(len, out)) == 800 and all(len(o) % 160 == 0 for o in out)


@pytest.mark.parametrize("heard, said, echo", [
    ("I am talking through the laptop speaker", AGENT, True),
    ("i'm talking through the laptop speak", AGENT, True),  # ASR slips still match
    ("Im taking trough the lap top speaker", AGENT, True),
    ("Paris is the capital", "The capital of France is Paris.", False),
    ("Stop, please wait.", AGENT, False),
    ("What is the capital of France?", "The capital of France is Paris.", False),
    ("", AGENT, False),
    ("talking through the speaker", "", False),
])
def test_echo_guard_matches_the_agents_own_words(heard, said, echo):
    assert is_echo(heard, said) is echo


def test_guard_makes_the_agents_own_reply_heard_back_no_turn():
    from types import SimpleNamespace

    from agent.echo import guard_against_echo

    committed = []
    heard = SimpleNamespace(text="")
    asr = SimpleNamespace(transcribe=lambda audio, rate=16000: heard, warmup=lambda: None)
    llm = SimpleNamespace(stream=lambda text: iter(["The capital ", "of France is Paris."]),
                          commit=lambda user, reply: committed.append((user, reply)))
    stages = SimpleNamespace(asr=asr, llm=llm)
    echoes = []
    guard_against_echo(stages, echoes.append)
    stages.asr.warmup()  # everything else passes through
    heard.text = "The capital of France is Paris."
    assert stages.asr.transcribe(None).text == heard.text  # nothing said yet: not an echo
    assert "".join(stages.llm.stream("q")) == "The capital of France is Paris."
    stages.llm.commit("What is the capital of France?", "The capital of France is Paris.")
    assert committed == [("What is the capital of France?", "The capital of France is Paris.")]
    heard.text = " the capital of france is paris"
    assert stages.asr.transcribe(None).text == "" and echoes == ["the capital of france is paris"]
    heard.text = "Stop, please wait."
    assert stages.asr.transcribe(None).text == "Stop, please wait." and len(echoes) == 1
