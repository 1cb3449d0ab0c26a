// fal's JavaScript client, unmodified, against the platform: the only configuration is its own `proxyUrl`.
//
//   node scenario.mjs <name>
//
// Environment: PLATFORM_PROXY_URL (the platform's /fal/proxy), FAL_KEY (read by the client itself), SCENARIO_INPUT
// (JSON: what to run) and NODE_EXTRA_CA_CERTS (the test server's CA). tests/e2e/test_fal_js_client.py runs each
// scenario and reads the one JSON line it prints: what the client returned, saw or threw.

import { ApiError, ValidationError, fal } from "@fal-ai/client";

// The client proxies only in a browser unless told "always".
fal.config({ proxyUrl: { url: process.env.PLATFORM_PROXY_URL, when: "always" } });

const given = JSON.parse(process.env.SCENARIO_INPUT ?? "{}");
const WAIT_MS = 120_000;

async function waitUntil(check, what) {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

function described(error) {
  return {
    name: error.name,
    message: error.message,
    status: error.status,
    body: error.body,
    requestId: error.requestId,
    timeoutType: error.timeoutType,
    isUserTimeout: error.isUserTimeout,
    isApiError: error instanceof ApiError,
    isValidationError: error instanceof ValidationError,
    fieldErrors: error instanceof ValidationError ? error.fieldErrors : undefined,
  };
}

async function settled(promise) {
  try {
    return { value: await promise };
  } catch (error) {
    return { error: described(error) };
  }
}

const status = (requestId, logs = false) => fal.queue.status(given.app, { requestId, logs });

const scenarios = {
  // submit, status with logs until COMPLETED, result
  async queue() {
    const handle = await fal.queue.submit(given.app, { input: given.input });
    const seen = [];
    const done = await waitUntil(async () => {
      const now = await status(handle.request_id, true);
      seen.push(now.status);
      return now.status === "COMPLETED" && now;
    }, "the request to complete");
    const result = await fal.queue.result(given.app, { requestId: handle.request_id });
    return { handle, seen, done, result };
  },

  // fal.subscribe in either mode: every queue update the client hands the application, then the output
  async subscribe() {
    const updates = [];
    let enqueued = null;
    const result = await fal.subscribe(given.app, {
      input: given.input,
      logs: true,
      mode: given.mode,
      onEnqueue: (requestId) => (enqueued = requestId),
      onQueueUpdate: (update) => updates.push(structuredClone(update)),
    });
    const final = await status(result.requestId, true);
    return { enqueued, updates, result, final };
  },

  // fal.run: one request that answers once the request is final (startTimeout: the x-fal-request-timeout header)
  async run() {
    const options = { input: given.input };
    if (given.startTimeout !== undefined) options.startTimeout = given.startTimeout;
    return settled(fal.run(given.app, options));
  },

  async submit() {
    return settled(fal.queue.submit(given.app, { input: given.input }));
  },

  // a long request cancelled once it runs: its status says why it ended, its result is the client's error
  async cancel() {
    const { request_id: requestId } = await fal.queue.submit(given.app, { input: given.input });
    await waitUntil(async () => (await status(requestId)).status === "IN_PROGRESS", "the request to start");
    await fal.queue.cancel(given.app, { requestId });
    const done = await waitUntil(async () => {
      const now = await status(requestId);
      return now.status === "COMPLETED" && now;
    }, "the cancelled request to complete");
    return { requestId, done, result: await settled(fal.queue.result(given.app, { requestId })) };
  },

  // the status stream: its first event arrives while the request still runs (asked apart, over another request),
  // then the request is cancelled and the stream ends with the final status
  async statusStream() {
    const { request_id: requestId } = await fal.queue.submit(given.app, { input: given.input });
    const stream = await fal.queue.streamStatus(given.app, { requestId, logs: true });
    const events = [];
    let first = null;
    stream.on("data", (event) => {
      events.push(event);
      if (first === null) {
        first = status(requestId).then((now) => ({ event, statusMeanwhile: now.status }));
      }
    });
    const firstSeen = await waitUntil(() => first, "the first status event");
    await fal.queue.cancel(given.app, { requestId });
    const done = await stream.done();
    return { requestId, first: await firstSeen, events, done };
  },

  // fal.stream: every event the client yields, in order, then what done() settles with. With `cancel`, the request is
  // cancelled at its first IN_PROGRESS event and its result asked for once the stream has ended.
  async stream() {
    const stream = await fal.stream(given.app, { input: given.input });
    // Listened to at once: a refusal rejects it before any event.
    const done = settled(stream.done());
    const events = [];
    let cancelled = false;
    for await (const event of stream) {
      events.push(event);
      if (given.cancel && !cancelled && event.status === "IN_PROGRESS") {
        cancelled = true;
        await fal.queue.cancel(given.app, { requestId: event.request_id });
      }
    }
    const seen = { requestId: stream.requestId, events, done: await done };
    if (cancelled) {
      seen.result = await settled(fal.queue.result(given.app, { requestId: seen.requestId }));
    }
    return seen;
  },

  // fal.storage.upload (initiate, then PUT to the URL it answers), then the URL as an image-to-image input
  async uploadThenImageToImage() {
    const bytes = Buffer.from(given.png_base64, "base64");
    const url = await fal.storage.upload(new Blob([bytes], { type: "image/png" }));
    const result = await fal.subscribe(given.app, { input: { ...given.input, image_url: url } });
    return { url, result };
  },

  // a Blob inside `input`: the client uploads it itself (initiate through the proxy, then PUT) and sends its URL
  async blobInInput() {
    const image = new Blob([Buffer.from(given.png_base64, "base64")], { type: "image/png" });
    return { result: await fal.subscribe(given.app, { input: { ...given.input, image_url: image } }) };
  },

  // fal.stream with connectionMode "client": the client first asks fal's REST host for a temporary token (through
  // the proxy) to connect to fal.run with; what done() settles with
  async streamClientMode() {
    const stream = await fal.stream(given.app, { input: given.input, connectionMode: "client" });
    return { done: await settled(stream.done()) };
  },
};

const name = process.argv[2];
if (!(name in scenarios)) {
  console.error(`unknown scenario ${name}; one of ${Object.keys(scenarios).join(", ")}`);
  process.exit(2);
}
try {
  process.stdout.write(JSON.stringify(await scenarios[name]()) + "\n");
} catch (error) {
  console.error(error?.stack ?? error);
  console.error(JSON.stringify(error instanceof ApiError ? described(error) : String(error)));
  process.exit(1);
}
