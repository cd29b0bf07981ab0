// Opens a page in a real headless Chromium (Debian's, driven by playwright-core) and prints, as one
// JSON object on stdout, what the page reported and every request the browser made, CORS
// preflights included (seen through the DevTools protocol, which reports them; Playwright's own
// request events do not).
//
// usage: node browser.mjs PAGE_URL CHROMIUM_PATH [SETTLE_MS]
// The page sets `window.__result` when it is done; SETTLE_MS (default 3000) more are waited for
// afterwards, so a retry analytics.js would make after a failed delivery shows up here.
import { chromium } from 'playwright-core';

const [pageUrl, executablePath, settleArg] = process.argv.slice(2);
if (!pageUrl || !executablePath) {
  console.error('usage: node browser.mjs PAGE_URL CHROMIUM_PATH [SETTLE_MS]');
  process.exit(2);
}
const settleMs = Number(settleArg ?? 3000);
// Header names as HTTP/1.1 sent them; lower-cased so that lookups do not depend on it.
const lowerCased = (headers) => Object.fromEntries(Object.entries(headers ?? {}).map(([k, v]) => [k.toLowerCase(), v]));

const browser = await chromium.launch({ executablePath, headless: true });
const output = { result: null, requests: [], console: [], errors: [], userAgent: null };
try {
  const context = await browser.newContext();
  const page = await context.newPage();
  const cdp = await context.newCDPSession(page);
  await cdp.send('Network.enable');
  const byId = new Map();
  cdp.on('Network.requestWillBeSent', (event) => {
    const entry = {
      id: event.requestId,
      method: event.request.method,
      url: event.request.url,
      headers: lowerCased(event.request.headers),
      initiator: event.initiator?.type ?? null,
      status: null,
      responseHeaders: null,
      failed: null,
    };
    byId.set(event.requestId, entry);
    output.requests.push(entry);
  });
  cdp.on('Network.responseReceived', (event) => {
    const entry = byId.get(event.requestId);
    if (entry) {
      entry.status = event.response.status;
      entry.responseHeaders = lowerCased(event.response.headers);
    }
  });
  cdp.on('Network.loadingFailed', (event) => {
    const entry = byId.get(event.requestId);
    if (entry) entry.failed = `${event.errorText} ${event.corsErrorStatus?.corsError ?? ''}`.trim();
  });
  page.on('console', (message) => output.console.push(`${message.type()}: ${message.text()}`));
  page.on('pageerror', (error) => output.errors.push(String(error)));

  await page.goto(pageUrl);
  await page.waitForFunction(() => window.__result !== undefined, null, { timeout: 30000 });
  output.result = await page.evaluate(() => window.__result);
  output.userAgent = await page.evaluate(() => navigator.userAgent);
  await page.waitForTimeout(settleMs);
} catch (error) {
  output.errors.push(String(error));
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(output));
