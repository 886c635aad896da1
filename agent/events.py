"""What a session tells whoever follows it: typed events, delivered to a list of listeners.

A session (agent/loop.py) emits two kinds of events on one `Listeners` fan-out:

- the floor's, on the transport's thread, at a mic time `t`: a mute change, a push-to-talk key, a barge-in, a
  duplex switch, a commit or clear of the user's input, speech starting and stopping, an utterance ended;
- the turn engine's, on the worker's thread: speculation, the transcript, the reply as it is generated and
  spoken, a reply kept out of the history, the finished turn.

The session bundle (`agent.session.SessionRecorder.listen`), the browser page's narration and the Realtime
adapter are listeners like any other: a listener gets every event and picks the types it cares about. Each
event's `kind` is the `type` of its row in a bundle's events.jsonl (replay reads "mute" and "key" back).
A listener must be quick and must not raise: it runs on the thread that emitted the event.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from agent.conversation import Turn
    from pipelines.vad import Utterance


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"
    recorded: ClassVar[bool] = True  # written to the session bundle's events.jsonl

    def row(self) -> dict:
        """The event's fields as a bundle row records them (without `t`, which the recorder places)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "t"}


# ---- the floor's: on the transport's thread, at mic time t ------------------------------------------------

@dataclass(frozen=True)
class FloorEvent(Event):
    t: float  # mic-stream seconds: where replay applies it again


@dataclass(frozen=True)
class MuteChanged(FloorEvent):
    kind: ClassVar[str] = "mute"
    on: bool  # the VAD is muted (half-duplex: the agent is speaking)


@dataclass(frozen=True)
class KeyAction(FloorEvent):
    kind: ClassVar[str] = "key"
    action: str  # "press" | "release"


@dataclass(frozen=True)
class BargedIn(FloorEvent):
    """The user took the floor while the agent spoke (or a client cancelled): the reply is cut."""

    kind: ClassVar[str] = "barge_in"


@dataclass(frozen=True)
class DuplexChanged(FloorEvent):
    kind: ClassVar[str] = "duplex"
    full: bool
    echo_cancellation: bool | None = None  # what the page said of the browser's echo canceller


@dataclass(frozen=True)
class TurnDetectionChanged(FloorEvent):
    kind: ClassVar[str] = "turn_detection"
    on: bool  # the VAD ends turns (off: the transport's commit does)


@dataclass(frozen=True)
class InputCommitted(FloorEvent):
    """The transport ended the user's turn: the speech so far is the utterance."""

    kind: ClassVar[str] = "commit"


@dataclass(frozen=True)
class InputCleared(FloorEvent):
    """The transport dropped the user's speech so far."""

    kind: ClassVar[str] = "clear"


@dataclass(frozen=True)
class SpeechChanged(FloorEvent):
    kind: ClassVar[str] = "speech"
    recorded: ClassVar[bool] = False  # the utterances' own times are in the transcript rows
    on: bool  # the user started (True) or stopped (False) speaking


@dataclass(frozen=True)
class UtteranceEnded(FloorEvent):
    kind: ClassVar[str] = "utterance"
    recorded: ClassVar[bool] = False
    utterance: Utterance  # the floor ended a user turn: it is answered unless the transport holds it


@dataclass(frozen=True)
class TurnReopened(FloorEvent):
    """The user went on speaking soon after the words had ended the turn: the reply to that piece is withdrawn,
    and the turn, from `start_s`, ends again later with both pieces."""

    kind: ClassVar[str] = "reopen"
    start_s: float


# ---- the turn engine's: on the worker's thread ---------------------------------------------------------------

@dataclass(frozen=True)
class SpeculationEvent(Event):
    start_s: float  # the utterance speculated on, by its start in the mic stream


@dataclass(frozen=True)
class Speculated(SpeculationEvent):
    kind: ClassVar[str] = "speculation"
    end_s: float
    transcript: str
    ms: float


@dataclass(frozen=True)
class TurnJudged(SpeculationEvent):
    """The words heard so far, judged: the reply model's probability that they are a finished message."""

    kind: ClassVar[str] = "end_of_turn"
    end_s: float
    probability: float
    ms: float  # the judging's own time (the transcript's is in the speculation's)


@dataclass(frozen=True)
class SpeculationKept(SpeculationEvent):
    """The endpoint confirmed the utterance: the speculation's transcript and reply are used."""

    kind: ClassVar[str] = "speculation_kept"


@dataclass(frozen=True)
class SpeculationDropped(SpeculationEvent):
    """The user went on speaking: nothing of the speculation was played or kept."""

    kind: ClassVar[str] = "speculation_dropped"


@dataclass(frozen=True)
class Transcribed(Event):
    kind: ClassVar[str] = "transcript"
    text: str  # empty: no words heard, no turn taken
    start_s: float
    end_s: float
    decided_s: float
    reason: str


@dataclass(frozen=True)
class ReplyStarted(Event):
    kind: ClassVar[str] = "reply_start"
    recorded: ClassVar[bool] = False  # a reply started on a speculation may be dropped; the next starts afresh


@dataclass(frozen=True)
class ReplyText(Event):
    kind: ClassVar[str] = "reply"
    recorded: ClassVar[bool] = False
    text: str  # a piece of the reply as the LLM generates it (before it is spoken)


@dataclass(frozen=True)
class Said(Event):
    kind: ClassVar[str] = "say"
    text: str  # a sentence (or the piece of one) handed to the TTS


@dataclass(frozen=True)
class ReplyRejected(Event):
    """A candidate reply whose first piece failed the form checks: it was not spoken (nor sent to a client)."""

    kind: ClassVar[str] = "reply_rejected"
    text: str  # its first sentence or clause
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReplyKeptOut(Event):
    kind: ClassVar[str] = "reply_kept_out"
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EchoHeard(Event):
    kind: ClassVar[str] = "echo"
    text: str  # an utterance that was the agent's own reply heard back: no turn


@dataclass(frozen=True)
class TurnWithdrawn(Event):
    """A reply to a turn the user went on with (reopened): nothing of it is kept, in the history or the bundle's
    turns; `said` is what had been spoken of it already."""

    kind: ClassVar[str] = "withdrawn"
    start_s: float
    said: str = ""


@dataclass(frozen=True)
class TurnEnded(Event):
    kind: ClassVar[str] = "turn"
    turn: Turn

    def row(self) -> dict:
        turn = self.turn
        return {"index": turn.index, "transcript": turn.transcript, "reply": turn.reply,
                "interrupted": turn.interrupted, "waterfall": turn.waterfall, "context_turns": turn.context_turns,
                "agent_frames": 0 if turn.agent is None or turn.agent.codes is None else int(turn.agent.codes.shape[1])}


Listener = Callable[[Event], None]


class Listeners:
    """The session's fan-out: `emit` calls every listener in the order they were added. Emitted from two
    threads (the floor's events on the transport's, the engine's on the worker's); the list itself is guarded."""

    def __init__(self, *listeners: Listener | None):
        self._lock = threading.Lock()
        self._listeners: list[Listener] = [x for x in listeners if x is not None]

    def add(self, listener: Listener, first: bool = False) -> None:
        """`first`: before every listener already there (the bundle: what a client is told is on disk)."""
        with self._lock:
            self._listeners.insert(0 if first else len(self._listeners), listener)

    def emit(self, event: Event) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)

    __call__ = emit
