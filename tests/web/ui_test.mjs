// End-to-end test of the web UI that `diffuse serve` embeds: a real server on the tiny SD 1.x
// model, the page in headless Chromium (Debian's /usr/bin/chromium through playwright-core).
//
//   node ui_test.mjs <diffuse binary> <model file or models dir> <artifacts dir>
//
// A model file is copied into a fresh models folder; a folder is used as it is. The binary may
// be a .mjs stand-in (run with node, same arguments) for working on the UI without the C++ build.
// Exit: 0 pass, 1 fail, 77 skip (no Chromium, or `npm ci` not run in tests/web).
// Environment: DIFFUSE_CHROMIUM overrides the browser path.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const SKIP = 77;
const HERE = path.dirname(fileURLToPath(import.meta.url));
const INIT_IMAGE = path.join(HERE, '..', 'data', 'sd1', 'init.png');
const LORA = path.join(HERE, '..', 'data', 'sd1-lora', 'lora-kohya.safetensors');
const CHROMIUM = process.env.DIFFUSE_CHROMIUM || '/usr/bin/chromium';
const PROMPT = 'a small red house by a lake';
const SEED = 12345;

const results = { passed: 0, failed: 0 };
function check(ok, what, detail = '') {
  if (ok) results.passed++; else results.failed++;
  console.log(`${ok ? 'ok  ' : 'FAIL'} - ${what}${detail ? ` (${detail})` : ''}`);
  return ok;
}
function skip(reason) {
  console.log(`SKIP: ${reason}`);
  process.exit(SKIP);
}

// ---------------------------------------------------------------- the server
function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function modelsDir(arg, tmp) {
  if (fs.statSync(arg).isDirectory()) return arg;
  // Copies (symlinks out of the folder are refused); the second one is for the model picker.
  const dir = path.join(tmp, 'models');
  fs.mkdirSync(path.join(dir, 'copy'), { recursive: true });
  fs.copyFileSync(arg, path.join(dir, path.basename(arg)));
  fs.copyFileSync(arg, path.join(dir, 'copy', path.basename(arg)));
  return dir;
}

function loraDir(tmp) {
  const dir = path.join(tmp, 'loras');
  fs.mkdirSync(dir);
  fs.copyFileSync(LORA, path.join(dir, path.basename(LORA)));
  return dir;
}

