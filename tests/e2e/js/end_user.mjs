// fal's JavaScript client tagging every request with the end user it is for, as the README shows: its documented
// `requestMiddleware` adds the `X-Fal-End-User` header, and its own `proxyUrl` is the only other configuration.
//
//   node end_user.mjs <subscribe|submit>
//
// Environment as scenario.mjs's: PLATFORM_PROXY_URL, FAL_KEY, SCENARIO_INPUT (JSON: app, input, endUser) and
// NODE_EXTRA_CA_CERTS. tests/e2e/test_fal_js_end_user.py reads the one JSON line it prints: what the client returned
// or threw, and the headers each of its requests left with (after the middlewares, the proxy's among them).

import { ApiError, createFalClient } from "@fal-ai/client";

const given = JSON.parse(process.env.SCENARIO_INPUT ?? "{}");
const sent = [];

const fal = createFalClient({
  // The client proxies only in a browser unless told "always".
  proxyUrl: { url: process.env.PLATFORM_PROXY_URL, when: "always" },
  requestMiddleware: async (request) => ({
    ...request,
    headers: { ...request.headers, "X-Fal-End-User": given.endUser },
  }),
  // The platform's answer as the client parses it, after noting what the request carried.
  fetch: async (url, init) => {
    sent.push({ url: String(url), headers: Object.fromEntries(new Headers(init?.headers).entries()) });
    return fetch(url, init);
  },
});

async function settled(promise) {
  try {
    return { value: await promise };
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    return { error: { status: error.status, body: error.body } };
  }
}

const scenarios = {
  async subscribe() {
    return settled(fal.subscribe(given.app, { input: given.input }));
  },
  async submit() {
    return settled(fal.queue.submit(given.app, { input: given.input }));
  },
};

const name = process.argv[2];
if (!(name in scenarios)) {
  console.error(`unknown scenario ${name}; one of ${Object.keys(scenarios).join(", ")}`);
  process.exit(2);
}
try {
  const outcome = await scenarios[name]();
  process.stdout.write(JSON.stringify({ ...outcome, sent }) + "\n");
} catch (error) {
  console.error(error?.stack ?? error);
  process.exit(1);
}
