// One protocol v1 stream from the browser (service/PROTOCOL.md): start -> ready, data frames,
// binary results in order, pings while paused (a browser cannot send websocket pings), end ->
// summary. window() waits while ready.queue_depth frames are unanswered.
import { bearerProtocols, decodeResult, streamUrl } from "./wire.js";

const MAX_PING_MS = 10000;

export class Stream {
  /**
   * @param token bearer token ("" for none), sent as a subprotocol
   * @param start the start message (an object)
   * @param handlers {result(r), event(msg), closed(code, message)} (message: null after a summary)
   * @param idleTimeout the server's idle timeout (s): paused, the stream pings 3 times as often
   */
  constructor(token, start, handlers, idleTimeout) {
    this.pingMs = Math.min(MAX_PING_MS, (idleTimeout * 1000) / 3);
    this.token = token;
    this.start = start;
    this.handlers = handlers;
    this.sent = 0;
    this.answered = 0;
    this.ready = null;
    this.summary = null;
    this.error = null;
    this.pinger = null;
    this.waiters = { ready: null, summary: null, window: [] };
  }

  /** Connect and send start; resolves with the ready message. */
  open() {
    this.ws = new WebSocket(streamUrl(import.meta.url), bearerProtocols(this.token));
    this.ws.binaryType = "arraybuffer";
    this.ws.onopen = () => this.ws.send(JSON.stringify(this.start));
    this.ws.onmessage = (event) => this.receive(event.data);
    this.ws.onclose = (event) => this.closed(event);
    return new Promise((resolve, reject) => (this.waiters.ready = { resolve, reject }));
  }

  receive(data) {
    if (data instanceof ArrayBuffer) {
      this.answered++;
      this.handlers.result(decodeResult(data));
      this.waiters.window.splice(0).forEach((wake) => wake());
      return;
    }
    const msg = JSON.parse(data);
    if (msg.type === "ready") {
      this.ready = msg;
      this.waiters.ready.resolve(msg);
    } else if (msg.type === "summary") {
      this.summary = msg;
      this.waiters.summary?.resolve(msg);
    } else if (msg.type === "error") {
      this.error = msg;
    } else {
      this.handlers.event(msg); // pong, saved, reset, ... (unknown types are ignored)
    }
  }

  closed(event) {
    this.pause(false);
    const why = this.summary ? null : `closed with ${event.code}: ${this.error ? `${this.error.reason}: ${this.error.message}` : event.reason || "connection lost"}`;
    for (const waiter of [this.waiters.ready, this.waiters.summary]) waiter?.reject(new Error(why));
    this.waiters.window.splice(0).forEach((wake) => wake());
    this.handlers.closed(event.code, why);
  }

  get isOpen() {
    return this.ws && this.ws.readyState === WebSocket.OPEN;
  }

  /** Send one data frame (Float32Array of samples, or a string of bases). */
  send(frame) {
    this.sent++;
    this.ws.send(frame);
  }

  /** Resolves once fewer than queue_depth frames are unanswered (or the stream closed). */
  async window() {
    while (this.isOpen && this.sent - this.answered >= this.ready.queue_depth) {
      await new Promise((wake) => this.waiters.window.push(wake));
    }
  }

  /** Paused: a {"type": "ping"} every pingMs keeps the server's idle timer from closing the stream. */
  pause(paused) {
    clearInterval(this.pinger);
    this.pinger = paused ? setInterval(() => this.isOpen && this.ws.send('{"type":"ping"}'), this.pingMs) : null;
  }

  /** Send end; resolves with the summary (after every result). */
  end() {
    const summary = new Promise((resolve, reject) => (this.waiters.summary = { resolve, reject }));
    this.ws.send('{"type":"end"}');
    return summary;
  }
}
