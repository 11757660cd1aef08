// AudioWorklet side of the streamssm browser client: mixes its input down to mono (mean of the
// channels) and posts chunks of `chunk` samples (Float32Array, at the AudioContext's rate) to
// the page. A "flush" message posts what is buffered as {last: Float32Array} (maybe empty);
// {expect: n} makes it post {last} by itself right after the n-th sample it takes in (a file's
// length: exact, where the source's 'ended' event can reach the page before its last render
// quantum reaches this worklet, and the quantum's padding after the file's end is never sent).
class Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.chunk = options.processorOptions.chunk;
    this.buf = new Float32Array(this.chunk);
    this.fill = 0;
    this.taken = 0; // samples taken in since the start
    this.expect = Infinity;
    this.port.onmessage = (event) => {
      if (event.data === "flush") this.flush();
      else if (event.data.expect !== undefined) {
        this.expect = event.data.expect;
        if (this.taken >= this.expect) this.flush();
      }
    };
  }

  flush() {
    this.port.postMessage({ last: this.buf.slice(0, this.fill) });
    this.fill = 0;
    this.expect = Infinity;
  }

  process(inputs) {
    const input = inputs[0];
    if (input && input.length) {
      const n = input[0].length;
      for (let i = 0; i < n; i++) {
        let sum = 0;
        for (const channel of input) sum += channel[i];
        this.buf[this.fill++] = sum / input.length;
        if (++this.taken === this.expect) this.flush();
        else if (this.fill === this.chunk) {
          this.port.postMessage(this.buf.slice());
          this.fill = 0;
        }
      }
    }
    return true;
  }
}

registerProcessor("streamssm-capture", Capture);
