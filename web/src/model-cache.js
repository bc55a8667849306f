// Downloads the model (GGUF) with byte-level progress and keeps it in the Cache API, so the
// next visit loads it from disk. Runs in the worker (Cache API and fetch exist there too).

export const CACHE_NAME = 'specrej-models-v1';

/**
 * The model's bytes. `onProgress({ loaded, total, fromCache })` is called as bytes arrive
 * (`total` is the Content-Length, or 0 when the server sent none).
 */
export async function fetchModel(url, onProgress) {
  const cache = await openCache();
  if (cache) {
    const hit = await cache.match(url);
    if (hit) {
      const bytes = await readWithProgress(hit, (loaded, total) => onProgress({ loaded, total, fromCache: true }));
      if (bytes) return { bytes, fromCache: true };
      await cache.delete(url); // a truncated entry: fetch it again
    }
  }
  const response = await fetch(url);
  if (!response.ok) throw new Error(`downloading ${url}: HTTP ${response.status} ${response.statusText}`);
  const bytes = await readWithProgress(response, (loaded, total) => onProgress({ loaded, total, fromCache: false }));
  if (!bytes) throw new Error(`downloading ${url}: the connection closed before Content-Length bytes arrived`);
  if (cache) {
    try {
      await cache.put(url, new Response(bytes, {
        headers: { 'Content-Type': 'application/octet-stream', 'Content-Length': String(bytes.byteLength) },
      }));
    } catch (e) {
      console.warn(`could not cache ${url}: ${e}`); // quota: the demo still runs
    }
  }
  return { bytes, fromCache: false };
}

/** Whether `url` is cached, and its size. */
export async function cachedModel(url) {
  const cache = await openCache();
  const hit = cache && (await cache.match(url));
  if (!hit) return null;
  return { size: Number(hit.headers.get('Content-Length') || 0) };
}

export async function clearModelCache() {
  if (typeof caches === 'undefined') return false;
  return caches.delete(CACHE_NAME);
}

async function openCache() {
  try {
    return typeof caches === 'undefined' ? null : await caches.open(CACHE_NAME);
  } catch {
    return null; // e.g. an opaque origin
  }
}

/** Reads the body chunk by chunk; null if fewer bytes than Content-Length arrived. */
async function readWithProgress(response, progress) {
  const total = Number(response.headers.get('Content-Length') || 0);
  const reader = response.body.getReader();
  let buffer = new Uint8Array(total > 0 ? total : 1 << 20);
  let loaded = 0;
  let last = 0;
  progress(0, total);
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (loaded + value.byteLength > buffer.byteLength) {
      const grown = new Uint8Array(Math.max(buffer.byteLength * 2, loaded + value.byteLength));
      grown.set(buffer.subarray(0, loaded));
      buffer = grown;
    }
    buffer.set(value, loaded);
    loaded += value.byteLength;
    const now = performance.now();
    if (now - last > 50) {
      last = now;
      progress(loaded, total);
    }
  }
  progress(loaded, total);
  if (total > 0 && loaded !== total) return null;
  return loaded === buffer.byteLength ? buffer : buffer.slice(0, loaded);
}
