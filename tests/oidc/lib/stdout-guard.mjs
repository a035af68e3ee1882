// The Rust tests read exactly one line of JSON from this process's stdout.
// oidc-provider (and anything else) prints notices with console.info/log, so
// route every console method to stderr. Must be the first import of
// provider.mjs so it runs before any other module's top-level code.
import { format } from 'node:util';

const toStderr = (...args) => { process.stderr.write(`${format(...args)}\n`); };
console.log = toStderr;
console.info = toStderr;
console.debug = toStderr;
