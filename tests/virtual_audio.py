"""A virtual ALSA sound card for tests: real PortAudio streams, a "mic" that plays a file, a "speaker" that records one.

Built from `tests/fixtures/virtual-audio.asoundrc`. What that card does (alsa-lib 1.2.8, PortAudio 19.6, measured):

- It has no clock. Its slave is ALSA's `null` PCM, which always reports a full buffer available, so PortAudio
  runs the streams as fast as the CPU allows (~2000x real time: 80 MB/s of zeros into the speaker file).
  `VirtualCard` restores real time: it points the file plugin's outputs (the mic's tap and the speaker's
  recording) at FIFOs that a thread drains at the stream's byte rate, so the plugin's blocking writes pace the
  streams. Both then run about 0.3 s ahead of the wall clock (the pipe plus one ALSA buffer), then in step.
- The mic reads its file with plain `read()`s. At the end of the file the stream does not stop or fail: the
  reads return nothing and PortAudio delivers whatever the ring buffer held before, i.e. the last ~0.1 s again
  and again. `VirtualCard` appends `mic_silence_s` of zeros, so after the speech the mic delivers silence forever.
- Opened as 16-bit mono at 16 kHz (the file's format), capture is bit-exact. The speaker file holds the samples
  exactly as the stream was opened (int16 -> s16le, float32 -> f32le; no header, so no rate): `SpeakerSink`
  opens int16 mono, the file then holds s16le at the sink's rate, led by one ALSA buffer of PortAudio's zeros.
- ALSA reads its config when PortAudio initialises, which sounddevice does on import: run device code in a
  subprocess with `env` (or call `sd._terminate(); sd._initialize()`, which re-reads it). `ALSA_CONFIG_PATH`
  replaces the system config, so the host's own cards stay out of the test. An empty config file makes
  PortAudio 19.6 abort the process on import (assertion `devIdx < numDeviceNames`): use `NO_DEVICES_CONFIG`.
- The card cannot be unplugged, but its mic can fail for real: once its tap FIFO has no reader, the file plugin's
  write gets EPIPE, `snd_pcm_mmap_commit` returns the error, and PortAudio ends the stream from its callback
  thread (`stream.active` turns False, the finished callback runs): what a USB mic pulled out mid-stream does.
  A read error on the mic's own file would not do: ALSA logs it and goes on. See `VirtualCard.unplug_mic`.
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "virtual-audio.asoundrc"
MIC_RATE = 16000  # the mic file's format: s16le mono 16 kHz
NO_DEVICES_CONFIG = 'pcm.!default { type hw card 99 }\n'  # a bogus default and nothing else: PortAudio sees no device
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Python >= 3.10 on Linux)


def write_asoundrc(folder: Path, mic_raw: Path, played_raw: Path, mic_tap: Path | str = "/dev/null") -> Path:
    """The fixture with its placeholders filled in, saved as `folder/asoundrc`."""
    text = FIXTURE.read_text()
    text = text.replace("MIC_RAW", str(mic_raw)).replace("PLAYED_RAW", str(played_raw))
    text = text.replace('file "/dev/null"', f'file "{mic_tap}"')  # where the mic's file plugin records what it captured
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "asoundrc"
    path.write_text(text)
    return path


def alsa_env(config: Path) -> dict[str, str]:
    """This process's environment with ALSA (and so PortAudio) reading only `config`."""
    return dict(os.environ, ALSA_CONFIG_PATH=str(config))


def virtual_card_env(tmp_path: Path, mic_raw: Path, played_raw: Path) -> dict[str, str]:
    """Env for a subprocess that sees the card over plain files, unpaced (see above): prefer `VirtualCard`."""
    return alsa_env(write_asoundrc(Path(tmp_path) / "alsa", mic_raw, played_raw))


def no_devices_env(tmp_path: Path) -> dict[str, str]:
    """Env for a subprocess in which PortAudio finds no audio device at all."""
    folder = Path(tmp_path) / "alsa-none"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "asoundrc").write_text(NO_DEVICES_CONFIG)
    return alsa_env(folder / "asoundrc")


