// Real processes for the tests: a broker in a fresh temporary directory and gateways in front
// of it, on ephemeral loopback ports, killed when the test file ends. Binaries from
// SYNCLINE_BROKER_BIN / SYNCLINE_GATEWAY_BIN / SYNCLINE_CLI_BIN, else the workspace's
// target/debug.

import { execFile, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const here = path.dirname(fileURLToPath(import.meta.url));
// gateway/js/test-support → the workspace root.
const targetDebug = path.resolve(here, '../../../target/debug');

export const BROKER_BIN = process.env.SYNCLINE_BROKER_BIN ?? path.join(targetDebug, 'syncline-broker');
export const GATEWAY_BIN = process.env.SYNCLINE_GATEWAY_BIN ?? path.join(targetDebug, 'syncline-gateway');
export const CLI_BIN = process.env.SYNCLINE_CLI_BIN ?? path.join(targetDebug, 'syncline');

// How long a process may take to say where it listens (a debug build recovering its log).
const START_TIMEOUT_MS = 20_000;
// How long to keep retrying a gateway on a port its killed predecessor just released.
const SAME_PORT_RETRY_MS = 5_000;

const children = new Set();
const directories = new Set();

function cleanUp() {
  for (const child of children) child.kill('SIGKILL');
  children.clear();
  for (const directory of directories) rmSync(directory, { recursive: true, force: true });
  directories.clear();
}
process.on('exit', cleanUp);

/** Kills every process and removes every directory these helpers made (call in `after`). */
export function stopAll() {
  cleanUp();
}

// Spawns `bin`, reads its stderr until it logs `listening on ADDR` (not the metrics address)
// and keeps draining it so the pipe never fills.
function startListening(bin, args, env = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, args, {
      stdio: ['ignore', 'ignore', 'pipe'],
      env: { ...process.env, ...env },
    });
    children.add(child);
    const log = [];
    let buffered = '';
    let done = false;
    const timer = setTimeout(
      () => finish(new Error(`${path.basename(bin)} did not start:\n${log.join('\n')}`)),
      START_TIMEOUT_MS,
    );
    function finish(error, addr) {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (error) {
        child.kill('SIGKILL');
        reject(error);
      } else {
        resolve({ child, addr, log });
      }
    }
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk) => {
      buffered += chunk;
      const lines = buffered.split('\n');
      buffered = lines.pop();
      for (const raw of lines) {
        // eslint-disable-next-line no-control-regex
        const line = raw.replace(/\x1b\[[0-9;]*m/g, '');
        log.push(line);
        if (log.length > 200) log.shift();
        const found = / listening on (\S+)/.exec(line);
        if (found && !line.includes('metrics listening on')) finish(null, found[1]);
      }
    });
    child.on('error', (error) => finish(error));
    child.on('exit', (code, signal) => {
      children.delete(child);
      finish(
        Object.assign(new Error(`${path.basename(bin)} exited (${code ?? signal}):\n${log.join('\n')}`), {
          log,
        }),
      );
    });
  });
}

/** A broker over a fresh data directory: `{addr, child}`. */
export async function startBroker() {
  const directory = mkdtempSync(path.join(tmpdir(), 'syncline-js-'));
  directories.add(directory);
  const broker = await startListening(
    BROKER_BIN,
    [
      '--data-dir',
      path.join(directory, 'data'),
      '--listen',
      '127.0.0.1:0',
      '--metrics-listen',
      '127.0.0.1:0',
    ],
    { RUST_LOG: 'info' },
  );
  return broker;
}

/**
 * A gateway in front of `brokerAddr`: `{addr, url, port, child, kill()}`. With `port`, it
 * listens there, retrying while the port is still held (a predecessor just killed).
 */
export async function startGateway(brokerAddr, { port = 0 } = {}) {
  const deadline = Date.now() + SAME_PORT_RETRY_MS;
  for (;;) {
    try {
      const gateway = await startListening(GATEWAY_BIN, [
        '--listen',
        `127.0.0.1:${port}`,
        '--broker',
        brokerAddr,
      ]);
      return {
        ...gateway,
        url: `http://${gateway.addr}`,
        port: Number(gateway.addr.split(':').pop()),
        kill: () => killed(gateway.child),
      };
    } catch (error) {
      const portTaken = error.log?.some((line) => line.includes('cannot listen'));
      if (!port || !portTaken || Date.now() > deadline) throw error;
      await sleep(50);
    }
  }
}

