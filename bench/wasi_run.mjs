// Runs a wasm32-wasip1 command inside node's V8 with the process's arguments after the module's
// path and its environment: the library's unit tests (`just unit-wasm`) and the exchange bench
// (`just bench-v8`), both built for wasm32-wasip1 and started as
//
//   node --no-liftoff bench/wasi_run.mjs MODULE.wasm [ARGS...]
//
// It serves WASI preview1 itself, in plain JavaScript, and only what those programs use:
// arguments, environment, clocks, random bytes, stdout and stderr, exit. No files (no preopened
// directory, so `path_open` is never reached), no stdin. node's own `node:wasi` is not used: with it,
// node 20 corrupted its JS heap while the unit tests ran (a V8 fatal error in garbage collection or
// a segmentation fault as the process exited, five runs in five, after every test had passed);
// with this runner the same build ran clean five times in five.
import { readFileSync, writeSync } from "node:fs";
import { randomFillSync } from "node:crypto";
import process from "node:process";

const [path, ...rest] = process.argv.slice(2);
if (!path) {
  console.error("usage: node [--no-liftoff] bench/wasi_run.mjs MODULE.wasm [ARGS...]");
  process.exit(2);
}
const ESUCCESS = 0, EBADF = 8, ENOSYS = 52;
const enc = new TextEncoder();
const args = [path, ...rest].map((a) => enc.encode(a + "\0"));
const env = Object.entries(process.env).map(([k, v]) => enc.encode(`${k}=${v}\0`));

class Exit {
  constructor(code) { this.code = code; }
}

let memory;
// One DataView for as long as the memory's buffer stays the same (growing the memory replaces it):
// the exchange bench reads the clock per exchange, and a fresh view per read showed in its numbers.
let dv;
const view = () => (dv && dv.buffer === memory.buffer ? dv : (dv = new DataView(memory.buffer)));
const bytes = (ptr, len) => new Uint8Array(memory.buffer, ptr, len);

// argv/environ: an array of pointers at `ptrs`, the strings one after another at `buf`.
function putStrings(list, ptrs, buf) {
  const v = view();
  for (const s of list) {
    v.setUint32(ptrs, buf, true);
    bytes(buf, s.length).set(s);
    ptrs += 4;
    buf += s.length;
  }
  return ESUCCESS;
}
function putSizes(list, countPtr, sizePtr) {
  const v = view();
  v.setUint32(countPtr, list.length, true);
  v.setUint32(sizePtr, list.reduce((n, s) => n + s.length, 0), true);
  return ESUCCESS;
}

const wasi = {
  args_sizes_get: (c, s) => putSizes(args, c, s),
  args_get: (p, b) => putStrings(args, p, b),
  environ_sizes_get: (c, s) => putSizes(env, c, s),
  environ_get: (p, b) => putStrings(env, p, b),
  clock_time_get(id, _precision, out) {
    // 0: realtime, 1: monotonic (the only two a Rust program asks for).
    const ns = id === 0 ? BigInt(Date.now()) * 1000000n : process.hrtime.bigint();
    view().setBigUint64(out, ns, true);
    return ESUCCESS;
  },
  random_get(ptr, len) {
    randomFillSync(bytes(ptr, len));
    return ESUCCESS;
  },
  fd_write(fd, iovs, iovsLen, written) {
    if (fd !== 1 && fd !== 2) return EBADF;
    const v = view();
    let n = 0;
    for (let i = 0; i < iovsLen; i++) {
      const ptr = v.getUint32(iovs + 8 * i, true);
      const len = v.getUint32(iovs + 8 * i + 4, true);
      let off = 0;
      while (off < len) off += writeSync(fd, bytes(ptr + off, len - off));
      n += len;
    }
    view().setUint32(written, n, true);
    return ESUCCESS;
  },
  fd_fdstat_get(fd, out) {
    if (fd > 2) return EBADF;
    const v = view();
    for (let i = 0; i < 24; i += 4) v.setUint32(out + i, 0, true);
    v.setUint8(out, 2); // a character device
    v.setBigUint64(out + 8, 0xffffffffn, true); // rights: all of preview1's base rights
    return ESUCCESS;
  },
  fd_prestat_get: () => EBADF, // no preopened directories: std's startup stops asking at the first
  fd_prestat_dir_name: () => EBADF,
  fd_close: (fd) => (fd > 2 ? EBADF : ESUCCESS),
  sched_yield: () => ESUCCESS,
  proc_exit(code) {
    throw new Exit(code);
  },
};

const module = new WebAssembly.Module(readFileSync(path));
const imports = {};
for (const { module: from, name, kind } of WebAssembly.Module.imports(module)) {
  if (kind !== "function") continue;
  imports[from] ??= {};
  if (from === "wasi_snapshot_preview1") {
    // A call this runner does not serve is an error the program sees, never a silent success.
    imports[from][name] = wasi[name] ?? (() => (name.startsWith("fd_") ? EBADF : ENOSYS));
  } else {
    // The library also links its Envoy glue, whose proxy-wasm imports a test or bench never
    // calls: each becomes a function that fails loudly if it is called.
    imports[from][name] = () => {
      throw new Error(`${from}.${name} called: a test or bench must not reach the host glue`);
    };
  }
}
const instance = new WebAssembly.Instance(module, imports);
memory = instance.exports.memory;
// Only `_start` runs: the filter's `_initialize` (a reactor's entry, for Envoy) sits next to it.
let code = 0;
try {
  instance.exports._start();
} catch (e) {
  if (!(e instanceof Exit)) throw e;
  code = e.code;
}
process.exitCode = code;
