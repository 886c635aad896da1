// The microphone, as 16-bit PCM frames for the server. The AudioContext runs at 16 kHz, so the browser
// has already resampled; this only converts and batches 20 ms frames, and measures the level.
class MicFrames extends AudioWorkletProcessor {
  constructor() {
    super();
    this.frame = new Int16Array(sampleRate / 50);  // 20 ms
    this.fill = 0;
  }

  process(inputs) {
    const input = inputs[0][0];
    if (!input) return true;
    let energy = 0;
    for (let i = 0; i < input.length; i++) {
      const s = Math.max(-1, Math.min(1, input[i]));
      energy += s * s;
      this.frame[this.fill++] = s < 0 ? s * 32768 : s * 32767;
      if (this.fill === this.frame.length) {
        this.port.postMessage({ pcm: this.frame.buffer }, [this.frame.buffer]);
        this.frame = new Int16Array(sampleRate / 50);
        this.fill = 0;
      }
    }
    this.port.postMessage({ level: Math.sqrt(energy / input.length) });
    return true;
  }
}

registerProcessor("mic-frames", MicFrames);
