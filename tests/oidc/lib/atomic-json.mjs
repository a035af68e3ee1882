// Small JSON persistence helpers shared by the adapter and the provider's own
// state files (signing keys, cookie keys, counters).
//
// Everything is synchronous on purpose: the provider is a single-threaded test
// fixture, and synchronous write-temp-then-rename gives us a total order of
// writes for free (no two in-flight async writes racing to rename the same
// file), so whatever is on disk when the process is SIGKILLed is always the
// last complete snapshot.
import * as fs from 'node:fs';
import * as path from 'node:path';

/** Read and parse a JSON file; `fallback` when it does not exist. */
export function readJson(file, fallback) {
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    if (err.code === 'ENOENT') return fallback;
    throw err;
  }
  return JSON.parse(text);
}

/**
 * Replace `file` with the JSON of `value` atomically (write temp + rename).
 *
 * No fsync: the tests simulate provider crashes by killing the process, and
 * the kernel's page cache survives that; fsync would only protect against a
 * machine crash, which no test simulates, at a real cost per token request.
 */
export function writeJsonAtomic(file, value) {
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  fs.writeFileSync(tmp, `${JSON.stringify(value)}\n`, { mode: 0o600 });
  fs.renameSync(tmp, file);
}

/** Load a JSON file, or create it from `create()` if it does not exist yet. */
export function loadOrCreateJson(file, create) {
  const existing = readJson(file, undefined);
  if (existing !== undefined) return existing;
  const value = create();
  writeJsonAtomic(file, value);
  return value;
}