class PacedDrain:
    """Reads a FIFO at `bytes_per_s` on a thread, so whoever writes into it is held to real time."""

    def __init__(self, fifo: Path, bytes_per_s: int, keep_to: Path | None = None, chunk_s: float = 0.01):
        os.mkfifo(fifo)
        self._fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader must exist before ALSA opens it to write
        fcntl.fcntl(self._fd, _F_SETPIPE_SZ, 4096)  # the smallest pipe: little slack ahead of real time
        self.bytes_per_s = bytes_per_s
        self.total = 0
        self._chunk = max(2, int(bytes_per_s * chunk_s) // 2 * 2)
        self._out = open(keep_to, "wb") if keep_to is not None else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"drain {fifo.name}", daemon=True)
        self._thread.start()

    def _keep(self, data: bytes) -> None:
        self.total += len(data)
        if self._out is not None:
            self._out.write(data)

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
                continue
            if not select.select([self._fd], [], [], 0.05)[0]:
                continue
            try:
                data = os.read(self._fd, self._chunk)
            except BlockingIOError:
                continue
            if not data:  # no writer right now (stream closed or not yet open)
                time.sleep(0.005)
                continue
            due = max(due, time.monotonic() - 0.02) + len(data) / self.bytes_per_s  # idle time earns no burst
            self._keep(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        while True:  # what the writer left behind, unpaced
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            self._keep(data)
        os.close(self._fd)
        if self._out is not None:
            self._out.close()


class VirtualCard:
    """The virtual card in real time: `with VirtualCard(tmp_path, speech) as card: subprocess.run(..., env=card.env)`.

    `mic_pcm` ([T] int16 at 16 kHz) is what the mic hears, then `mic_silence_s` of silence (then silence forever).
    The speaker is paced for `speaker_rate` Hz int16 mono streams; `played()` returns what it recorded, after close.
    """

    def __init__(self, tmp_path: Path, mic_pcm: np.ndarray | None = None, *, speaker_rate: int = 24000,
                 mic_silence_s: float = 30.0):
        self.folder = Path(tmp_path) / "virtual-card"
        self.folder.mkdir(parents=True, exist_ok=True)
        speech = np.zeros(0, np.int16) if mic_pcm is None else np.asarray(mic_pcm, dtype=np.int16)
        self.mic_raw = self.folder / "mic.raw"
        np.concatenate([speech, np.zeros(int(mic_silence_s * MIC_RATE), np.int16)]).astype("<i2").tofile(self.mic_raw)
        self.played_raw = self.folder / "played.raw"
        self.speaker_rate = speaker_rate
        self.config = write_asoundrc(self.folder, self.mic_raw, played_raw=self.folder / "speaker.fifo",
                                     mic_tap=self.folder / "mic-tap.fifo")
        self.env = alsa_env(self.config)
        self._drains: list[PacedDrain] = []

    def __enter__(self) -> "VirtualCard":
        self._mic_tap = PacedDrain(self.folder / "mic-tap.fifo", MIC_RATE * 2)
        self._drains = [self._mic_tap,
                        PacedDrain(self.folder / "speaker.fifo", self.speaker_rate * 2, keep_to=self.played_raw)]
        return self

    def unplug_mic(self) -> int:
        """Make the mic fail mid-stream (see the module docstring); returns the samples it delivered until then."""
        self._drains.remove(self._mic_tap)
        self._mic_tap.close()
        return self.mic_samples_read

    def __exit__(self, *exc) -> None:
        for drain in self._drains:
            drain.close()

    @property
    def mic_samples_read(self) -> int:
        """Samples the mic has delivered so far (its tap is paced like the speaker)."""
        return self._mic_tap.total // 2

    def played(self) -> np.ndarray:
        """[T] int16: everything the speaker played, PortAudio's leading zeros included."""
        return np.fromfile(self.played_raw, dtype="<i2")


def espeak_pcm16(text: str, folder: Path, sample_rate: int = MIC_RATE) -> np.ndarray | None:
    """Real synthetic speech as [T] int16 mono at `sample_rate`; None when espeak-ng is not installed."""
    if shutil.which("espeak-ng") is None:
        return None
    from pipelines.audio import load_audio

    wav = Path(folder) / "espeak.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
    audio = load_audio(wav, sample_rate)
    return np.round(np.clip(audio, -1.0, 32767 / 32768) * 32768).astype(np.int16)
