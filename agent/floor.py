"""Who holds the floor: how mic blocks become user turns, shared by every transport and replay.

A `Floor` is fed, block by block, the mic audio, the push-to-talk key actions due at that block and whether the
agent is speaking; it drives the VAD (pipelines/vad.py `Endpointer`, which decides where speech ends) and
returns a `Step` saying what to do: utterances to answer, a barge-in, a mute change and the key actions to
record, speculation hooks, and the floor's events in order. It owns no thread and no device; the session loop
(agent/loop.py) is its only caller.

- hands-free: the VAD endpoints each utterance.
- push-to-talk: a press begins an utterance, a release ends it; a press always takes the floor (unmutes, and
  stops a reply under way in half-duplex).
- half-duplex (without barge-in): the VAD is muted while the agent speaks, so it never hears itself.
- replay passes the recorded mute spans instead: the VAD is then muted exactly as it was live.
- the words: the agent's verdict on a pause (`judge`) may end the turn there; speech soon after continues it
  (`Step.reopened`: the reply to the piece is withdrawn). While such a turn may still be continued and the
  agent is not yet audible, half-duplex does not mute the VAD (the user is heard going on); once the agent is
  audible the turn can no longer be continued (speech is then a barge-in, or the agent's own echo).
Whatever a transport does to the floor (commit, clear, duplex, turn detection) goes through the session loop,
which records it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from agent.events import Event, SpeechChanged, TurnReopened, UtteranceEnded
from pipelines.vad import (
    Endpointer,
    SpeechEnded,
    SpeechPaused,
    SpeechReopened,
    SpeechResumed,
    SpeechStarted,
    Utterance,
)


@dataclass
class Step:
    """What one mic block decided; `mute` and `keys` are to be recorded at the block's mic time, in that order."""

    mute: bool | None = None  # the new mute state, when it changed
    keys: list[str] = field(default_factory=list)  # key actions applied ("press" / "release")
    barge_in: bool = False  # the user took the floor while the agent was speaking: stop the reply
    utterances: list[Utterance] = field(default_factory=list)  # to answer, in order
    speculate: Utterance | None = None  # speech paused: the utterance so far, worth answering ahead
    drop_speculation: bool = False  # speech resumed: the speculation is stale
    reopened: bool = False  # speech continued a turn the words had ended: withdraw the reply to it
    events: list[Event] = field(default_factory=list)  # speech started / stopped, utterances ended, in order


class Floor:
    def __init__(self, vad: Endpointer, *, push_to_talk: bool, half_duplex: bool, barge_in: bool,
                 mutes: list[tuple[float, float]] | None = None):
        self.vad = vad
        self.push_to_talk, self.half_duplex, self.barge_in = push_to_talk, half_duplex, barge_in
        self.mutes = mutes  # replay: the recorded mic-time spans the VAD was muted
        self.muted = False
        self.heard_s = 0.0  # mic audio fed, and how much of it while muted (why no turn was taken)
        self.muted_s = 0.0
        self.started = 0  # utterances begun / ended
        self.ended = 0

    @property
    def in_speech(self) -> bool:
        """The user is speaking (hands-free), or holds the key (push-to-talk)."""
        return self.vad.in_speech

    def set_duplex(self, full: bool) -> None:
        """Full duplex: the VAD listens while the agent speaks and speech cuts the reply; half: it is muted."""
        self.half_duplex, self.barge_in = not full, full

    def set_endpointing(self, vad: Endpointer, on: bool) -> None:
        """Turn detection on (the VAD ends turns, speech cuts a reply) or off (a commit ends them): a new VAD,
        between turns."""
        self.vad, self.push_to_talk, self.barge_in = vad, not on, on
        self.muted = False

    def clear(self) -> None:
        """Forget the speech under way (nothing of it is answered)."""
        self.vad.reset()

    def _want_mute(self, t: float, speaking: bool, holding: bool, audible: bool) -> bool:
        if holding:
            return False
        if self.mutes is not None:
            return any(a <= t < b for a, b in self.mutes)
        if self.vad.reopenable and not audible:
            return False  # the user may go on with the turn the words ended: keep listening until the agent speaks
        return self.half_duplex and not self.barge_in and speaking

    def step(self, t: float, block: np.ndarray, keys: list[str], speaking: bool, rate: int,
             audible: bool = False) -> Step:
        """`block` starts at mic time `t`; `keys` are the key actions due at `t`. `speaking`: the agent is
        answering or audible; `audible`: its voice is playing."""
        step = Step()
        if audible and self.vad.reopenable:
            self.vad.close_reopening()  # once the agent is heard, speech is not more of the turn it answers
        pressed = self.push_to_talk and "press" in keys
        holding = self.push_to_talk and (self.vad.in_speech or pressed)
        mute = self._want_mute(t, speaking, holding, audible)
        if mute != self.muted:
            self.muted = step.mute = mute
            self.vad.mute(mute)
        events = []
        for action in keys:
            if action == "press" and not self.vad.in_speech:
                events.append(self.vad.begin())
            elif action == "release":
                utterance = self.vad.end()
                if utterance is not None:
                    events.append(SpeechEnded(utterance))
            if action in ("press", "release"):
                step.keys.append(action)
        for ev in events + self.vad.process(block):
            self._apply(ev, step, t, speaking, pressed)
        self.heard_s += len(block) / rate
        self.muted_s += len(block) / rate if self.muted else 0.0
        return step

    def judge(self, t: float, end_s: float, probability: float) -> Step:
        """The words' verdict (at mic time `t`) on the pause whose utterance so far ended at `end_s`."""
        step = Step()
        for ev in self.vad.judge(end_s, probability):
            self._apply(ev, step, t, False, False)
        return step

    def flush(self, t: float) -> Step:
        """End of input (or a transport's commit at mic time `t`): an utterance still open (speaking, or the key
        held) is ended now."""
        step = Step()
        for ev in self.vad.flush():
            self._apply(ev, step, t, False, False)
        return step

    def _apply(self, ev, step: Step, t: float, speaking: bool, pressed: bool) -> None:
        if isinstance(ev, SpeechReopened):
            # no barge-in: a turn reopens only while the agent is not heard yet, and the reopening withdraws the
            # reply to it (`reopened`); `speaking` then counts that reply, which nobody heard
            step.reopened = True
            step.events += [SpeechChanged(t, True), TurnReopened(t, ev.start_s)]
        elif isinstance(ev, SpeechStarted):
            self.started += 1
            step.events.append(SpeechChanged(t, True))
            if speaking and (self.barge_in or (pressed and self.half_duplex)):
                step.barge_in = True
        elif isinstance(ev, SpeechEnded):
            self.ended += 1
            step.utterances.append(ev.utterance)
            step.events += [SpeechChanged(t, False), UtteranceEnded(t, ev.utterance)]
        elif isinstance(ev, SpeechPaused):
            step.speculate = ev.utterance
        elif isinstance(ev, SpeechResumed):
            step.speculate, step.drop_speculation = None, True

    def why_silent(self, unanswered: int) -> str:
        """Why no turn was taken, given how many utterances the ASR found no words in."""
        if unanswered:
            return f"the ASR heard no words in the {unanswered} utterance(s) the VAD found"
        if self.heard_s and self.muted_s >= self.heard_s - 1e-6:
            return "the microphone was muted all along (half-duplex: the agent was speaking)"
        return (f"no speech found in {self.heard_s:.1f} s of mic audio (too quiet? check the input level, "
                f"vad.energy_margin_db, or that the right microphone is used)")
