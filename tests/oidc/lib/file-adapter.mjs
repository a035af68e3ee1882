// File-backed storage adapter for oidc-provider.
//
// The in-memory adapter that ships with oidc-provider loses every grant and
// token when the process dies, which would make "the provider restarts"
// indistinguishable from "the provider forgot everyone". The vault's tests
// need the opposite: refresh tokens issued before a crash keep working after
// it, and revoked/consumed ones stay dead.
//
// Layout: one JSON file per model (`<dir>/<Model>.json`) mapping id ->
// { payload, expiresAt }. Each model is held in memory and the whole file is
// rewritten atomically on every change. That is O(entries) per write, which
// is irrelevant at test-suite volumes and keeps the on-disk state trivially
// consistent (a file is always one complete snapshot).
//
// Interface: https://github.com/panva/node-oidc-provider/blob/main/example/my_adapter.js
import * as fs from 'node:fs';
import * as path from 'node:path';

import { readJson, writeJsonAtomic } from './atomic-json.mjs';

// Models whose entries carry a grantId and must disappear when that grant is
// revoked (mirrors the set oidc-provider's own memory adapter indexes).
const GRANTABLE = new Set([
  'AccessToken',
  'AuthorizationCode',
  'RefreshToken',
  'DeviceCode',
  'BackchannelAuthenticationRequest',
  'PreAuthorizedCode',
]);

const epochSeconds = () => Math.floor(Date.now() / 1000);

class ModelStore {
  constructor(file) {
    this.file = file;
    this.entries = new Map(Object.entries(readJson(file, {})));
  }

  isLive(entry) {
    return entry.expiresAt === null || entry.expiresAt > Date.now();
  }

  get(id) {
    const entry = this.entries.get(id);
    if (!entry || !this.isLive(entry)) return undefined;
    // Hand out copies: oidc-provider may mutate what it gets back, and such
    // changes must only become real through upsert()/consume().
    return structuredClone(entry.payload);
  }

  liveEntries() {
    return [...this.entries].filter(([, entry]) => this.isLive(entry));
  }

  set(id, payload, expiresIn) {
    const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : null;
    this.entries.set(id, { payload: structuredClone(payload), expiresAt });
    this.flush();
  }

  delete(ids) {
    let changed = false;
    for (const id of ids) changed = this.entries.delete(id) || changed;
    if (changed) this.flush();
  }

  flush() {
    // Expired entries are dropped lazily here rather than with a timer, so the
    // file only changes as a direct consequence of a request.
    for (const [id, entry] of this.entries) {
      if (!this.isLive(entry)) this.entries.delete(id);
    }
    writeJsonAtomic(this.file, Object.fromEntries(this.entries));
  }
}

/**
 * Returns an adapter factory for the `adapter` configuration option. All
 * adapter instances for the same model share one ModelStore.
 */
export function createFileAdapter(dir) {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const stores = new Map();
  const storeFor = (model) => {
    if (!stores.has(model)) {
      stores.set(model, new ModelStore(path.join(dir, `${model}.json`)));
    }
    return stores.get(model);
  };

  return (model) => new FileAdapter(model, storeFor(model));
}

class FileAdapter {
  constructor(model, store) {
    this.model = model;
    this.store = store;
  }

  async upsert(id, payload, expiresIn) {
    this.store.set(id, payload, expiresIn);
  }

  async find(id) {
    return this.store.get(id);
  }

  async findByUid(uid) {
    // Only Session is looked up by uid; a linear scan is fine at test scale.
    const hit = this.store.liveEntries().find(([, entry]) => entry.payload.uid === uid);
    return hit ? structuredClone(hit[1].payload) : undefined;
  }

  async findByUserCode(userCode) {
    const hit = this.store.liveEntries().find(([, entry]) => entry.payload.userCode === userCode);
    return hit ? structuredClone(hit[1].payload) : undefined;
  }

  async consume(id) {
    const entry = this.store.entries.get(id);
    if (!entry) return;
    entry.payload.consumed = epochSeconds();
    this.store.flush();
  }

  async destroy(id) {
    this.store.delete([id]);
  }

  async revokeByGrantId(grantId) {
    if (!GRANTABLE.has(this.model)) return;
    const ids = [...this.store.entries]
      .filter(([, entry]) => entry.payload.grantId === grantId)
      .map(([id]) => id);
    this.store.delete(ids);
  }
}
