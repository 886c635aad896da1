"""`voice-agent`: the product's verbs. Errors a user can act on are one line, never a traceback.

Config overrides are dotted flags after the verb: `voice-agent replay demo --vad.silence_ms 500`.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import sys
from pathlib import Path

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def _maybe_preload_openblas(argv: list[str]) -> None:
    """MLX's Linux CPU wheel ships a reference BLAS (~6 GFLOP/s); Debian's OpenBLAS is ~30x faster.
    It has to be loaded before MLX, so re-exec once with LD_PRELOAD when it is installed and a network of
    this command runs on MLX. Not otherwise: with every stage on ONNX Runtime it has nothing to speed up, and
    its idle threads can take cores from ONNX Runtime and PyTorch (measured here: a TTS frame 0.25 s without,
    0.32 s with it; on the whole demo the difference was within run-to-run noise)."""
    if platform.system() != "Linux" or not os.path.exists(OPENBLAS) or os.environ.get("VOICE_AGENT_NO_PRELOAD"):
        return
    if "openblas" in os.environ.get("LD_PRELOAD", "") or not _runs_mlx(argv):
        return
    env = dict(os.environ, LD_PRELOAD=":".join(filter(None, [OPENBLAS, os.environ.get("LD_PRELOAD")])))
    os.execve(sys.executable, [sys.executable, "-m", "agent.cli", *argv], env)


def _runs_mlx(argv: list[str]) -> bool:
    """Will this command run a network on MLX? For the agent's verbs, by their config's backends; any other
    verb (and anything unparsable, which the real run reports) keeps the preload. Silent: the real parse, after
    the re-exec, is the one that prints help or a usage error (once)."""
    import contextlib
    import io

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args, extra = _parser().parse_known_args(argv)
        if args.verb == "bench" and args.what == "agent":
            rest = list(args.args)
            name = rest[rest.index("--config") + 1] if "--config" in rest[:-1] else "demo"
            args.config, args.seed = name, None
            extra = rest
        elif args.verb not in ("chat", "ptt", "replay", "serve", "tts"):
            return True
        cfg = _config(args, _split_overrides(extra)[0])
        from agent.build import asr_placement, llm_placement
        from pipelines.tts.load import resolve_backend

        backends = {resolve_backend(cfg.tts).backend, llm_placement(cfg).backend, asr_placement(cfg).backend}
        return "mlx" in backends
    except (Exception, SystemExit):
        return True


def parse_with_config(parser: argparse.ArgumentParser):
    """(args, config) for a benchmark script: its own flags, `--config NAME` and dotted `--section.key value`
    overrides; anything else is the parser's one-line error."""
    from agent.config import load_config

    args, extra = parser.parse_known_args()
    overrides, unknown = _split_overrides(extra)
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    return args, load_config(args.config, overrides)


