// An independent Modbus TCP peer for Outpost's tests: npm `modbus-serial`'s ServerTCP.
//
// usage: node modbus_serial_server.js PORT
// stdin:  one JSON command per line: {"set": "holding"|"input"|"coil"|"discrete", "addr": N, "values": [...]}
// stdout: "READY <port>" once listening, then one JSON line per write received from the client.
"use strict";

const ModbusRTU = require("modbus-serial");
const readline = require("readline");

const port = parseInt(process.argv[2], 10);
const SIZE = 1000;
const tables = {
  holding: new Array(SIZE).fill(0),
  input: new Array(SIZE).fill(0),
  coil: new Array(SIZE).fill(false),
  discrete: new Array(SIZE).fill(false),
};

function check(addr) {
  if (addr < 0 || addr >= SIZE) {
    const err = new Error("illegal address " + addr);
    err.modbusErrorCode = 0x02;
    throw err;
  }
}

const vector = {
  getHoldingRegister: (addr) => { check(addr); return tables.holding[addr]; },
  getInputRegister: (addr) => { check(addr); return tables.input[addr]; },
  getCoil: (addr) => { check(addr); return tables.coil[addr]; },
  getDiscreteInput: (addr) => { check(addr); return tables.discrete[addr]; },
  setRegister: (addr, value) => {
    check(addr);
    tables.holding[addr] = value;
    console.log(JSON.stringify({ write: "holding", addr, value }));
  },
  setCoil: (addr, value) => {
    check(addr);
    tables.coil[addr] = value;
    console.log(JSON.stringify({ write: "coil", addr, value }));
  },
};

const server = new ModbusRTU.ServerTCP(vector, { host: "127.0.0.1", port, debug: false });
server.on("initialized", () => console.log("READY " + port));
server.on("socketError", (err) => console.error("socket error: " + err));
server.on("serverError", (err) => { console.error("server error: " + err); process.exit(1); });

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const cmd = JSON.parse(line);
  cmd.values.forEach((v, i) => { tables[cmd.set][cmd.addr + i] = v; });
  console.log(JSON.stringify({ ok: cmd.set, addr: cmd.addr }));
});
process.stdin.on("end", () => server.close(() => process.exit(0)));
