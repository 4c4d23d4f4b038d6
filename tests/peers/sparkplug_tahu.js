// Independent Sparkplug B codec for the cross-check tests: Eclipse Tahu's npm
// `sparkplug-payload` (1.0.x), driven by tests/component/test_sparkplug_tahu.py.
//
// stdin: one JSON request, stdout: one JSON answer.
//   {"op": "decode", "b64": "..."}  -> Tahu's decodePayload() view, plus array metrics unpacked
//                                      with Node's Buffer (Tahu 1.0.x has no array types)
//   {"op": "encode", "payload": {...}} -> {"b64": "..."}; metrics use Tahu's {name, type, value};
//                                      array metrics ({"array": true}) are packed with Buffer.
//   {"op": "session", "messages": [{"topic": "...", "b64": "..."}, ...]}
//                                   -> {"messages": [{"topic", "tahu", "arrays", "filled"}]}:
//                                      decodes a node's messages in order as a host would: the
//                                      alias and datatype of each metric are learnt from NBIRTH/
//                                      DBIRTH, and DATA metrics, which carry an alias and no
//                                      datatype, get that datatype before Tahu decodes them
//                                      (`filled` counts them; an unknown alias is an error).
// 64-bit integers travel as decimal strings both ways so nothing is rounded through doubles.
"use strict";
const sp = require("sparkplug-payload").get("spBv1.0");
const Long = require("long");
const proto = require("sparkplug-payload/lib/sparkplugPayloadProto");
const Payload = proto.org.eclipse.tahu.protobuf.Payload;

const ARRAY = {
  22: ["readInt8", "writeInt8", 1], 23: ["readInt16LE", "writeInt16LE", 2],
  24: ["readInt32LE", "writeInt32LE", 4], 25: ["readBigInt64LE", "writeBigInt64LE", 8],
  26: ["readUInt8", "writeUInt8", 1], 27: ["readUInt16LE", "writeUInt16LE", 2],
  28: ["readUInt32LE", "writeUInt32LE", 4], 29: ["readBigUInt64LE", "writeBigUInt64LE", 8],
  30: ["readFloatLE", "writeFloatLE", 4], 31: ["readDoubleLE", "writeDoubleLE", 8],
  34: ["readBigInt64LE", "writeBigInt64LE", 8],
};
const LONG_TYPES = new Set(["Int64", "UInt32", "UInt64", "DateTime"]);

function plain(v) {
  if (v === null || v === undefined) return v === undefined ? null : v;
  if (Long.isLong(v)) return v.toString();
  if (typeof v === "bigint") return v.toString();
  if (v instanceof Uint8Array) return { hex: Buffer.from(v).toString("hex") };
  if (Array.isArray(v)) return v.map(plain);
  if (typeof v === "object") {
    const o = {};
    for (const k of Object.keys(v)) o[k] = plain(v[k]);
    return o;
  }
  return v;
}

function unpackArray(type, bytes) {
  const b = Buffer.from(bytes);
  if (type === 32) {
    const n = b.readUInt32LE(0), out = [];
    for (let i = 0; i < n; i++) out.push((b[4 + (i >> 3)] & (0x80 >> (i & 7))) !== 0);
    return out;
  }
  if (type === 33) {
    const s = b.toString("utf8");
    return s.length ? s.slice(0, -1).split("\u0000") : [];
  }
  const [read, , size] = ARRAY[type], out = [];
  for (let off = 0; off < b.length; off += size) out.push(plain(b[read](off)));
  return out;
}

function packArray(type, values) {
  if (type === 32) {
    const b = Buffer.alloc(4 + Math.ceil(values.length / 8));
    b.writeUInt32LE(values.length, 0);
    values.forEach((v, i) => { if (v) b[4 + (i >> 3)] |= 0x80 >> (i & 7); });
    return b;
  }
  if (type === 33) return Buffer.from(values.map((s) => s + "\u0000").join(""), "utf8");
  const [, write, size] = ARRAY[type];
  const b = Buffer.alloc(values.length * size);
  values.forEach((v, i) => {
    const big = size === 8 && !write.startsWith("writeDouble");
    b[write](big ? BigInt(v) : v, i * size);
  });
  return b;
}