def _split_overrides(extra: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """`--vad.silence_ms 500` / `--vad.silence_ms=500` -> [("vad.silence_ms", "500")]; the rest is unknown."""
    pairs, unknown, i = [], [], 0
    while i < len(extra):
        arg = extra[i]
        m = re.fullmatch(r"--([a-z_]+(?:\.[a-z_]+)+)(?:=(.*))?", arg)
        if m and m.group(2) is not None:
            pairs.append((m.group(1), m.group(2)))
        elif m and i + 1 < len(extra):
            pairs.append((m.group(1), extra[i + 1]))
            i += 1
        else:
            unknown.append(arg)
        i += 1
    return pairs, unknown


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="voice-agent",
        description="A local speech-to-speech voice agent: webrtcvad -> mlx-whisper -> mlx-lm -> Marvis TTS.",
        epilog="Config overrides: any dotted key after the verb, e.g. --vad.silence_ms 500 --tts.seed 3",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    def with_config(sp, default):
        sp.add_argument("--config", default=default, help=f"preset in configs/ or a .toml path (default: {default})")
        sp.add_argument("--out", type=Path, help="session bundle folder (default: runs/<time>-<mode>)")
        sp.add_argument("--seed", type=int, help="seed for the LLM and the TTS sampling")
        return sp

    sp = with_config(sub.add_parser("chat", help="hands-free conversation on the microphone"), "default")
    sp.add_argument("--duration", type=float, help="stop after this many seconds of mic audio")
    sp = with_config(sub.add_parser("ptt", help="push-to-talk conversation (Enter starts/ends a turn)"), "push_to_talk")
    sp.add_argument("--duration", type=float, help="stop after this many seconds of mic audio")
    sp.add_argument("--keys", type=Path, help="scripted key presses: lines 'press SECONDS' / 'release SECONDS'")
    sp = with_config(sub.add_parser("replay", help="replay a recorded session or audio files through the agent"), "replay")
    sp.add_argument("source", nargs="+", type=Path, help="a session bundle folder, or audio files (one turn each)")
    sp.add_argument("--realtime", action="store_true", help="pace the audio like a live microphone")
    sp.add_argument("--no-progress", action="store_true")

    sp = sub.add_parser("serve", help="talk to the agent from a browser page (a local web app)")
    sp.add_argument("--config", default="default", help="preset in configs/ or a .toml path (default: default)")
    sp.add_argument("--seed", type=int, help="seed for the LLM and the TTS sampling")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=int, default=8765, help="port (0: any free one)")

    sp = sub.add_parser("tts", help="synthesise text with Marvis")
    sp.add_argument("text")
    sp.add_argument("-o", "--output", type=Path, default=Path("tts.wav"))
    sp.add_argument("--config", default="default")
    sp.add_argument("--checkpoint", help="a Marvis checkpoint (file or folder, any format) or random:<preset>")
    sp.add_argument("--speaker", type=int, default=0)
    sp.add_argument("--context", nargs=2, action="append", default=[], metavar=("AUDIO", "TEXT"),
                    help="a context turn (repeatable); TEXT may start with [N] to set its speaker")
    sp.add_argument("--voice-match", type=Path, metavar="REF_AUDIO", help="speak in the voice of this clip")
    sp.add_argument("--ref-text", help="transcript of the --voice-match clip")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--temperature", type=float, help="0 = greedy")
    sp.add_argument("--topk", type=int)
    sp.add_argument("--max-ms", type=int, help="longest audio to write: the output stops there, mid-word if need be "
                    "(a sentence longer than one utterance's --tts.max_audio_length_ms is said in parts either way)")
    sp.add_argument("--stream", action="store_true", help="print each chunk as it is made (the audio is streamed "
                    "either way, as the agent speaks)")
    sp.add_argument("--codes-out", type=Path, help="also save the Mimi codes [32, frames] as .npy")

    sp = sub.add_parser("models", help="prepare the offline default models in checkpoints/ (`models stand-in "
                                       "fetched`: UNTRAINED stand-ins of the fetched models' shapes, to time them)")
    sp.add_argument("action", choices=["prepare", "list", "stand-in"])
    sp.add_argument("set", nargs="?", choices=["fetched"], help="stand-in: the model set (fetched)")
    sp.add_argument("--only", nargs="*", help="names to prepare")
    sp = sub.add_parser("fetch", help="download the real models (needs a network)")
    sp.add_argument("what", nargs="*", help="marvis, mimi, whisper, whisper-cpu, llm (default: all)")
    sub.add_parser("doctor", help="check the machine: BLAS, audio devices, models")
    sp = sub.add_parser("bench", help="benchmarks: `bench tts` (Marvis vs peers), `bench agent SESSION`, "
                                      "`bench replies` (spoken questions: reply form and content, ASR WER), "
                                      "`bench ort` (the TTS frame loop per backend and precision), "
                                      "`bench turns` (labelled pauses: which end-of-turn rule cuts users off)")
    sp.add_argument("what", choices=["tts", "agent", "replies", "ort", "turns"])
    sp.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _config(args, overrides):
    import dataclasses

    from agent.config import load_config

    cfg = load_config(args.config, overrides)
    if getattr(args, "seed", None) is not None:
        cfg.llm.seed = args.seed
        cfg.tts = dataclasses.replace(cfg.tts, seed=args.seed)
    return cfg


def _writable_output(path: Path) -> None:
    """Probe the -o file now: a synthesis must not be thrown away at the end for an unwritable path."""
    from pipelines.errors import ConfigError

    if path.is_dir():
        raise ConfigError(f"-o {path}: is a folder; give a file name such as {path / 'tts.wav'}")
    if path.suffix.lower() not in (".wav", ".flac"):
        raise ConfigError(f"-o {path}: write .wav or .flac")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise ConfigError(f"-o {path}: cannot write there ({exc.strerror or exc})") from None
    if not existed:
        path.unlink()


