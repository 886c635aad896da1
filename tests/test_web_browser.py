"""`voice-agent serve` in a real browser: headless Debian Chromium, driven by Selenium, talks to the agent.

Chromium's fake microphone plays an espeak-ng question (a WAV, once); the page streams it to the server as
16 kHz PCM from its AudioWorklet, the real Whisper tiny.en and SmolLM2-135M answer, a tiny random Marvis
speaks, the page plays the reply through its jitter-buffer worklet and reports what it played. Asserted on
the page and in the bundle: the transcript, the reply, samples played, and that `voice-agent replay` of the
bundle hears the same transcript. A screenshot of the page is kept (its path is printed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent.session import read_session
from conftest import require_checkpoints
from served import Served
from virtual_audio import espeak_pcm16

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
QUESTION = "What is the capital of France?"
WAIT_S = 240  # generous: two cores shared with other work; nothing here asserts on speed

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                       reason="chromium / chromium-driver are not installed (scripts/bootstrap.sh installs them)"),
]


@pytest.fixture(scope="module")
def question_wav(tmp_path_factory) -> Path:
    require_checkpoints("whisper-tiny.en", "smollm2-135m-instruct")
    folder = tmp_path_factory.mktemp("speech")
    pcm = espeak_pcm16(QUESTION, folder)
    if pcm is None:
        pytest.skip("espeak-ng is not installed (Debian: apt install espeak-ng); it makes the test speech")
    silence = np.zeros(8000, np.int16)
    path = folder / "question.wav"
    sf.write(path, np.concatenate([silence, pcm, silence, silence, silence, silence]), 16000, subtype="PCM_16")
    return path


def chromium(mic_wav: Path, profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={mic_wav}%noloop",
                "--autoplay-policy=no-user-gesture-required", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                "--window-size=1100,900"):
        options.add_argument(arg)
    # the tests' LD_PRELOAD (OpenBLAS, for MLX) crashes Chromium's renderer: the browser runs without it
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    service = Service(CHROMEDRIVER, env=env)  # a given driver: Selenium Manager never runs (no downloads)
    return webdriver.Chrome(service=service, options=options)


@pytest.mark.parametrize("mode", ["hands-free", "push-to-talk"])
def test_a_browser_conversation_is_heard_answered_played_and_recorded(tmp_path, question_wav, tiny_marvis, mode):
    """Hands-free: the VAD ends the turn. Push-to-talk: the space bar is held from before the question until the
    page has sent the whole recording, so the keys decide the turn."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    runs = tmp_path / "runs"
    wav_samples = sf.info(question_wav).frames
    served = Served(["--tts.checkpoint", str(tiny_marvis), "--llm.max_tokens", "16",
                     "--tts.max_audio_length_ms", "800", "--session.dir", str(runs)], tmp_path)
    driver = None
    try:
        driver = chromium(question_wav, tmp_path / "chromium-profile")
        driver.get(served.url)
        driver.find_element(By.CSS_SELECTOR, f'input[name="mode"][value="{mode}"]').click()
        driver.find_element(By.ID, "start").click()
        page = lambda expr: driver.execute_script(f"return window.voiceAgent.{expr}")
        if mode == "push-to-talk":
            WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: page("micSamples") > 0)
            ActionChains(driver).key_down(Keys.SPACE).perform()
            WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: page("micSamples") >= wav_samples)
            ActionChains(driver).key_up(Keys.SPACE).perform()
        try:
            WebDriverWait(driver, WAIT_S, poll_frequency=0.5).until(
                lambda d: page("turns.length") >= 1 and page("playedSamples") > 0 or "closed" in page("status"))
        except TimeoutException:
            pass
        turn = page("turns[0]")
        assert turn is not None, (page("status"), page("transcripts"), "".join(served.lines))
        assert "capital" in turn["transcript"].lower() and "france" in turn["transcript"].lower(), turn
        assert turn["reply"].strip(), turn
        played = page("playedSamples")
        assert played > 0
        # what the page shows a person
        turns_text = driver.find_element(By.ID, "turns").text
        assert turn["transcript"] in turns_text and turn["reply"] in turns_text
        assert driver.find_element(By.ID, "untrained").is_displayed()  # the tiny Marvis is random: said so
        assert len(driver.find_elements(By.CSS_SELECTOR, "#latency .bar .seg")) >= 5
        bundle_href = driver.find_element(By.ID, "bundle").get_attribute("href")
        WebDriverWait(driver, WAIT_S, poll_frequency=0.5).until(
            lambda d: "1st sample" in "".join(e.get_attribute("title") for e in
                                              d.find_elements(By.CSS_SELECTOR, "#latency .seg")))
        shot = tmp_path / "serve-page.png"
        driver.save_screenshot(str(shot))
        print(f"\nscreenshot: {shot}")
        driver.find_element(By.ID, "stop").click()
        assert served.wait_for_line("session bundle:", WAIT_S), "".join(served.lines)
        driver.get(bundle_href)  # the bundle, read-only, through the server
        assert "transcript.txt" in driver.page_source and "mic.pcm" in driver.page_source
    finally:
        if driver is not None:
            driver.quit()
        log = served.stop()
    assert "Traceback" not in log, log

    (bundle,) = [p for p in runs.iterdir() if p.is_dir()]
    meta = json.loads((bundle / "session.json").read_text())
    assert meta["mode"] == mode and meta["front_end"] == "browser" and meta["turns"] >= 1
    data = read_session(bundle)
    if mode == "push-to-talk":
        assert [action for _, action in data.keys] == ["press", "release"]
        assert [e["reason"] for e in data.events if e["type"] == "transcript"] == ["manual"]
    live = [e for e in data.events if e["type"] == "turn"]
    assert live[0]["transcript"] == turn["transcript"] and live[0]["reply"] == turn["reply"]
    assert live[0]["waterfall"]["first_sample_played"] > 0  # stamped by the page's played report
    assert len(data.mic) / data.rate > 2.0  # the page's mic, recorded as it came

    replayed = subprocess.run([sys.executable, "-m", "agent.cli", "replay", str(bundle), "--out",
                               str(tmp_path / "replayed"), "--no-progress", "--tts.checkpoint", str(tiny_marvis),
                               "--llm.max_tokens", "16", "--tts.max_audio_length_ms", "800"],
                              cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    again = [e for e in read_session(tmp_path / "replayed").events if e["type"] == "turn"]
    assert [t["transcript"] for t in again] == [t["transcript"] for t in live]