function toTahuValue(m) {
  if (m.value === null) return null;
  if (LONG_TYPES.has(m.type)) return Long.fromString(String(m.value), m.type !== "Int64");
  if (m.type === "Bytes" || m.type === "File") return Buffer.from(m.value.hex, "hex");
  return m.value;
}

function encode(req) {
  const arrays = [];
  const metrics = [];
  for (const m of req.metrics) {
    if (m.array) { arrays.push(m); continue; }
    const t = Object.assign({}, m, { value: toTahuValue(m) });
    if (m.type === "Template") t.value = m.value;  // templates are passed through as given
    if (m.type === "DataSet") t.value = m.value;
    metrics.push(t);
  }
  const tahu = sp.encodePayload({ timestamp: Long.fromString(String(req.timestamp), true),
                                  seq: req.seq, metrics });
  if (!arrays.length) return Buffer.from(tahu).toString("base64");
  const p = Payload.decode(tahu);
  for (const m of arrays) {
    p.metrics.push(Payload.Metric.create({ name: m.name, datatype: m.datatype,
      timestamp: Long.fromString(String(m.timestamp), true), bytesValue: packArray(m.datatype, m.value) }));
  }
  return Buffer.from(Payload.encode(p).finish()).toString("base64");
}

function decode(b64) {
  const bytes = Buffer.from(b64, "base64");
  const tahu = sp.decodePayload(bytes);
  const raw = Payload.decode(bytes);
  const arrays = {};
  raw.metrics.forEach((m) => {
    if (m.datatype >= 22 && m.datatype <= 34) arrays[m.name] = unpackArray(m.datatype, m.bytesValue);
  });
  return { tahu: plain(tahu), arrays };
}

function session(messages) {
  const byAlias = new Map(), byName = new Map(), out = [];
  for (const msg of messages) {
    const type = msg.topic.split("/")[2];
    const raw = Payload.decode(Buffer.from(msg.b64, "base64"));
    let filled = 0;
    raw.metrics.forEach((m) => {
      // proto2 optional fields: protobufjs puts defaults on the prototype, so ask for own ones.
      const hasType = Object.prototype.hasOwnProperty.call(m, "datatype") && m.datatype !== 0;
      const alias = Object.prototype.hasOwnProperty.call(m, "alias") ? Long.fromValue(m.alias).toString() : null;
      if (type === "NBIRTH" || type === "DBIRTH") {
        if (alias !== null) byAlias.set(alias, m.datatype);
        if (m.name) byName.set(type === "DBIRTH" ? msg.topic.split("/")[4] + "/" + m.name : m.name, m.datatype);
      } else if (!hasType) {
        const known = alias !== null ? byAlias.get(alias) : byName.get(m.name);
        if (known === undefined) throw new Error(`${msg.topic}: metric ${m.name || "alias " + alias} was never born`);
        m.datatype = known;
        filled += 1;
      }
    });
    const bytes = Buffer.from(Payload.encode(raw).finish());
    const arrays = {};
    raw.metrics.forEach((m) => {
      if (m.datatype >= 22 && m.datatype <= 34) arrays[m.name || String(m.alias)] = unpackArray(m.datatype, m.bytesValue);
    });
    out.push({ topic: msg.topic, tahu: plain(sp.decodePayload(bytes)), arrays, filled });
  }
  return { messages: out };
}

let input = "";
process.stdin.on("data", (d) => { input += d; });
process.stdin.on("end", () => {
  const req = JSON.parse(input);
  const out = req.op === "decode" ? decode(req.b64)
    : req.op === "session" ? session(req.messages) : { b64: encode(req.payload) };
  process.stdout.write(JSON.stringify(out));
});
