// What a web page gets from `import { fal } from "@fal-ai/client"`: bundled by esbuild into one script that sets
// `window.falClient` (tests/e2e/test_fal_js_client.py builds it and loads it in Chromium).
export { ApiError, ValidationError, fal } from "@fal-ai/client";
