// The agent's voice: a jitter buffer that starts playing once `jitterSamples` are queued (or the reply is
// complete), and counts what it actually output, per utterance, so the server knows what the user heard.
class Player extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.jitterSamples = options.processorOptions.jitterSamples;
    this.chunks = [];  // Float32Array each
    this.head = 0;  // samples of chunks[0] already played
    this.queued = 0;
    this.id = 0;
    this.played = 0;
    this.flowing = false;
    this.ended = false;
    this.reported = 0;
    this.port.onmessage = (event) => this.command(event.data);
  }

  command(msg) {
    if (msg.type === "utterance") {
      this.id = msg.id; this.played = 0; this.reported = 0;
      this.chunks = []; this.head = 0; this.queued = 0; this.flowing = false; this.ended = false;
    } else if (msg.type === "audio" && msg.id === this.id) {
      this.chunks.push(msg.samples);
      this.queued += msg.samples.length;
      if (this.queued >= this.jitterSamples) this.flowing = true;
    } else if (msg.type === "end" && msg.id === this.id) {
      this.ended = true; this.flowing = true;
      this.report(false);
    } else if (msg.type === "clear" && msg.id === this.id) {
      this.chunks = []; this.head = 0; this.queued = 0; this.flowing = false;
      this.report(true);
    }
  }

  report(final) {
    this.reported = this.played;
    this.port.postMessage({ id: this.id, played: this.played, final });
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    let n = 0;
    if (this.flowing) {
      while (n < out.length && this.chunks.length) {
        const chunk = this.chunks[0];
        const take = Math.min(out.length - n, chunk.length - this.head);
        out.set(chunk.subarray(this.head, this.head + take), n);
        n += take; this.head += take;
        if (this.head === chunk.length) { this.chunks.shift(); this.head = 0; }
      }
      this.queued -= n;
      this.played += n;
      if (n < out.length && !this.ended) this.flowing = false;  // ran dry: re-buffer
    }
    out.fill(0, n);
    // report every ~50 ms of playing, and at once when the reply has played out
    if (this.played - this.reported >= sampleRate / 20 || (n > 0 && this.ended && this.queued === 0)) {
      this.report(false);
    }
    return true;
  }
}

registerProcessor("player", Player);
