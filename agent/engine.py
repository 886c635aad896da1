"""The turn engine: one user utterance in, one spoken reply out, the same for every mode.

utterance -> ASR -> LLM (streamed) -> sentences -> Marvis (streamed, with the conversation as context)
-> audio sink. All MLX work happens in the thread that calls `run_turn` (the modes give it one owner
thread), never in an audio callback. Each sentence gets the earlier sentences of the same reply as
context too, so the voice holds within a reply as well as across turns.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from agent.conversation import Conversation, Turn
from agent.metrics import Waterfall, summary_line
from pipelines.llm.sentences import SentenceSplitter, clean_for_speech
from pipelines.messages import ASRStage, ReplyStage, Segment, TTSStage
from pipelines.tts.load import TTSConfig
from pipelines.vad import Utterance


class AudioSink(Protocol):
    """Where the agent's audio goes: a speaker (agent/devices.py) or a replay buffer."""

    sample_rate: int
    on_first_sample: Callable[[float], None] | None

    def begin_utterance(self) -> None: ...
    def write(self, audio: np.ndarray) -> None: ...
    def end_of_stream(self) -> None: ...
    def clear(self) -> int: ...


@dataclass
class Stages:
    asr: ASRStage
    llm: ReplyStage
    tts: TTSStage
    tts_config: TTSConfig  # sampling knobs, the agent's and the user's voices, how much context to pass


class TurnEngine:
    def __init__(self, stages: Stages, conversation: Conversation | None = None, recorder=None,
                 log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic):
        self.stages = stages
        self.conversation = conversation or Conversation()
        self.recorder = recorder
        self.log = log
        self.clock = clock
        self.turn_seed = 0

    def warmup(self) -> None:
        for stage in (self.stages.asr, self.stages.llm, self.stages.tts):
            stage.warmup()

    def _event(self, kind: str, **data) -> None:
        if self.recorder is not None:
            self.recorder.event(kind, **data)

    def run_turn(self, utterance: Utterance, sink: AudioSink,
                 interrupted: Callable[[], bool] = lambda: False) -> Turn | None:
        """Answer one utterance. Returns None when the ASR heard no words (no turn is taken)."""
        st = self.stages
        decided = self.clock()
        wf = Waterfall(utterance.decided_s - utterance.end_s, decided)
        transcript = st.asr.transcribe(utterance.audio, utterance.sample_rate).text.strip()
        wf.mark("asr_final", self.clock())
        self._event("transcript", text=transcript, start_s=utterance.start_s, end_s=utterance.end_s,
                    decided_s=utterance.decided_s, reason=utterance.reason)
        if not transcript:
            self.log("(heard no words; no turn taken)")
            return None
        turn = self.conversation.new_turn(transcript)
        self.log(f"you   > {transcript}")
        context, turn.context_turns = self.conversation.context(st.tts_config.context_segments)
        sink.on_first_sample = lambda wall: wf.mark("first_sample_played", wall)
        sink.begin_utterance()

        splitter = SentenceSplitter()
        spoken: list[tuple[str, np.ndarray, np.ndarray]] = []  # sentence, audio, codes
        cfg = dataclasses.replace(st.tts_config, seed=st.tts_config.seed + turn.index)
        agent_speaker, user_speaker = cfg.speaker, cfg.user_speaker
        stopped = False

        def speak(sentence: str) -> None:
            nonlocal stopped
            text = clean_for_speech(sentence)
            if not text or stopped:
                return
            wf.mark("first_sentence", self.clock())
            own = [Segment(agent_speaker, s, codes=c) for s, _, c in spoken]
            audio_parts, code_parts = [], []
            for chunk in st.tts.stream(text, agent_speaker, context + own, config=cfg):
                wf.mark("first_tts_chunk", self.clock())
                if interrupted():
                    stopped = True
                    break
                sink.write(chunk.audio)
                audio_parts.append(chunk.audio)
                code_parts.append(chunk.codes)
            if audio_parts:
                spoken.append((text, np.concatenate(audio_parts), np.concatenate(code_parts, axis=1)))

        for delta in st.llm.stream(transcript):
            wf.mark("llm_first_token", self.clock())
            for sentence in splitter.push(delta):
                speak(sentence)
            if stopped or interrupted():
                stopped = True
                break
        if not stopped:
            for sentence in splitter.flush():
                speak(sentence)
        sink.end_of_stream()

        if stopped or interrupted():
            turn.interrupted = True
            played = sink.clear()
            spoken = _truncate_to_played(spoken, played, st.tts.samples_per_frame)
        turn.reply = " ".join(s for s, _, _ in spoken)
        self.log(f"agent > {turn.reply}" + (" [interrupted]" if turn.interrupted else ""))
        turn.user = Segment(user_speaker, transcript, utterance.audio, utterance.sample_rate)
        if spoken:
            turn.agent = Segment(agent_speaker, turn.reply, np.concatenate([a for _, a, _ in spoken]),
                                 st.tts.sample_rate, codes=np.concatenate([c for _, _, c in spoken], axis=1))
        st.llm.commit(transcript, turn.reply)
        turn.waterfall = wf.offsets()
        self.conversation.append(turn)
        self._finish(turn)
        # encode the user's audio now, while the reply plays, not inside the next turn's latency
        st.tts.prepare_context(turn.user)
        return turn

    def _finish(self, turn: Turn) -> None:
        self.log("  " + summary_line(turn.index, turn.waterfall))
        if self.recorder is None:
            return
        if turn.user is not None:
            self.recorder.turn_audio(turn.index, "user", turn.user.audio, turn.user.sample_rate)
        if turn.agent is not None:
            self.recorder.turn_audio(turn.index, "agent", turn.agent.audio, turn.agent.sample_rate)
        self._event("turn", index=turn.index, transcript=turn.transcript, reply=turn.reply,
                    interrupted=turn.interrupted, waterfall=turn.waterfall, context_turns=turn.context_turns,
                    agent_frames=0 if turn.agent is None else int(turn.agent.codes.shape[1]))


def _truncate_to_played(spoken, played_samples: int, samples_per_frame: int):
    """Keep only what the user heard: whole sentences, and the played part of the one cut off."""
    kept, left = [], played_samples
    for text, audio, codes in spoken:
        if left <= 0:
            break
        n = min(len(audio), left)
        frames = -(-n // samples_per_frame)
        kept.append((text, audio[:n], codes[:, :frames]))
        left -= n
    return kept