// Starts the server; resolves with {proc, url, log()} once it prints "listening on URL" or
// accepts connections, rejects when it exits first or takes over `ms`.
function startServer(bin, models, loras, port, ms = 90000) {
  const args = ['serve', '--models-dir', models, '--lora-dir', loras, '--host', '127.0.0.1',
    '--port', String(port)];
  const isScript = /\.m?js$/.test(bin);
  const proc = spawn(isScript ? process.execPath : bin, isScript ? [bin, ...args] : args,
    { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  const log = () => out;
  return new Promise((resolve, reject) => {
    let done = false;
    const finish = (err, url) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      clearInterval(poll);
      if (err) { proc.kill('SIGKILL'); reject(err); } else resolve({ proc, url, log });
    };
    const onData = (d) => {
      out += d;
      const m = out.match(/listening on (http:\/\/[^\s"']+)/);
      if (m) finish(null, m[1].replace(/\/$/, ''));
    };
    proc.stdout.on('data', onData);
    proc.stderr.on('data', onData);
    proc.on('error', (e) => finish(new Error(`cannot start ${bin}: ${e.message}`)));
    proc.on('exit', (code, sig) => finish(new Error(`server exited early (${code ?? sig})\n${out}`)));
    const url = `http://127.0.0.1:${port}`;
    const poll = setInterval(() => {   // a server that prints nothing: accepting connections
      const sock = net.connect(port, '127.0.0.1', () => { sock.destroy(); finish(null, url); });
      sock.on('error', () => {});
    }, 250);
    const timer = setTimeout(() => finish(new Error(`server not ready after ${ms / 1000} s\n${out}`)), ms);
  });
}

function stopServer(proc) {
  if (!proc || proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const hard = setTimeout(() => proc.kill('SIGKILL'), 5000);
    proc.on('exit', () => { clearTimeout(hard); resolve(); });
    proc.kill('SIGTERM');
  });
}

// ---------------------------------------------------------------- page helpers
async function openPage(browser, url, contextOptions, pageErrors) {
  const context = await browser.newContext(contextOptions);
  const page = await context.newPage();
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.on('console', (m) => { if (m.type() === 'error') console.log(`  [browser console] ${m.text()}`); });
  await page.goto(url + '/');
  // The lists come from the server: samplers, and a selected model.
  await page.waitForFunction(() => document.getElementById('sampler').options.length > 0 &&
    document.getElementById('model').value !== '', null, { timeout: 20000 });
  return { context, page };
}

// Records every value the progress bar takes (value is reflected as an attribute).
async function watchProgress(page) {
  await page.evaluate(() => {
    window.__progress = [];
    const bar = document.getElementById('progress-bar');
    new MutationObserver(() => window.__progress.push(bar.value))
      .observe(bar, { attributes: true, attributeFilter: ['value'] });
  });
}

async function fillForm(page, { prompt, width, height, steps, seed, batch = 1 }) {
  await page.fill('#prompt', prompt);
  await page.fill('#negative', 'blurry');
  await page.fill('#width', String(width));
  await page.fill('#height', String(height));
  await page.fill('#steps', String(steps));
  await page.fill('#seed', String(seed));
  await page.fill('#batch', String(batch));
}

// Clicks Generate and waits until the gallery holds `count` results and the button is back.
async function generateAndWait(page, count, timeout = 120000) {
  await page.click('#generate');
  await page.waitForFunction((n) => {
    const msg = document.getElementById('message');
    if (!msg.hidden) return true;   // an error: stop waiting, the caller reports it
    return document.querySelectorAll('#gallery figure.result').length >= n &&
      !document.getElementById('generate').disabled;
  }, count, { timeout });
}

async function messageText(page) {
  return page.evaluate(() => {
    const m = document.getElementById('message');
    return m.hidden ? '' : document.getElementById('message-text').textContent.trim();
  });
}

// The newest gallery entry: seed, parameters text, download name, image size and bytes.
async function newestResult(page) {
  return page.evaluate(async () => {
    const fig = document.querySelector('#gallery figure.result');
    const img = fig.querySelector('img');
    await img.decode();
    const a = fig.querySelector('a.download');
    return {
      seed: fig.dataset.seed,
      params: fig.querySelector('.params').textContent,
      download: a.getAttribute('download'),
      href: a.getAttribute('href').slice(0, 22),
      width: img.naturalWidth,
      height: img.naturalHeight,
      b64: img.src.slice(img.src.indexOf(',') + 1),
    };
  });
}

async function phoneLayout(page) {
  return page.evaluate(() => {
    const r = document.getElementById('generate').getBoundingClientRect();
    return {
      scrollWidth: document.documentElement.scrollWidth,
      innerWidth: window.innerWidth,
      innerHeight: window.innerHeight,
      button: { top: r.top, bottom: r.bottom, left: r.left, right: r.right },
    };
  });
}
function layoutOk(l) {
  const b = l.button;
  return l.scrollWidth <= 390 && b.top >= 0 && b.left >= 0 && b.bottom <= l.innerHeight &&
    b.right <= l.innerWidth && b.bottom > b.top;
}

// ---------------------------------------------------------------- the checks
async function desktopChecks(browser, url, art, pageErrors) {
  const { context, page } = await openPage(browser, url, { viewport: { width: 1280, height: 900 } }, pageErrors);
  const model = await page.$eval('#model', (s) => s.value);
  check(model.length > 0, 'a model is selected from /sd-models and /options', model);
  const other = await page.$$eval('#model option', (os, cur) => os.map((o) => o.value).find((v) => v && v !== cur), model);
  if (other) {
    await page.selectOption('#model', other);
    await page.waitForFunction(() => /^Model: /.test(document.getElementById('status').textContent) &&
      !document.getElementById('model').disabled, null, { timeout: 60000 });
    const now = await page.evaluate(async () => (await fetch('sdapi/v1/options')).json());
    check(now.sd_model_checkpoint === other && await messageText(page) === '',
      'the model picker switches the model (POST /options)', `${now.sd_model_checkpoint}`);
  }

  // A request the server refuses shows its message.
  await fillForm(page, { prompt: PROMPT, width: 64, height: 64, steps: 100000, seed: SEED });
  await page.click('#generate');
  await page.waitForSelector('#message:not([hidden])', { timeout: 20000 });
  const refusal = await messageText(page);
  check(/steps/i.test(refusal), 'a refused request shows the server\'s error', refusal.slice(0, 120));
  await page.click('#message-close');

  // txt2img with a fixed seed: progress, gallery, parameters.
  await fillForm(page, { prompt: PROMPT, width: 64, height: 64, steps: 12, seed: SEED });
  await watchProgress(page);
  const t0 = Date.now();
  await generateAndWait(page, 1);
  const took = (Date.now() - t0) / 1000;
  const err = await messageText(page);
  check(err === '', 'txt2img without an error message', err);
  const seen = await page.evaluate(() => window.__progress);
  const between = seen.filter((v) => v > 0 && v < 1);
  check(seen.some((v) => v > 0), 'the progress bar moved', `values ${JSON.stringify(seen)}, ${took.toFixed(1)} s`);
  if (took > 2) check(between.length > 0, 'the progress bar showed a value between 0 and 1 while running');
  const r = await newestResult(page);
  check(r.width === 64 && r.height === 64, 'the gallery image is 64x64', `${r.width}x${r.height}`);
  check(Buffer.from(r.b64, 'base64').subarray(1, 4).toString() === 'PNG', 'the image is a PNG');
  check(r.seed === String(SEED), 'the gallery entry has the fixed seed', r.seed);
  check(r.params.includes(PROMPT), 'the parameters text has the prompt', r.params.slice(0, 80));
  check(r.params.includes(String(SEED)), 'the parameters text has the seed');
  check(r.download === `diffuse-${SEED}.png` && r.href.startsWith('data:image/png;base64'),
    'the download link is diffuse-<seed>.png', r.download);
  const preview = await page.$eval('#preview', (i) => !i.hidden && i.naturalWidth > 0);
  check(preview, 'the preview shows the result');
  await page.screenshot({ path: path.join(art, 'desktop-txt2img.png'), fullPage: true });

  // img2img with a painted mask: the request carries init_images and mask.
  let sent = null;
  page.on('request', (req) => { if (req.url().endsWith('/sdapi/v1/img2img')) sent = req.postDataJSON(); });
  await page.setInputFiles('#init-image', INIT_IMAGE);
  await page.waitForSelector('#canvas-wrap:not([hidden])');
  check(await page.$eval('#mode-badge', (b) => b.textContent) === 'img2img', 'an uploaded image switches to img2img');
  const box = await page.$eval('#mask-canvas', (c) => {
    c.scrollIntoView({ block: 'center' });
    const r = c.getBoundingClientRect(); return { x: r.x, y: r.y, w: r.width, h: r.height }; });
  await page.mouse.move(box.x + box.w * 0.3, box.y + box.h * 0.5);
  await page.mouse.down();
  await page.mouse.move(box.x + box.w * 0.7, box.y + box.h * 0.5, { steps: 8 });
  await page.mouse.up();
  check(await page.$eval('#mode-badge', (b) => b.textContent) === 'inpaint', 'painting a mask switches to inpaint');
  await fillForm(page, { prompt: PROMPT, width: 64, height: 64, steps: 6, seed: SEED + 1 });
  await generateAndWait(page, 2);
  const err2 = await messageText(page);
  check(err2 === '', 'inpaint without an error message', err2);
  check(sent && sent.init_images && sent.init_images.length === 1 && typeof sent.mask === 'string' &&
    sent.denoising_strength > 0, 'the img2img request has init_images, mask and denoising_strength');
  const r2 = await newestResult(page);
  check(r2.seed === String(SEED + 1) && r2.width === 64, 'the inpainted image is in the gallery', `seed ${r2.seed}`);
  await page.screenshot({ path: path.join(art, 'desktop.png'), fullPage: true });

  // Interrupt a long run: it ends early and the UI is ready again.
  await page.click('#init-clear');
  await fillForm(page, { prompt: PROMPT, width: 64, height: 64, steps: 150, seed: SEED });
  await page.click('#generate');
  await page.waitForFunction(() => document.getElementById('progress-bar').value > 0, null, { timeout: 60000 });
  const live = await page.waitForFunction(() => document.getElementById('preview').alt === 'Live preview',
    null, { timeout: 30000 }).then(() => true, () => false);
  check(live, 'a live preview (progress current_image) shows while it runs');
  const t1 = Date.now();
  await page.click('#interrupt');
  await page.waitForFunction(() => !document.getElementById('generate').disabled, null, { timeout: 60000 });
  const err3 = await messageText(page);
  check(err3 === '' || /interrupt|cancel/i.test(err3), 'Interrupt stops the run', `${((Date.now() - t1) / 1000).toFixed(1)} s after the click${err3 ? ': ' + err3 : ''}`);
  await context.close();
}

async function phoneChecks(browser, url, art, pageErrors) {
  const { context, page } = await openPage(browser, url, {
    viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true,
  }, pageErrors);
  let l = await phoneLayout(page);
  check(layoutOk(l), 'phone 390x844: no horizontal scroll, Generate in view', JSON.stringify(l));
  // Random seed, then "reuse last seed" takes the seed the server chose; a LoRA from the picker.
  await fillForm(page, { prompt: PROMPT, width: 64, height: 64, steps: 4, seed: -1 });
  const lora = await page.$eval('#lora', (s) => s.value);
  check(lora !== '', 'the LoRA picker lists /loras', lora);
  await page.fill('#lora-weight', '0.5');
  await page.click('#lora-add');
  const tag = `<lora:${lora}:0.5>`;
  check((await page.$eval('#prompt', (t) => t.value)).endsWith(tag), 'Add puts the LoRA tag in the prompt', tag);
  check(await page.$$eval('#lora-active .chip', (c) => c.length) === 1, 'the active LoRA shows as a chip');
  await page.evaluate(() => window.scrollTo(0, 0));
  await generateAndWait(page, 1);
  const err = await messageText(page);
  if (!check(err === '', 'txt2img with a LoRA without an error message', err)) throw new Error(err);
  const r = await newestResult(page);
  check(/^\d+$/.test(r.seed), 'a random seed is reported', r.seed);
  check(r.params.includes(tag), 'the parameters text has the LoRA tag', r.params.split('\n')[0]);
  await page.click('#seed-reuse');
  check(await page.$eval('#seed', (s) => s.value) === r.seed, '"Reuse last" puts the last seed in', r.seed);
  await page.evaluate(() => window.scrollTo(0, 0));
  l = await phoneLayout(page);
  check(layoutOk(l), 'phone after a result: no horizontal scroll, Generate in view', JSON.stringify(l));
  await page.$eval('#img2img', (d) => { d.open = true; d.scrollIntoView({ block: 'center' }); });
  l = await phoneLayout(page);
  check(layoutOk(l), 'phone scrolled into the form: Generate still in view', JSON.stringify(l.button));
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: path.join(art, 'phone.png') });
  await page.screenshot({ path: path.join(art, 'phone-full.png'), fullPage: true });
  await context.close();
}

async function main() {
  const [bin, modelArg, art] = process.argv.slice(2);
  if (!bin || !modelArg || !art) {
    console.error('usage: node ui_test.mjs <diffuse binary> <model file or models dir> <artifacts dir>');
    process.exit(2);
  }
  if (!fs.existsSync(CHROMIUM)) skip(`no Chromium at ${CHROMIUM} (scripts/install-deps.sh installs it)`);
  let chromium;
  try {
    ({ chromium } = await import('playwright-core'));
  } catch {
    skip(`playwright-core is not installed: run \`npm ci\` in ${HERE} (scripts/install-deps.sh does)`);
  }
  fs.mkdirSync(art, { recursive: true });
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'diffuse-web-ui-'));
  let server = null;
  let browser = null;
  const pageErrors = [];
  const started = Date.now();
  try {
    server = await startServer(bin, modelsDir(modelArg, tmp), loraDir(tmp), await freePort());
    console.log(`server at ${server.url}`);
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox', '--disable-dev-shm-usage'] });
    await desktopChecks(browser, server.url, art, pageErrors);
    await phoneChecks(browser, server.url, art, pageErrors);
    check(pageErrors.length === 0, 'no script errors in the page', pageErrors.join(' | '));
  } catch (e) {
    check(false, 'the run finished', e.stack || e.message);
    if (server) console.log(`---- server output ----\n${server.log().slice(-4000)}`);
  } finally {
    if (browser) await browser.close().catch(() => {});
    if (server) await stopServer(server.proc);
    fs.rmSync(tmp, { recursive: true, force: true });
  }
  console.log(`screenshots in ${art}; ${((Date.now() - started) / 1000).toFixed(1)} s`);
  console.log(`${results.passed} passed, ${results.failed} failed`);
  process.exit(results.failed === 0 && results.passed > 0 ? 0 : 1);
}

main();