def _tell_pieces(tts, sentences: list[str], gen, log) -> int:
    """Say how each sentence will be spoken: one that may need more frames than one utterance is allowed
    (`tts.max_audio_length_ms`) is said in parts cut after a clause mark or word that fits, so the cap never cuts
    words off. Returns how many parts are spoken in all."""
    from agent.voice import speech_pieces
    from pipelines.llm.sentences import MIN_PIECE_CHARS

    room = tts.max_chars(gen)
    total = 0
    for n, sentence in enumerate(sentences, 1):
        pieces = speech_pieces(tts, sentence, gen)
        if room < MIN_PIECE_CHARS and any(len(p) > room for p in pieces):
            log(f"warning: sentence {n} ({len(sentence)} characters) may need more than the "
                f"{gen.max_audio_length_ms:.0f} ms cap: its audio stops there")
        if len(pieces) > 1:
            log(f"sentence {n} is longer than one utterance may be ({gen.max_audio_length_ms:.0f} ms): spoken in "
                f"{len(pieces)} parts")
        total += len(pieces)
    return total


class _ChunkPrinter:
    """`--stream`: each chunk as it is made, in frames of the whole output."""

    def __init__(self, samples_per_frame: int):
        self.samples_per_frame, self.samples = samples_per_frame, 0

    def set_prebuffer(self, seconds: float) -> None:
        pass  # nothing plays

    def write(self, audio) -> None:
        first = self.samples // self.samples_per_frame
        self.samples += len(audio)
        print(f"chunk: frames {first}..{-(-self.samples // self.samples_per_frame) - 1}", file=sys.stderr)


def _cmd_tts(args, overrides) -> int:
    import dataclasses

    import numpy as np

    from agent.build import build_tts
    from agent.voice import ReplyVoice
    from pipelines.audio import load_audio, save_audio
    from pipelines.errors import ConfigError, TextInputError
    from pipelines.llm.sentences import SentenceSplitter, clean_for_speech
    from pipelines.messages import Segment, VoiceReference

    # everything a user can get wrong is checked before the model loads
    cfg = _config(args, overrides)
    changes = {"temperature": args.temperature, "top_k": args.topk}
    try:
        gen = dataclasses.replace(cfg.tts, **{k: v for k, v in changes.items() if v is not None})
    except ValueError as exc:
        raise ConfigError(str(exc).replace("tts.top_k", "--topk")) from None
    if args.max_ms is not None and args.max_ms <= 0:
        raise ConfigError(f"--max-ms must be > 0, got {args.max_ms}")
    if args.speaker < 0:
        raise TextInputError(f"--speaker must be a non-negative integer id, got {args.speaker}")
    splitter = SentenceSplitter()
    sentences = [s for s in splitter.push(args.text) + splitter.flush() if clean_for_speech(s)]
    if not sentences:
        raise TextInputError("nothing to say: the text is empty")
    if args.voice_match and not args.ref_text:
        raise TextInputError("--voice-match needs --ref-text, the transcript of the reference clip")
    context = []
    for audio_path, text in args.context:
        m = re.match(r"^\[(\d+)\]\s*", text)
        speaker = int(m.group(1)) if m else args.speaker
        context.append(Segment(speaker, text[m.end():] if m else text, load_audio(audio_path, 24_000)))
    voice = VoiceReference(load_audio(args.voice_match, 24_000), args.ref_text) if args.voice_match else None
    _writable_output(args.output)

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    tts = build_tts(cfg, checkpoint=args.checkpoint, log=log)
    parts = _tell_pieces(tts, sentences, gen, log)
    if parts > 1:
        log(f"speaking {parts} sentences one after another, each with the earlier ones as context")
    # as the agent speaks a reply: sentence by sentence, the earlier ones as context (agent/voice.py)
    speech = ReplyVoice(tts, gen, args.speaker, context, voice=voice,
                        sink=_ChunkPrinter(tts.samples_per_frame) if args.stream else None,
                        most_s=None if args.max_ms is None else args.max_ms / 1000)
    for sentence in sentences:
        speech.say(sentence)
    if speech.full:
        log(f"--max-ms {args.max_ms}: the audio is cut there")
    wave = speech.audio
    codes = speech.codes if speech.codes is not None else np.zeros((tts.num_codebooks, 0), np.int32)
    save_audio(args.output, wave, tts.sample_rate)
    if args.codes_out:
        args.codes_out.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.codes_out, codes)
    label = " [UNTRAINED weights: noise, not speech]" if tts.untrained else ""
    print(f"wrote {args.output}: {len(wave) / tts.sample_rate:.2f} s at {tts.sample_rate} Hz, "
          f"{codes.shape[1]} frames{label}")
    return 0


