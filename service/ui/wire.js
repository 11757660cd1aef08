// Protocol v1 pieces of the browser client (service/PROTOCOL.md): the subprotocols that carry the
// bearer token (browsers cannot set an Authorization header on a websocket), the stream URL,
// binary result frames, and base64 of float32 data (window.streamssm.dump()).
export const SUBPROTOCOL = "streamssm.v1";
const HEADER_BYTES = 28; // "SSR1" | seq u32 | start u64 | n u32 | o u32 | flags u32, little-endian
const MAGIC = 0x31525353; // "SSR1" read as a little-endian u32

function base64(bytes) {
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(bin);
}

/** ["streamssm.v1", "bearer.<base64url(utf-8 token)>"], or just the first without a token. */
export function bearerProtocols(token) {
  if (!token) return [SUBPROTOCOL];
  const b64url = base64(new TextEncoder().encode(token)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  return [SUBPROTOCOL, "bearer." + b64url];
}

/** ws(s)://host/stream next to the page's /ui/ folder (wss when the page came over https). */
export function streamUrl(moduleUrl) {
  const url = new URL("../stream", moduleUrl);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

/** A binary result frame -> {seq, start, n, o, outputs: Float32Array (n*o) | null, scores: Float32Array (n) | null}. */
export function decodeResult(buffer) {
  const view = new DataView(buffer);
  if (buffer.byteLength < HEADER_BYTES || view.getUint32(0, true) !== MAGIC) {
    throw new Error("not a binary result frame (no SSR1 header)");
  }
  const seq = view.getUint32(4, true);
  const start = view.getUint32(8, true) + view.getUint32(12, true) * 2 ** 32;
  const n = view.getUint32(16, true), o = view.getUint32(20, true), flags = view.getUint32(24, true);
  let offset = HEADER_BYTES;
  let outputs = null, scores = null;
  if (flags & 1) {
    outputs = new Float32Array(buffer.slice(offset, offset + n * o * 4));
    offset += n * o * 4;
  }
  if (flags & 2) scores = new Float32Array(buffer.slice(offset, offset + n * 4));
  const expected = offset + (scores ? n * 4 : 0);
  if (buffer.byteLength !== expected) throw new Error(`result frame of ${buffer.byteLength} bytes, expected ${expected}`);
  return { seq, start, n, o, outputs, scores };
}

/** Base64 of the float32 concatenation of `parts` (Float32Arrays). */
export function floatsBase64(parts) {
  const all = new Float32Array(parts.reduce((total, p) => total + p.length, 0));
  let at = 0;
  for (const p of parts) {
    all.set(p, at);
    at += p.length;
  }
  return base64(new Uint8Array(all.buffer));
}
