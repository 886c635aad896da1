"""Replies worth hearing: fixed sets of spoken questions through the agent's ASR and reply LLM, checked.

    voice-agent bench replies [--config default] [--sets first,second,third] [--json out.json] [--dotted.key value ...]
    voice-agent bench replies --hear-as-said     # the reply model alone: it gets what was said, not the transcript

The first set: 22 turns in 5 conversations, 20 questions and remarks spoken by espeak-ng (made at run time) and two
clips of real people (tests/fixtures: jfk.flac, and arctic_a0007.wav from CMU ARCTIC). The second: 25 turns in 5
conversations, in espeak-ng and in Piper's neural voice, written after the reply checks and not tuned for; the
third, 25 more in 5 conversations, written after a short sentence of an earlier reply was banned too (it asks for
more jokes and fun facts). Each turn's audio goes through the agent's ASR; the transcript goes to
the reply LLM in its conversation, and the reply is chosen, cut and cleaned as the turn engine speaks it
(`agent.engine.checked_reply`: a first piece with problems is not said; `spoken_reply`). Checks:
- form (every turn): one or two sentences, at most 40 words, no list or dialogue markup, no run of five words
  said in an earlier reply of the conversation (`pipelines.llm.form`);
- content (where a 135M model can know it): the reply names the answer (Paris, blue, Everest, ...);
- hearing: the transcript's word error rate against what was said, for each voice apart (espeak-ng is not a
  person: an ASR choice must hold on all), and the ASR's time per turn.
Prints each turn and the pass rates. Deterministic for a config (greedy decoding).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.config import ROOT

# (what is said, words one of which a right answer names; None: form only)
CONVERSATIONS: list[list[tuple[str, tuple[str, ...] | None]]] = [
    [("What is the capital of France?", ("paris",)),
     ("And what is the capital of Italy?", ("rome",)),
     ("How many days are there in a week?", ("seven", "7")),
     ("What colour is the sky on a clear day?", ("blue",)),
     ("What do bees make?", ("honey",))],
    [("Good morning, can you recommend a book about the ocean?", None),
     ("Tell me a short joke about penguins.", None),
     ("How do I make a cup of green tea?", ("water", "boil", "steep", "hot")),
     ("What should I wear when it is raining?", ("umbrella", "raincoat", "coat", "jacket", "boots")),
     ("Thank you very much. Goodbye.", None)],
    [("What is the tallest mountain in the world?", ("everest",)),
     ("Which animal is known as the king of the jungle?", ("lion",)),
     ("What is the opposite of hot?", ("cold",)),
     ("How many legs does a spider have?", ("eight", "8")),
     ("What is frozen water called?", ("ice",))],
    [("Hi there! How are you today?", None),
     ("I am going to Rome next week.", None),
     ("Is it usually warm there in April?", None),
     ("How do you say thank you in Italian?", ("grazie",)),
     ("Great, that helps a lot. Bye!", None)],
]
REAL = [("tests/fixtures/jfk.flac",
         "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country.",
         None),
        ("tests/fixtures/arctic_a0007.wav", "And you always want to see it in the superlative degree.", None)]


# The second set, written after the reply checks (the five-word ban, the first piece checked before it is spoken)
# were done, and not tuned for: nothing in the agent was changed after it was first run. Each conversation is
# spoken by one voice: espeak-ng, or Piper's en_US-joe-medium (a trained neural voice, the `dev` extra).
SECOND: list[tuple[str, list[tuple[str, tuple[str, ...] | None]]]] = [
    ("espeak", [("What is the boiling point of water in Celsius?", ("100", "hundred")),
                ("How many minutes are there in an hour?", ("60", "sixty")),
                ("Which planet is closest to the sun?", ("mercury",)),
                ("Can you suggest something quick for dinner?", None),
                ("Thanks, that sounds good.", None)]),
    ("piper", [("I'm flying to Tokyo on Friday.", None),
               ("What language do people speak in Japan?", ("japanese",)),
               ("What is the currency of Japan?", ("yen",)),
               ("Should I bring a warm jacket in November?", None),
               ("Okay, thanks for the help.", None)]),
    ("espeak", [("What sound does a cat make?", ("meow", "purr", "purrs")),
                ("How many wheels does a bicycle have?", ("two", "2")),
                ("What is the largest ocean on Earth?", ("pacific",)),
                ("Which animal has a very long neck?", ("giraffe", "giraffes")),
                ("What gas do plants take in from the air?", ("carbon", "co2"))]),
    ("piper", [("Hello, my name is Sam.", None),
               ("I had a really long day at work.", None),
               ("Can you tell me something to cheer me up?", None),
               ("What day comes after Monday?", ("tuesday",)),
               ("Good night.", None)]),
    ("piper", [("How many colours are there in a rainbow?", ("seven", "7")),
               ("What colour is fresh grass?", ("green",)),
               ("Who wrote Romeo and Juliet?", ("shakespeare",)),
               ("What is two plus two?", ("four", "4")),
               ("That's all for now, thank you.", None)]),
]
# The third set, written after a whole short sentence of an earlier reply ("That's a classic one.") was banned too,
# and not tuned for. It asks for more of the same (jokes, fun facts) so that a stock sentence has a chance to
# come back. espeak-ng and Piper only: the two clips of real people that ship are the first set's.
THIRD: list[tuple[str, list[tuple[str, tuple[str, ...] | None]]]] = [
    ("piper", [("What season is it when leaves fall from the trees?", ("autumn", "fall")),
               ("What do you call a baby dog?", ("puppy",)),
               ("Tell me a joke about a cat.", None),
               ("Tell me another one.", None),
               ("Thanks, that was funny.", None)]),
    ("espeak", [("How many hours are there in a day?", ("24", "twenty")),
                ("What is the capital of Germany?", ("berlin",)),
                ("What do cows eat?", ("grass", "hay")),
                ("Tell me a fun fact.", None),
                ("Tell me another fun fact.", None)]),
    ("piper", [("I want to learn to cook.", None),
               ("What should I make first?", None),
               ("How long should I boil an egg?", ("minute", "minutes")),
               ("What colour is a ripe banana?", ("yellow",)),
               ("Thanks, bye.", None)]),
    ("espeak", [("Can you tell me a joke?", None),
                ("Tell me another joke.", None),
                ("One more joke, please.", None),
                ("Which is bigger, the sun or the moon?", ("sun",)),
                ("What is five plus three?", ("eight", "8"))]),
    ("piper", [("Good evening.", None),
               ("I just got a new puppy.", None),
               ("What should I name him?", None),
               ("How often should I walk him?", None),
               ("Okay, good night.", None)]),
]
SETS = ("first", "second", "third")


def espeak(text: str, folder: Path):
    from pipelines.audio import load_audio

    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is not installed (apt-get install espeak-ng)")
    wav = folder / "q.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), text], check=True)
    return load_audio(wav, 16000)


def conversations(which: str, folder: Path) -> list[list[tuple[object, str, tuple[str, ...] | None, str]]]:
    """[(audio source, what was said, answer words, voice)] per conversation of a set; an audio source is a file,
    or text for `espeak` (the first set's own rate), or a callable making it."""
    if which == "first":
        convs = [[(text, text, keys, "espeak-ng") for text, keys in conv] for conv in CONVERSATIONS]
        return convs + [[(ROOT / path, said, keys, "real") for path, said, keys in REAL]]
    from agent.bench.turns import _sessions

    m = _sessions()
    return [[(lambda text=text, voice=voice: m.turn_audio(text, folder, voice), text, keys, voice)
             for text, keys in conv] for voice, conv in (SECOND if which == "second" else THIRD)]


def main() -> None:
    from agent.build import build_asr, build_llm
    from agent.cli import parse_with_config

    p = argparse.ArgumentParser(prog="voice-agent bench replies")
    p.add_argument("--config", default="default")
    p.add_argument("--json", type=Path)
    p.add_argument("--sets", default="first,second,third", help="which question sets (comma-separated): first, second, third")
    p.add_argument("--keep-all", action="store_true",
                   help="commit every reply to the LLM's history (as the agent did before replies with problems were kept out)")
    p.add_argument("--hear-as-said", action="store_true",
                   help="give the reply LLM what was said instead of the transcript (the ASR still runs for the WER): "
                        "what the reply model alone scores")
    args, cfg = parse_with_config(p)
    sets = [x.strip() for x in args.sets.split(",") if x.strip()]
    if not sets or any(x not in SETS for x in sets):
        sys.exit(f"error: --sets takes {', '.join(SETS)} (comma-separated), got {args.sets!r}")
    print(f"# {' '.join(sys.argv)}")
    asr, llm = build_asr(cfg), build_llm(cfg)
    asr.warmup(), llm.warmup()
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for which in sets:
            print(f"## {which} set")
            rows = run_set(conversations(which, Path(tmp)), asr, llm, cfg, args.keep_all, Path(tmp),
                           args.hear_as_said)
            report[which] = {**summary(rows, cfg), "hear_as_said": args.hear_as_said}
    if len(sets) > 1:
        print()
        for which, r in report.items():
            print(f"{which:<7} form {r['form']}/{r['turns']}  content {r['content']}/{r['known']}  "
                  f"overall {r['overall']}/{r['turns']} ({100 * r['overall'] / r['turns']:.0f} %)  "
                  f"WER {100 * r['hearing']['all']['wer']:.1f} %")
    if args.json:
        args.json.write_text(json.dumps(report if len(sets) > 1 else report[sets[0]], indent=2))


def run_set(convs, asr, llm, cfg, keep_all: bool, tmp: Path, hear_as_said: bool = False) -> list[dict]:
    from agent.engine import checked_reply, spoken_reply
    from agent.metrics import word_errors
    from pipelines.audio import load_audio
    from pipelines.llm.form import reply_problems, words

    rows = []
    for c, conv in enumerate(convs):
        llm.reset()
        earlier: list[str] = []
        for source, said, keys, voice in conv:
            if isinstance(source, Path):
                audio = load_audio(source, 16000)
            else:
                audio = source() if callable(source) else espeak(source, tmp)
            t0 = time.perf_counter()
            heard = asr.transcribe(audio, 16000).text.strip()
            asr_s = time.perf_counter() - t0
            edits, n = word_errors(said, heard)
            given = said if hear_as_said else heard  # what the reply LLM reads
            rejected, out = [], []

            def timed(deltas):  # when the first piece that may be spoken is handed out
                for delta in deltas:
                    out.append(time.perf_counter())
                    yield delta

            t0 = time.perf_counter()
            reply = spoken_reply(timed(checked_reply(
                llm, given, earlier, first_clause_words=cfg.llm.first_clause_words, candidates=cfg.llm.candidates,
                fallback_reply=cfg.llm.fallback_reply, rejected=lambda text, why: rejected.append((text, why)))),
                cfg.llm.first_clause_words, cfg.llm.max_sentences)
            first_s = (out[0] - t0) if out else None
            problems = reply_problems(reply, earlier)
            content = None if keys is None else any(k in words(reply) for k in keys)
            if keep_all or not problems:
                llm.commit(given, reply)
            earlier.append(reply)
            rows.append({"conversation": c, "voice": voice, "said": said, "heard": heard, "given": given, "reply": reply,
                         "problems": problems, "content": content, "asr_s": round(asr_s, 3), "edits": edits,
                         "ref_words": n, "rejected": rejected,
                         "first_piece_s": None if first_s is None else round(first_s, 3)})
            mark = "ok " if not problems and content is not False else "BAD"
            print(f"[{mark}] you   > {heard}" + (f"\n      (given: {given})" if given != heard else ""))
            for text, why in rejected:
                print(f"      (not said: {text!r}   <- {'; '.join(why)})")
            print(f"      agent > {reply}" + (f"   <- {'; '.join(problems)}" if problems else "")
                  + ("" if content is None else ("   (answer named)" if content else "   <- answer missing")))
    return rows


def summary(rows: list[dict], cfg) -> dict:
    """Prints and returns a set's pass rates, the cost of the checks, and how well each voice was heard."""
    form = sum(not r["problems"] for r in rows)
    known = [r for r in rows if r["content"] is not None]
    right = sum(r["content"] for r in known)
    both = sum(not r["problems"] and r["content"] is not False for r in rows)
    print()
    print(f"form        {form}/{len(rows)} replies pass ({100 * form / len(rows):.0f} %)")
    print(f"content     {right}/{len(known)} name the answer ({100 * right / max(1, len(known)):.0f} %)")
    print(f"overall     {both}/{len(rows)} pass both ({100 * both / len(rows):.0f} %)")
    retried = [r for r in rows if r["rejected"]]
    firsts = sorted(r["first_piece_s"] for r in rows if r["first_piece_s"] is not None)
    if firsts:
        p50, p90 = firsts[len(firsts) // 2], firsts[min(len(firsts) - 1, round(0.9 * (len(firsts) - 1)))]
        extra = [r["first_piece_s"] for r in retried if r["first_piece_s"] is not None]
        print(f"checked     {len(retried)}/{len(rows)} turns had a first piece not said "
              f"({sum(len(r['rejected']) for r in rows)} candidates); LLM start to the first piece said: "
              f"p50 {1000 * p50:.0f} ms, p90 {1000 * p90:.0f} ms"
              + (f", {1000 * sum(extra) / len(extra):.0f} ms on the retried turns" if extra else ""))
    hearing = {}
    voices = sorted({r["voice"] for r in rows})
    for name, part in [(v, [r for r in rows if r["voice"] == v]) for v in voices] + [("all", rows)]:
        edits, ref = sum(r["edits"] for r in part), sum(r["ref_words"] for r in part)
        hearing[name] = {"wer": edits / ref, "words": ref, "asr_s": sum(r["asr_s"] for r in part) / len(part)}
        print(f"hearing     {name:<12} WER {100 * edits / ref:5.1f} % over {ref:3d} words, "
              f"ASR {hearing[name]['asr_s']:.2f} s a turn ({cfg.asr.model})")
    return {"rows": rows, "form": form, "content": right, "known": len(known), "overall": both, "turns": len(rows),
            "retried": len(retried), "hearing": hearing}


if __name__ == "__main__":
    main()
