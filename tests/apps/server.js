// A Node.js app: an HTTP server holding 200k entries in a Map, with a timer
// that keeps allocating. GET /digest hashes the map, GET /ping answers "pong".
"use strict";
const http = require("http");
const crypto = require("crypto");

const table = new Map();
for (let i = 0; i < 200000; i++) table.set(`key-${i}`, `value-${(i * 7919) % 1000003}-${"x".repeat(i % 50)}`);
let garbage = [];
setInterval(() => { garbage = Array.from({ length: 5000 }, (_, i) => ({ i, s: `g${i}` })); }, 5);

function digest() {
  const hash = crypto.createHash("sha256");
  for (const [k, v] of table) hash.update(k).update(v);
  return hash.digest("hex");
}

http.createServer((req, res) => {
  res.end(req.url === "/digest" ? digest() : "pong");
}).listen(Number(process.argv[2]), "127.0.0.1", () => {
  console.log(`ready ${process.pid}`);
});