def _cmd_doctor() -> int:
    from agent.config import CHECKPOINTS

    print(f"python {platform.python_version()} on {platform.system()} {platform.machine()}, {os.cpu_count()} cores")
    try:
        import mlx.core as mx

        print(f"mlx {mx.__version__}, default device {mx.default_device()}")
    except Exception as exc:
        print(f"mlx: NOT importable ({exc})")
    if platform.system() == "Linux":
        state = "preloaded" if "openblas" in os.environ.get("LD_PRELOAD", "") else (
            "installed, not preloaded" if os.path.exists(OPENBLAS) else "missing: apt-get install libopenblas0-pthread")
        print(f"OpenBLAS for MLX: {state}")
    try:
        from agent.devices import list_devices

        print(list_devices())
    except Exception as exc:
        print(f"audio devices: unavailable ({exc})")
    else:
        from agent.devices import probe_input

        print(probe_input())
    for name in sorted(p.name for p in CHECKPOINTS.iterdir() if p.name != "README.md") if CHECKPOINTS.is_dir() else []:
        print(f"checkpoints/{name}")
    if not (CHECKPOINTS / "marvis-tts-250m-v0.2").exists():
        print("Marvis weights: absent -> the TTS runs UNTRAINED random weights (see checkpoints/README.md)")
    return 0


def console_main() -> None:
    """The `voice-agent` entry point: preload OpenBLAS (re-exec) first, then run."""
    _maybe_preload_openblas(sys.argv[1:])
    argv = sys.argv[1:]
    rc = main(argv)
    if _SESSION_VERBS & set(argv):
        # after a turn was stopped mid-way (SIGTERM, Ctrl-C), the interpreter's shutdown can abort in native
        # code ("terminate called without an active exception"); the session is closed by now: leave without it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


_SESSION_VERBS = {"replay", "chat", "ptt"}


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    overrides, unknown = _split_overrides(extra)
    if args.verb is None:
        parser.print_help()
        return 2
    if args.verb == "bench":
        unknown = []  # the benchmark parses its own flags
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    if overrides and args.verb in ("models", "fetch", "doctor"):
        parser.error(f"'{args.verb}' takes no config overrides")
    from pipelines.errors import VoiceAgentError

    if args.verb in _SESSION_VERBS:
        signal.signal(signal.SIGTERM, _terminate)  # kill, systemd, timeout: close the session like Ctrl-C
    try:
        return _dispatch(args, overrides)
    except VoiceAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def _dispatch(args, overrides) -> int:
    if args.verb == "replay":
        from agent.modes import run_replay

        cfg = _config(args, overrides)
        if args.realtime:
            cfg.replay.realtime = True
        result = run_replay(cfg, args.source, out=args.out, progress=not args.no_progress)
        return 0 if result.conversation.turns else 3
    if args.verb in ("chat", "ptt"):
        from agent.modes import run_live

        cfg = _config(args, overrides)
        run_live(cfg, push_to_talk=args.verb == "ptt", duration_s=args.duration,
                 key_script=getattr(args, "keys", None), out=args.out)
        return 0
    if args.verb == "serve":
        from agent.web.server import serve

        serve(_config(args, overrides), host=args.host, port=args.port)
        return 0
    if args.verb == "tts":
        return _cmd_tts(args, overrides)
    if args.verb == "models":
        from agent import model_files as models

        if args.action == "list":
            for name, what in models.OFFLINE.items():
                state = "ready" if (models.CHECKPOINTS / name).is_dir() else "not prepared"
                print(f"{name:<24} {state:<13} {what}")
            return 0
        if args.action == "stand-in":
            models.write_stand_ins(models.STAND_IN_SETS[args.set or "fetched"])
            return 0
        models.prepare(only=args.only)
        return 0
    if args.verb == "fetch":
        from agent.fetch import fetch

        fetch(args.what)
        return 0
    if args.verb == "doctor":
        return _cmd_doctor()
    if args.verb == "bench":
        import importlib

        bench = importlib.import_module(f"agent.bench.{args.what}")
        sys.argv = [f"voice-agent bench {args.what}", *args.args]  # each benchmark parses its own flags
        bench.main()
        return 0
    raise AssertionError(args.verb)


if __name__ == "__main__":
    console_main()
