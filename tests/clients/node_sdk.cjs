// Sends a track and an identify through a real Segment Node.js SDK and prints, as one JSON object
// on stdout, the URL it posted to and the status the collector answered (or the error).
//
// usage: node node_sdk.cjs PACKAGE HOST WRITE_KEY USER_ID [PATH]
//   PACKAGE: `@segment/analytics-node` (the current SDK) or `analytics-node` (the legacy v6 one)
//   HOST, PATH: the SDK's own `host` and `path` options (PATH left to the SDK's default when absent)
// Exit code 0 only when every request was answered 2xx.
const [packageName, host, writeKey, userId, path] = process.argv.slice(2);

function done(output) {
  process.stdout.write(JSON.stringify(output));
  process.exit(output.errors.length === 0 && output.requests.length > 0 ? 0 : 1);
}

async function current() {
  const { Analytics } = require('@segment/analytics-node');
  const output = { requests: [], errors: [] };
  // No retries: a refused request must show up here, not be hidden by a later success.
  const analytics = new Analytics({ writeKey, host, path, maxRetries: 0, flushAt: 2, flushInterval: 200 });
  analytics.on('http_request', (request) => output.requests.push({ url: request.url, headers: request.headers }));
  analytics.on('http_response', (response) => {
    output.requests[output.requests.length - 1].status = response.status;
  });
  analytics.on('error', (error) => output.errors.push(String(error?.reason ?? error?.message ?? error)));
  analytics.track({ userId, event: 'Node SDK Track', properties: { sdk: packageName } });
  analytics.identify({ userId, traits: { plan: 'pro' } });
  await analytics.closeAndFlush({ timeout: 15000 });
  for (const request of output.requests) {
    if (!(request.status >= 200 && request.status < 300)) output.errors.push(`answered ${request.status}`);
  }
  done(output);
}

async function legacy() {
  const Analytics = require('analytics-node');
  const output = { requests: [], errors: [] };
  const options = { flushAt: 2, flushInterval: 200, retryCount: 0 };
  if (host) options.host = host;
  if (path) options.path = path;
  const analytics = new Analytics(writeKey, options);
  // v6 posts with axios to `${host}${path}`: its own instance is used, so its answer is seen here.
  analytics.axiosInstance.interceptors.response.use(
    (response) => {
      output.requests.push({ url: response.config.url, status: response.status });
      return response;
    },
    (error) => {
      output.requests.push({ url: error.config?.url, status: error.response?.status ?? null });
      return Promise.reject(error);
    },
  );
  // v6 sends the first message at once and the rest when flushed: each callback says how its
  // request ended, so all of them are awaited; a refusal its own first flush meets is not lost.
  process.on('unhandledRejection', (error) => output.errors.push(String(error?.message ?? error)));
  const sent = (send) =>
    new Promise((resolve) => send((error) => resolve(error && output.errors.push(String(error.message ?? error)))));
  const calls = [
    sent((cb) => analytics.track({ userId, event: 'Node SDK Track', properties: { sdk: packageName } }, cb)),
    sent((cb) => analytics.identify({ userId, traits: { plan: 'pro' } }, cb)),
  ];
  analytics.flush().catch(() => {}); // its error is the callbacks' too
  await Promise.all(calls);
  done(output);
}

(packageName === 'analytics-node' ? legacy() : current()).catch((error) => {
  done({ requests: [], errors: [String(error?.stack ?? error)] });
});
