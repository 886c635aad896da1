"""Agent latency benchmark: replay a session and print its per-turn waterfall and p50/p90 per stage.

    voice-agent bench agent [SESSION] [--config demo] [--runs 1] [--load 0,0.5,1] [--json out.json] [--dotted.key value ...]

Offsets are ms after the end of user speech (endpoint in stream time, the rest wall clock after the
endpoint decision; see agent/metrics.py). The TTS label (trained or UNTRAINED) is printed with the figures.
When the session has a script (sessions made by scripts/make_demo_session.py), turn-taking is checked against
it: false endpoints (the user cut off inside a scripted turn) and missed turns (`agent.metrics.endpoint_report`).
`--load` repeats the whole measurement with another process busy on that share of one core (agent/bench/load.py),
started before each replay and stopped after it: what a user with a browser or a build running beside gets.
An ASR or LLM model the config names that is absent (the fetched ones, offline) is replaced by its UNTRAINED
stand-in of the published shape, run teacher-forced on the session's script (agent/scripted.py), and said so:
the waterfall is what the real model costs. The process's peak memory is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
from pathlib import Path

from agent.config import ROOT


def main() -> None:
    from agent.bench.load import busy_core, parse_loads
    from agent.cli import parse_with_config
    from agent.metrics import STAGES, endpoint_report, session_summary, summary_table
    from agent.modes import run_replay
    from agent.session import load_replay_source, read_events

    p = argparse.ArgumentParser(prog="voice-agent bench agent")
    p.add_argument("session", nargs="?", default=str(ROOT / "sessions" / "demo"))
    p.add_argument("--config", default="demo")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--load", default="0", help="shares of one core a competing process uses, e.g. 0,0.5,1")
    args, cfg = parse_with_config(p)
    loads = parse_loads(args.load)
    print(f"# {' '.join(sys.argv)}")
    print(f"# {platform.machine()} {os.cpu_count()} cores, OpenBLAS preloaded: {'openblas' in os.environ.get('LD_PRELOAD', '')}")
    script = load_replay_source([Path(args.session)], gap_s=1.0).events
    stages = scripted_stages(cfg, script)
    loaded_mb = peak_rss_mb(reset=True)  # loading (and a first run's graph build) apart from the conversation
    results = {}
    for load in loads:
        rows, lines, turn_taking = [], [], []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory() as tmp, busy_core(load):
                result = run_replay(cfg, [Path(args.session)], out=Path(tmp) / "bundle", log=lines.append,
                                    progress=False, stages=stages)
                events = read_events(result.bundle / "events.jsonl", lambda _: None)
                decided = [e["decided_s"] for e in events if e.get("type") == "transcript"]
                reopened = sum(e.get("type") == "reopen" for e in events)
            rows += [t.waterfall for t in result.conversation.turns]
            report = endpoint_report(script, decided)
            if report is not None:
                report["reopened"] = reopened
            turn_taking.append(report)
        if len(loads) > 1 or load:
            print(f"\n## another process busy on {load:g} of one core")
        print(next((line for line in lines if "Marvis TTS" in line), ""))
        for i, row in enumerate(rows):
            print(f"turn {i}: " + "  ".join(f"{s}={row[s]:.0f}" for s in [*STAGES, "stall_ms", "stalls", "prebuffer_ms"]
                                             if s in row) + (f"  tts_rtf={row['tts_rtf']:.2f}" if "tts_rtf" in row else ""))
        summary = session_summary(rows)
        print(summary_table(summary))
        for run, report in enumerate(turn_taking):
            if report is not None:
                print(f"turn-taking (run {run}): {report['false_endpoints']} false endpoints"
                      + (f" (cut at {report['cut_at_s']} s)" if report["cut_at_s"] else "")
                      + f", {report['missed_turns']} of {report['scripted_turns']} scripted turns missed, "
                      f"{report['endpoints']} endpoints, {report['reopened']} reopened (the words ended a turn the "
                      f"user went on with); vad.silence_ms {cfg.vad.silence_ms}"
                      + (f", words >= {cfg.vad.words_threshold} at {cfg.vad.pause_ms or cfg.vad.pre_roll_ms} ms"
                         if cfg.vad.words else ""))
        results[f"{load:g}"] = {"rows": rows, "summary": summary, "turn_taking": turn_taking}
    peak_mb = peak_rss_mb()
    if stages is not None and loaded_mb:  # the stand-ins were loaded (and their graphs built) before the replays
        print(f"peak memory: {peak_mb:.0f} MB while replaying (loading the models peaked at {loaded_mb:.0f} MB)")
    else:  # each replay loaded the config's models itself
        print(f"peak memory: {peak_mb:.0f} MB (loading the models included)")
    if args.json:
        only = results[f"{loads[0]:g}"] if len(loads) == 1 else {"loads": results}
        only["peak_rss_mb"] = round(peak_mb)
        args.json.write_text(json.dumps(only, indent=2))


def peak_rss_mb(reset: bool = False) -> float:
    """This process's peak resident memory so far (MB); `reset`: then start a new peak from now (Linux: writing 5
    to /proc/self/clear_refs; elsewhere the peak keeps counting from the start: 0.0 is returned for the reset)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024 * 1024)
    try:
        status = Path("/proc/self/status").read_text()
        peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
    except (OSError, StopIteration, ValueError):
        return 0.0 if reset else peak
    return peak


def scripted_stages(cfg, script: list[dict], stand_ins: Path | None = None):
    """None (the replay builds the config's stages), or, when the config's ASR or LLM is absent, stages with their
    stand-ins teacher-forced on `script`, warmed up (`stand_ins`: `agent.build.stand_in_config`'s)."""
    from agent.build import build_stages, stand_in_config
    from agent.config import load_config
    from agent.scripted import Script, ScriptedReply
    from pipelines.errors import ConfigError
    from pipelines.llm.load import load_llm

    stand_in_cfg, replaced = stand_in_config(cfg, stand_ins=stand_ins)
    if not replaced:
        return None
    scripted = Script(script)
    if not scripted:
        raise ConfigError("stand-in models run on a session's script (its words are not theirs to hear or say); "
                          "this session has none: use one made by scripts/make_demo_session.py")
    stages = build_stages(stand_in_cfg)
    # the ASR hears the script's words even when it is real: the scripted replies follow the script's turns (a
    # transcript that differs from them would get the first turn's reply every time, refused as a repeat), and a
    # teacher-forced decode costs what a free one of the same words does
    stages.words = scripted.words
    if "asr" not in replaced:
        print(f"asr: {cfg.asr.model} is real; it is teacher-forced on the script too, so that the scripted replies "
              "follow its turns")
    if "llm" in replaced:  # the offline reply model judges the words (a random network's verdict ends turns at random)
        stages.llm = ScriptedReply(stages.llm, scripted.reply, load_llm(load_config("default").llm, root=ROOT))
    for stage in (stages.asr, stages.llm, stages.tts):
        stage.warmup()
    return stages


if __name__ == "__main__":
    main()
