// diffuse web UI. Talks to the server's AUTOMATIC1111-style API (/sdapi/v1/...) only;
// no framework, no build step, nothing loaded from elsewhere.
'use strict';
(() => {
  const API = 'sdapi/v1/';          // relative: works behind a path prefix too
  const POLL_MS = 500;              // /progress while a job runs
  const PREVIEW_EVERY = 2;          // live preview every N sampling steps
  const MAX_INIT_SIDE = 2048;       // uploads larger than this are scaled down first
  const MAX_GALLERY = 200;          // oldest results dropped beyond this
  const MASK_COLOR = '#ff2d6f';     // how painted mask areas look (sent as white)
  const STORE_KEY = 'diffuse-ui-v1';
  const PERSIST = ['prompt', 'negative', 'width', 'height', 'steps', 'cfg', 'sampler', 'scheduler',
    'seed', 'batch', 'denoise', 'lora-weight', 'brush', 'mask-blur'];
  const LORA_TAG = /<lora:([^:>]+):([^>]*)>/g;

  const $ = (id) => document.getElementById(id);
  const state = {
    busy: false, polling: false, pollTimer: 0, started: 0, interrupted: false,
    model: '', lastSeed: null, hasInit: false, maskPainted: false,
  };

  // ---------------------------------------------------------------- helpers
  function el(tag, attrs = {}, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text != null) e.textContent = text;
    return e;
  }
  function button(text, onClick, attrs = {}) {
    const b = el('button', { type: 'button', ...attrs }, text);
    b.addEventListener('click', onClick);
    return b;
  }
  function int(id, fallback) {
    const v = parseInt($(id).value, 10);
    return Number.isFinite(v) ? v : fallback;
  }
  function float(id, fallback) {
    const v = parseFloat($(id).value);
    return Number.isFinite(v) ? v : fallback;
  }
  const round8 = (x) => Math.max(64, Math.round(x / 8) * 8);
  const bare = (dataUrl) => dataUrl.slice(dataUrl.indexOf(',') + 1);
  const pngUrl = (b64) => 'data:image/png;base64,' + b64;
  const stripHash = (title) => String(title).replace(/\s*\[[0-9a-fA-F]+\]$/, '');
  function seconds(s) {
    if (!(s > 0)) return '';
    return s < 60 ? `${s.toFixed(s < 10 ? 1 : 0)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  }

  // ---------------------------------------------------------------- messages, status
  function showMessage(text, kind = 'error') {
    $('message-text').textContent = text;
    $('message').classList.toggle('info', kind === 'info');
    $('message').hidden = false;
    if (kind === 'error') $('message').scrollIntoView({ block: 'nearest', behavior: 'smooth' });
  }
  function clearMessage() { $('message').hidden = true; }
  function setStatus(text) { $('status').textContent = text; }

  // ---------------------------------------------------------------- HTTP
  class ApiError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  // GET when body is undefined, else POST JSON. Resolves with the parsed JSON (or null).
  async function api(path, body) {
    const opts = body === undefined ? {} : {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
    };
    let res;
    try {
      res = await fetch(API + path, opts);
    } catch (e) {
      throw new ApiError(`Cannot reach the server (${e.message})`, 0);
    }
    const text = await res.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch { data = text; }
    }
    if (!res.ok) throw new ApiError(errorText(res, data), res.status);
    return data;
  }

  // A1111 errors are {error, detail, body, errors}; validation errors {detail: [{loc, msg}]};
  // OpenAI-style {error: {message}} is understood too.
  function errorText(res, data) {
    const parts = [];
    if (data && typeof data === 'object') {
      if (typeof data.error === 'string' && data.error) parts.push(data.error);
      else if (data.error && data.error.message) parts.push(data.error.message);
      if (Array.isArray(data.detail)) {
        parts.push(data.detail.map((d) => `${(d.loc || []).join('.')}: ${d.msg}`).join('; '));
      } else if (data.detail) {
        parts.push(String(data.detail));
      }
      const errors = typeof data.errors === 'string' ? data.errors : JSON.stringify(data.errors);
      if (data.errors && !parts.includes(errors)) parts.push(errors);
    } else if (typeof data === 'string') {
      parts.push(data.slice(0, 400));
    }
    const head = `HTTP ${res.status}${res.statusText ? ' ' + res.statusText : ''}`;
    return parts.length ? `${head}: ${parts.join(': ')}` : head;
  }

  // ---------------------------------------------------------------- saved form values
  function loadSaved() {
    try { return JSON.parse(localStorage.getItem(STORE_KEY)) || {}; } catch { return {}; }
  }
  const saved = loadSaved();
  function saveForm() {
    const v = {};
    for (const id of PERSIST) v[id] = $(id).value;
    try { localStorage.setItem(STORE_KEY, JSON.stringify(v)); } catch { /* private mode */ }
  }
  function restoreForm() {
    for (const id of PERSIST) {
      if (saved[id] !== undefined && $(id).tagName !== 'SELECT') $(id).value = saved[id];
    }
  }

  // ---------------------------------------------------------------- lists from the server
  // items: [{value, text, title?}]; the first of `wanted` that exists is selected.
  function fillSelect(sel, items, wanted) {
    sel.replaceChildren(...items.map((it) => {
      const o = new Option(it.text, it.value);
      if (it.title) o.title = it.title;
      return o;
    }));
    const values = items.map((it) => it.value);
    const pick = wanted.find((w) => w != null && values.includes(w));
    if (pick !== undefined) sel.value = pick;
  }

  async function loadModels() {
    const [models, options] = await Promise.all([api('sd-models'), api('options')]);
    const list = Array.isArray(models) ? models : [];
    const current = (options && options.sd_model_checkpoint) || '';
    const items = list.map((m) => ({ value: m.title, text: stripHash(m.title), title: m.title }));
    const match = list.find((m) => m.title === current || m.model_name === current ||
      m.filename === current || stripHash(m.title) === stripHash(current));
    if (!match && current) items.unshift({ value: current, text: stripHash(current), title: current });
    if (!items.length) items.push({ value: '', text: '(no models found)' });
    fillSelect($('model'), items, [match ? match.title : current]);
    state.model = $('model').value;
  }

  async function loadSamplers() {
    const list = await api('samplers');
    const items = (list || []).map((s) => ({ value: s.name, text: s.name }));
    fillSelect($('sampler'), items, [saved.sampler, 'Euler a', 'Euler']);
  }

  async function loadSchedulers() {
    let list = [];
    try { list = (await api('schedulers')) || []; } catch (e) { if (e.status !== 404) throw e; }
    if (!list.length) list = [{ name: 'automatic', label: 'Automatic' }];
    const items = list.map((s) => ({ value: s.name, text: s.label || s.name }));
    fillSelect($('scheduler'), items, [saved.scheduler, 'automatic']);
  }

  async function loadLoras() {
    let list = [];
    try { list = (await api('loras')) || []; } catch (e) { if (e.status !== 404) throw e; }
    const items = list.map((l) => ({
      value: l.name, text: l.alias && l.alias !== l.name ? `${l.name} (${l.alias})` : l.name, title: l.path,
    }));
    const none = !items.length;
    if (none) items.push({ value: '', text: '(no LoRAs found)' });
    fillSelect($('lora'), items, []);
    $('lora').disabled = $('lora-add').disabled = none;
  }

  async function loadLists() {
    const names = ['models', 'samplers', 'schedules', 'LoRAs'];
    const results = await Promise.allSettled([loadModels(), loadSamplers(), loadSchedulers(), loadLoras()]);
    const failed = results.map((r, i) => (r.status === 'rejected' ? `${names[i]}: ${r.reason.message}` : null))
      .filter(Boolean);
    if (failed.length) showMessage(`Could not load the server's lists.\n${failed.join('\n')}`);
    setStatus(state.model ? `Model: ${stripHash(state.model)}` : '');
  }

  async function refreshLists() {
    $('refresh').disabled = true;
    setStatus('Re-scanning…');
    // Older servers may lack these routes: a failed re-scan still reloads what is there.
    await Promise.allSettled([api('refresh-checkpoints', {}), api('refresh-loras', {})]);
    await loadLists();
    $('refresh').disabled = false;
  }

  // ---------------------------------------------------------------- model switching
  async function switchModel() {
    const sel = $('model');
    const title = sel.value;
    if (!title || title === state.model) return;
    sel.disabled = true;
    $('generate').disabled = true;
    setStatus(`Loading ${stripHash(title)}…`);
    try {
      await api('options', { sd_model_checkpoint: title });
      state.model = title;
      clearMessage();
      setStatus(`Model: ${stripHash(title)}`);
    } catch (e) {
      sel.value = state.model;
      showMessage(`Could not switch the model: ${e.message}`);
      setStatus(state.model ? `Model: ${stripHash(state.model)}` : '');
    } finally {
      sel.disabled = false;
      $('generate').disabled = state.busy;
    }
  }

  // ---------------------------------------------------------------- LoRA tags in the prompt
  function addLora() {
    const name = $('lora').value;
    if (!name) return;
    const w = float('lora-weight', 1);
    const tag = `<lora:${name}:${Math.round(w * 1000) / 1000}>`;
    const p = $('prompt');
    let found = false;
    const replaced = p.value.replace(LORA_TAG, (m, n) => {
      if (n !== name) return m;
      found = true;
      return tag;
    });
    p.value = found ? replaced : (p.value.trim() ? `${p.value.replace(/\s+$/, '')} ${tag}` : tag);
    onPromptChange();
  }

  function renderLoraChips() {
    const box = $('lora-active');
    box.replaceChildren();
    for (const m of $('prompt').value.matchAll(LORA_TAG)) {
      const chip = el('span', { class: 'chip' }, `${m[1]} × ${m[2]}`);
      chip.append(button('×', () => {
        const p = $('prompt');
        p.value = p.value.replace(m[0], '').replace(/[ \t]{2,}/g, ' ').trim();
        onPromptChange();
      }, { title: `Remove ${m[1]}`, 'aria-label': `Remove ${m[1]}` }));
      box.append(chip);
    }
  }

  function onPromptChange() {
    renderLoraChips();
    saveForm();
  }

  // ---------------------------------------------------------------- img2img and the mask
  function loadInitImage(src) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => { setInitImage(img); resolve(); };
      img.onerror = () => reject(new Error('That file is not an image this browser can read.'));
      img.src = src;
    });
  }

  function setInitImage(img) {
    const scale = Math.min(1, MAX_INIT_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
    const w = Math.max(1, Math.round(img.naturalWidth * scale));
    const h = Math.max(1, Math.round(img.naturalHeight * scale));
    const c = $('init-canvas');
    const m = $('mask-canvas');
    c.width = m.width = w;
    c.height = m.height = h;
    c.getContext('2d').drawImage(img, 0, 0, w, h);
    state.hasInit = true;
    state.maskPainted = false;
    // Keep the longer side of the current size, take the image's aspect ratio.
    const side = Math.max(int('width', 512), int('height', 512));
    const s = side / Math.max(w, h);
    $('width').value = round8(w * s);
    $('height').value = round8(h * s);
    $('canvas-wrap').hidden = $('mask-tools').hidden = false;
    $('canvas-wrap').classList.toggle('small', w < 256);
    $('init-clear').disabled = false;
    $('img2img').open = true;
    updateMode();
    saveForm();
  }

  function clearInitImage() {
    state.hasInit = false;
    state.maskPainted = false;
    $('init-image').value = '';
    $('canvas-wrap').hidden = $('mask-tools').hidden = true;
    $('init-clear').disabled = true;
    updateMode();
  }

  function clearMask() {
    const m = $('mask-canvas');
    m.getContext('2d').clearRect(0, 0, m.width, m.height);
    state.maskPainted = false;
    updateMode();
  }

  function maskHasPixels() {
    const m = $('mask-canvas');
    if (!m.width || !m.height) return false;
    const data = m.getContext('2d').getImageData(0, 0, m.width, m.height).data;
    for (let i = 3; i < data.length; i += 4) if (data[i]) return true;
    return false;
  }

  function updateMode() {
    const mode = !state.hasInit ? 'off' : state.maskPainted ? 'inpaint' : 'img2img';
    const badge = $('mode-badge');
    badge.textContent = mode;
    badge.classList.toggle('on', mode !== 'off');
  }

  function setupMaskPainting() {
    const m = $('mask-canvas');
    let drawing = false;
    let last = null;
    const pos = (e) => {
      const r = m.getBoundingClientRect();
      const k = m.width / r.width;
      return { x: (e.clientX - r.left) * k, y: (e.clientY - r.top) * (m.height / r.height), k };
    };
    const paint = (a, b) => {
      const ctx = m.getContext('2d');
      ctx.globalCompositeOperation = $('erase').checked ? 'destination-out' : 'source-over';
      ctx.strokeStyle = ctx.fillStyle = MASK_COLOR;
      ctx.lineCap = ctx.lineJoin = 'round';
      ctx.lineWidth = int('brush', 32) * b.k;   // brush size in screen pixels
      ctx.beginPath();
      if (a === b) {
        ctx.arc(b.x, b.y, ctx.lineWidth / 2, 0, Math.PI * 2);
        ctx.fill();
      } else {
        ctx.moveTo(a.x, a.y);
        ctx.lineTo(b.x, b.y);
        ctx.stroke();
      }
    };
    m.addEventListener('pointerdown', (e) => {
      if (e.button !== 0) return;
      drawing = true;
      m.setPointerCapture(e.pointerId);
      last = pos(e);
      paint(last, last);
      e.preventDefault();
    });
    m.addEventListener('pointermove', (e) => {
      if (!drawing) return;
      const p = pos(e);
      paint(last, p);
      last = p;
    });
    const end = () => {
      if (!drawing) return;
      drawing = false;
      state.maskPainted = maskHasPixels();
      updateMode();
    };
    m.addEventListener('pointerup', end);
    m.addEventListener('pointercancel', end);
  }

  // The painted areas as a white-on-black PNG (A1111: white = repaint).
  function maskPng() {
    const m = $('mask-canvas');
    const out = document.createElement('canvas');
    out.width = m.width;
    out.height = m.height;
    const ctx = out.getContext('2d');
    ctx.drawImage(m, 0, 0);
    ctx.globalCompositeOperation = 'source-in';
    ctx.fillStyle = '#fff';
    ctx.fillRect(0, 0, out.width, out.height);
    ctx.globalCompositeOperation = 'destination-over';
    ctx.fillStyle = '#000';
    ctx.fillRect(0, 0, out.width, out.height);
    return bare(out.toDataURL('image/png'));
  }

  // ---------------------------------------------------------------- generation
  function buildRequest() {
    const body = {
      prompt: $('prompt').value,
      negative_prompt: $('negative').value,
      width: int('width', 512),
      height: int('height', 512),
      steps: int('steps', 20),
      cfg_scale: float('cfg', 7),
      seed: int('seed', -1),
      batch_size: int('batch', 1),
      override_settings: { show_progress_every_n_steps: PREVIEW_EVERY },
    };
    if ($('sampler').value) body.sampler_name = $('sampler').value;
    if ($('scheduler').value) body.scheduler = $('scheduler').value;
    if (!state.hasInit) return ['txt2img', body];
    body.init_images = [bare($('init-canvas').toDataURL('image/png'))];
    body.denoising_strength = float('denoise', 0.75);
    if (state.maskPainted) {
      body.mask = maskPng();
      body.mask_blur = int('mask-blur', 4);
    }
    return ['img2img', body];
  }

  function setBusy(busy) {
    state.busy = busy;
    $('generate').disabled = busy;
    $('generate').textContent = busy ? 'Generating…' : 'Generate';
    $('interrupt').disabled = !busy;
    document.body.classList.toggle('busy', busy);
  }

  function setProgress(value, text) {
    $('progress-bar').value = Math.min(1, Math.max(0, value || 0));
    $('progress-text').textContent = text;
  }

  async function generate() {
    if (state.busy) return;
    clearMessage();
    saveForm();
    const [route, body] = buildRequest();
    state.started = performance.now();
    state.interrupted = false;
    setBusy(true);
    setProgress(0, 'Starting…');
    startPolling();
    try {
      const res = await api(route, body);
      stopPolling();
      const info = parseInfo(res && res.info);
      const images = (res && Array.isArray(res.images)) ? res.images : [];
      addResults(images, info);
      if (info.seed != null && info.seed !== -1) {
        state.lastSeed = info.seed;
        $('seed-reuse').disabled = false;
        $('seed-reuse').title = `Reuse seed ${info.seed}`;
      }
      const took = seconds((performance.now() - state.started) / 1000);
      const what = `${images.length} image${images.length === 1 ? '' : 's'}`;
      setProgress(1, `${state.interrupted ? 'Interrupted: ' : ''}${what} in ${took}`);
    } catch (e) {
      stopPolling();
      setProgress(0, 'Failed');
      showMessage(e.message);
    } finally {
      setBusy(false);
    }
  }

  // `info` is a JSON document inside a string.
  function parseInfo(info) {
    if (info && typeof info === 'object') return info;
    try { return JSON.parse(info) || {}; } catch { return {}; }
  }

  async function interrupt() {
    state.interrupted = true;
    $('interrupt').disabled = true;
    $('progress-text').textContent = 'Interrupting…';
    try {
      await api('interrupt', {});
    } catch (e) {
      showMessage(`Interrupt failed: ${e.message}`);
    }
  }

  // ---------------------------------------------------------------- progress polling
  function startPolling() {
    stopPolling();
    state.polling = true;
    state.pollTimer = setTimeout(pollOnce, 150);
  }

  function stopPolling() {
    state.polling = false;
    clearTimeout(state.pollTimer);
  }

  async function pollOnce() {
    if (!state.polling) return;
    try {
      const p = await api('progress');
      if (state.polling && p) showProgress(p);
    } catch { /* a missed poll is not an error; the next one may work */ }
    if (state.polling) state.pollTimer = setTimeout(pollOnce, POLL_MS);
  }

  function showProgress(p) {
    const st = p.state || {};
    if (!(p.progress > 0) && !st.job_count) return;   // not started yet
    const parts = [];
    if (st.job_count > 1) parts.push(`Batch ${(st.job_no || 0) + 1}/${st.job_count}`);
    if (st.sampling_steps) parts.push(`Step ${st.sampling_step || 0}/${st.sampling_steps}`);
    const eta = seconds(p.eta_relative);
    if (eta) parts.push(`ETA ${eta}`);
    if (p.textinfo) parts.push(String(p.textinfo));
    if (state.interrupted) parts.unshift('Interrupting…');
    setProgress(p.progress, parts.join(' · '));
    if (p.current_image) showPreview(pngUrl(p.current_image), true);
  }

  // ---------------------------------------------------------------- preview and gallery
  function showPreview(src, live = false) {
    const img = $('preview');
    img.onload = () => img.classList.toggle('small', img.naturalWidth < 256);
    img.src = src;
    img.alt = live ? 'Live preview' : 'Result';
    img.classList.toggle('live', live);
    img.hidden = false;
    $('preview-empty').hidden = true;
  }

  function addResults(images, info) {
    const first = info.index_of_first_image || 0;
    const seeds = Array.isArray(info.all_seeds) ? info.all_seeds : [];
    const texts = Array.isArray(info.infotexts) ? info.infotexts : [];
    const frag = document.createDocumentFragment();
    images.forEach((b64, i) => {
      const seedIndex = i - first;
      const seed = seedIndex >= 0 && seeds[seedIndex] != null ? seeds[seedIndex]
        : (info.seed != null ? info.seed + Math.max(0, seedIndex) : 'unknown');
      frag.append(resultCard(b64, seed, texts[i] || ''));
    });
    const gallery = $('gallery');
    gallery.prepend(frag);   // newest first, a batch in its own order
    while (gallery.children.length > MAX_GALLERY) gallery.lastElementChild.remove();
    if (images.length) showPreview(pngUrl(images[first < images.length ? first : 0]));
  }

  function resultCard(b64, seed, infotext) {
    const src = pngUrl(b64);
    const fig = el('figure', { class: 'result', 'data-seed': String(seed) });
    const img = el('img', { src, alt: `Result, seed ${seed}` });
    img.addEventListener('click', () => showPreview(src));
    const cap = el('figcaption');
    cap.append(el('div', { class: 'seed' }, `Seed ${seed}`),
      el('pre', { class: 'params' }, infotext || '(no parameters reported)'));
    const links = el('div', { class: 'links' });
    links.append(
      el('a', { class: 'download', href: src, download: `diffuse-${seed}.png` }, 'Download'),
      button('Use seed', () => { $('seed').value = seed; saveForm(); }),
      button('To img2img', () => loadInitImage(src).catch((e) => showMessage(e.message))));
    fig.append(img, cap, links);
    return fig;
  }

  // ---------------------------------------------------------------- wiring
  function bind() {
    $('controls').addEventListener('submit', (e) => { e.preventDefault(); generate(); });
    $('controls').addEventListener('input', saveForm);
    $('controls').addEventListener('change', saveForm);
    $('controls').addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
    });
    $('prompt').addEventListener('input', renderLoraChips);
    $('interrupt').addEventListener('click', interrupt);
    $('model').addEventListener('change', switchModel);
    $('refresh').addEventListener('click', refreshLists);
    $('message-close').addEventListener('click', clearMessage);
    $('lora-add').addEventListener('click', addLora);
    $('seed-random').addEventListener('click', () => { $('seed').value = -1; saveForm(); });
    $('seed-reuse').addEventListener('click', () => {
      if (state.lastSeed != null) { $('seed').value = state.lastSeed; saveForm(); }
    });
    $('swap-size').addEventListener('click', () => {
      const w = $('width').value;
      $('width').value = $('height').value;
      $('height').value = w;
      saveForm();
    });
    $('denoise').addEventListener('input', () => { $('denoise-value').textContent = $('denoise').value; });
    $('init-image').addEventListener('change', () => {
      const file = $('init-image').files[0];
      if (!file) return;
      const url = URL.createObjectURL(file);
      loadInitImage(url)
        .catch((e) => showMessage(e.message))
        .finally(() => URL.revokeObjectURL(url));
    });
    $('init-clear').addEventListener('click', clearInitImage);
    $('mask-clear').addEventListener('click', clearMask);
    setupMaskPainting();
  }

  function init() {
    restoreForm();
    $('denoise-value').textContent = $('denoise').value;
    bind();
    renderLoraChips();
    updateMode();
    setStatus('Connecting…');
    loadLists();
  }

  init();
})();
