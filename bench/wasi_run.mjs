// Runs a wasm32-wasip1 command (a bench built for wasm32) inside node's V8, with the process's
// arguments after the module's path and its environment: `node --no-liftoff bench/wasi_run.mjs
// target/wasm32-wasip1/release/deps/exchange-*.wasm`. `just bench-v8` uses it.
import { readFile } from "node:fs/promises";
import { WASI } from "node:wasi";
import process from "node:process";

const [path, ...args] = process.argv.slice(2);
if (!path) {
  console.error("usage: node [--no-liftoff] bench/wasi_run.mjs MODULE.wasm [ARGS...]");
  process.exit(2);
}
const wasi = new WASI({ version: "preview1", args: [path, ...args], env: process.env, returnOnExit: true });
const module = await WebAssembly.compile(await readFile(path));
// The library also links its Envoy glue, whose proxy-wasm imports a bench never calls: each
// becomes a function that fails loudly if it is called.
const imports = wasi.getImportObject();
for (const { module: from, name, kind } of WebAssembly.Module.imports(module)) {
  if (kind !== "function" || from.startsWith("wasi_")) continue;
  imports[from] ??= {};
  imports[from][name] = () => {
    throw new Error(`${from}.${name} called: a bench must not reach the host glue`);
  };
}
const instance = await WebAssembly.instantiate(module, imports);
// The filter's `_initialize` (a reactor's entry, for Envoy) sits next to the bench's `_start`:
// node's WASI refuses a module with both, so the command is started without it.
const exports = Object.fromEntries(Object.entries(instance.exports).filter(([k]) => k !== "_initialize"));
process.exitCode = wasi.start({ exports });
