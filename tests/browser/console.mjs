// The web console in headless Chromium, against a real gateway and broker that
// tests/gateway_browser.rs started (GATEWAY_URL). It opens the console, watches a table, sees
// a put made elsewhere appear, edits a value (and loses a compare-and-set race on purpose),
// searches, produces a record, and takes a screenshot that it checks is not blank.
// Exit code 0 when every step passed; otherwise the failing step is printed.
import { chromium } from 'playwright-core';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';

const gateway = process.env.GATEWAY_URL;
const screenshotPath = process.env.SCREENSHOT || 'console.png';
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
assert.ok(gateway, 'GATEWAY_URL is not set');

async function http(method, path, body, headers = {}) {
  const response = await fetch(gateway + path, { method, body, headers });
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

let step = 'launch';
const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const errors = [];
  page.on('pageerror', (error) => errors.push(error.message));
  page.on('console', (message) => { if (message.type() === 'error') errors.push(message.text()); });
  page.on('response', (response) => {
    if (response.status() >= 400) errors.push(`${response.status()} ${response.url()}`);
  });

  step = 'cluster status';
  await page.goto(`${gateway}/`);            // redirects to /console/
  await page.waitForSelector('#cluster-nodes tr[data-node]');
  assert.match(await page.textContent('#cluster-nodes'), /alive/);

  step = 'topics';
  await page.click('nav a[data-nav="topics"]');
  await page.waitForSelector('#topics tr[data-topic="prices"]');
  assert.match(await page.textContent('#topics tr[data-topic="prices"]'), /table/);
  assert.ok(await page.$('#topics tr[data-topic="events"]'), 'the plain topic is listed');

  step = 'a table, live';
  await page.click('#topics a >> text=prices');
  await page.waitForSelector('#partitions');
  await page.waitForSelector('[data-ready="true"]');
  await page.waitForSelector('#table-rows tr[data-key="apple"]');
  assert.match(await page.textContent('#table-rows tr[data-key="apple"] td.value'), /^1\.20$/);
  await page.waitForSelector('#table-rows tr[data-key="0xff00"]');

  step = 'a put made elsewhere appears';
  const elsewhere = await http('PUT', '/v1/tables/prices/banana', '0.55');
  assert.equal(elsewhere.status, 200);
  await page.waitForSelector('#table-rows tr[data-key="banana"]', { timeout: 10000 });
  assert.equal(await page.textContent('#table-rows tr[data-key="banana"] td.value'), '0.55');

  step = 'edit a value (compare-and-set on the version shown)';
  const before = (await http('GET', '/v1/tables/prices/apple')).body.version;
  await page.click('#table-rows tr[data-key="apple"] button[data-action="edit"]');
  await page.fill('input[data-edit="apple"]', '1.30');
  await page.click('#table-rows tr[data-key="apple"] button[data-action="save"]');
  await page.waitForFunction(() =>
    document.querySelector('#table-rows tr[data-key="apple"] td.value')?.textContent === '1.30');
  const after = (await http('GET', '/v1/tables/prices/apple')).body;
  assert.equal(after.value, '1.30');
  assert.ok(after.version > before, `version ${after.version} after ${before}`);

  step = 'an edit that lost a race is refused, not applied';
  await page.click('#table-rows tr[data-key="banana"] button[data-action="edit"]');
  const raced = await http('PUT', '/v1/tables/prices/banana', '0.60');
  assert.equal(raced.status, 200);
  await page.fill('input[data-edit="banana"]', '0.99');
  await page.click('#table-rows tr[data-key="banana"] button[data-action="save"]');
  await page.waitForFunction(() => /Conflict/.test(document.querySelector('#table-error')?.textContent));
  assert.equal((await http('GET', '/v1/tables/prices/banana')).body.value, '0.60');
  await page.waitForFunction(() =>
    document.querySelector('#table-rows tr[data-key="banana"] td.value')?.textContent === '0.60');

  step = 'add a key (only if absent) and search';
  await page.fill('#new-key', 'cherry');
  await page.fill('#new-value', '3.10');
  await page.click('#add-form button');
  await page.waitForSelector('#table-rows tr[data-key="cherry"]');
  await page.fill('#search', 'ban');
  await page.waitForFunction(() => document.querySelector('#table-rows tr[data-key="apple"]').hidden);
  assert.equal(await page.isVisible('#table-rows tr[data-key="banana"]'), true);
  assert.equal(await page.isVisible('#table-rows tr[data-key="0xff00"]'), false);
  await page.fill('#search', '');

  step = 'screenshot of the live table, not blank';
  const png = await page.screenshot({ fullPage: true });
  writeFileSync(screenshotPath, png);
  // Count the distinct colours of the screenshot in the page itself (no image library here).
  const colours = await page.evaluate(async (dataUrl) => {
    const image = new Image();
    image.src = dataUrl;
    await image.decode();
    const canvas = document.createElement('canvas');
    canvas.width = image.width;
    canvas.height = image.height;
    const context = canvas.getContext('2d');
    context.drawImage(image, 0, 0);
    const pixels = context.getImageData(0, 0, image.width, image.height).data;
    const seen = new Set();
    for (let i = 0; i < pixels.length; i += 4 * 97) seen.add((pixels[i] << 16) | (pixels[i + 1] << 8) | pixels[i + 2]);
    return seen.size;
  }, `data:image/png;base64,${png.toString('base64')}`);
  assert.ok(colours >= 8, `the screenshot has ${colours} colour(s): blank`);

  step = 'produce a record';
  await page.click('nav a[data-nav="produce"]');
  await page.fill('#produce-topic', 'events');
  await page.fill('#produce-key', 'order-1');
  await page.fill('#produce-value', '{"total": 12}');
  await page.click('#produce-form button');
  await page.waitForFunction(() => /offset \d+/.test(document.querySelector('#produce-result')?.textContent));

  step = 'consumer groups and lag';
  await page.click('nav a[data-nav="groups"]');
  await page.waitForSelector('#groups tr[data-group="audit"]');
  await page.click('#groups a >> text=audit');
  await page.waitForSelector('#group-lag');
  assert.match(await page.textContent('#group-lag'), /^\d+$/);

  step = 'no errors in the page';
  assert.deepEqual(errors, []);
  console.log(`console test passed; screenshot ${screenshotPath} (${png.length} bytes, ${colours} colours sampled)`);
} catch (error) {
  console.error(`FAILED at step "${step}": ${error.stack || error}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