/** SIGKILL, resolved once the process is gone. */
export function killed(child) {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) {
      resolve();
      return;
    }
    child.once('exit', () => resolve());
    child.kill('SIGKILL');
  });
}

const run = promisify(execFile);

/** Creates a table (a compacted topic) of one partition. */
export async function createTable(brokerAddr, name, extra = []) {
  await run(CLI_BIN, [
    '--broker',
    brokerAddr,
    'topic',
    'create',
    name,
    '--cleanup',
    'compact',
    '--partitions',
    '1',
    ...extra,
  ]);
}

/** Creates a plain topic of one partition. */
export async function createTopic(brokerAddr, name) {
  await run(CLI_BIN, [
    '--broker',
    brokerAddr,
    'topic',
    'create',
    name,
    '--cleanup',
    'delete',
    '--partitions',
    '1',
  ]);
}

let names = 0;
/** A topic name no other test of this process uses. */
export function uniqueName(prefix) {
  names += 1;
  return `${prefix}-${process.pid}-${names}`;
}

/** An HTTP request to a gateway: `{status, body}` (body parsed as JSON when it is). */
export async function http(gatewayUrl, method, pathname, { body, headers = {} } = {}) {
  // Records are posted as JSON (the gateway refuses other content types on POST).
  if (method === 'POST' && !Object.keys(headers).some((h) => h.toLowerCase() === 'content-type')) {
    headers = { ...headers, 'Content-Type': 'application/json' };
  }
  const response = await fetch(`${gatewayUrl}${pathname}`, { method, body, headers });
  const text = await response.text();
  let parsed = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    // Not JSON: the text.
  }
  return { status: response.status, body: parsed };
}

/** PUT a key through the HTTP API; returns its new version. */
export async function httpPut(gatewayUrl, table, key, value, headers = {}) {
  const { status, body } = await http(gatewayUrl, 'PUT', `/v1/tables/${table}/${encodeURIComponent(key)}`, {
    body: value,
    headers,
  });
  if (status !== 200) throw new Error(`PUT ${table}/${key}: ${status} ${JSON.stringify(body)}`);
  return body.version;
}

/** DELETE a key through the HTTP API; returns the delete's version. */
export async function httpDelete(gatewayUrl, table, key) {
  const { status, body } = await http(gatewayUrl, 'DELETE', `/v1/tables/${table}/${encodeURIComponent(key)}`);
  if (status !== 200) throw new Error(`DELETE ${table}/${key}: ${status} ${JSON.stringify(body)}`);
  return body.version;
}

/** GET a key through the HTTP API: `{value, version}` or undefined. */
export async function httpGet(gatewayUrl, table, key) {
  const { status, body } = await http(gatewayUrl, 'GET', `/v1/tables/${table}/${encodeURIComponent(key)}`);
  if (status === 404) return undefined;
  if (status !== 200) throw new Error(`GET ${table}/${key}: ${status} ${JSON.stringify(body)}`);
  return { value: body.value, version: body.version };
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `condition` every 10 ms until it holds; fails after `timeoutMs` naming `what`. */
export async function waitFor(condition, what, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(10);
  }
}

/** The next `event` from `emitter` that satisfies `predicate`. */
export function nextEvent(emitter, event, predicate = () => true, timeoutMs = 10_000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      emitter.off(event, listener);
      reject(new Error(`timed out after ${timeoutMs} ms waiting for a ${event} event`));
    }, timeoutMs);
    function listener(...args) {
      if (!predicate(...args)) return;
      clearTimeout(timer);
      emitter.off(event, listener);
      resolve(args[0]);
    }
    emitter.on(event, listener);
  });
}

/** Quick reconnects for tests: a restarted gateway is found within tens of milliseconds. */
export const FAST_BACKOFF = { initialMs: 20, maxMs: 200 };
