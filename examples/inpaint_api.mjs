// Calling inpaint-fleet's HTTP API from Node.js 18+ (built-in fetch, no packages): submit a job with inline
// images, follow its server-sent events (resuming with Last-Event-ID if the stream drops), print the final job.
//
//   INPAINT_API_URL=http://127.0.0.1:8000 INPAINT_API_KEY=ik_... \
//     node examples/inpaint_api.mjs examples/image.png examples/mask.png "a red brick house" [steps]
//
// Exit code 0 when the job succeeded, 1 otherwise; the job object (docs/http-api.md) is printed as JSON.
import { readFile } from "node:fs/promises";
import { extname } from "node:path";

const api = process.env.INPAINT_API_URL;
const key = process.env.INPAINT_API_KEY;
const [imagePath, maskPath, prompt, steps] = process.argv.slice(2);
if (!api || !key || !imagePath || !maskPath || !prompt) {
  console.error("usage: INPAINT_API_URL=... INPAINT_API_KEY=... node inpaint_api.mjs IMAGE MASK PROMPT [STEPS]");
  process.exit(2);
}
const headers = { Authorization: `Bearer ${key}` };
const TYPES = { ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp" };

async function dataUri(path) {
  const type = TYPES[extname(path).toLowerCase()] ?? "image/png";
  return `data:${type};base64,${(await readFile(path)).toString("base64")}`;
}

async function call(method, path, body) {
  const response = await fetch(api + path, {
    method, headers: { ...headers, ...(body ? { "Content-Type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const answer = await response.json();
  if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${answer.error.code}: ${answer.error.message}`);
  return answer;
}

// Yields each event of the job's SSE stream; ends when the server closes it after the final state.
async function* events(jobId) {
  let lastId = null;
  for (let attempt = 0; attempt < 5; attempt++) {
    try {
      const response = await fetch(`${api}/v1/jobs/${jobId}/events`, {
        headers: { ...headers, ...(lastId ? { "Last-Event-ID": lastId } : {}) },
      });
      if (!response.ok) throw new Error(`events: HTTP ${response.status}`);
      const decoder = new TextDecoder();
      let buffer = "";
      for await (const chunk of response.body) {
        buffer += decoder.decode(chunk, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let data = null;
          for (const line of block.split("\n")) {
            if (line.startsWith("id: ")) lastId = line.slice(4);
            else if (line.startsWith("data: ")) data = JSON.parse(line.slice(6));
          }
          if (data) yield data;   // comment-only blocks are keep-alives
        }
      }
      return;
    } catch (error) {
      console.error(`event stream dropped (${error.message}); resuming after ${lastId}`);
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  }
  throw new Error("event stream: gave up after 5 attempts");
}

const body = { image: await dataUri(imagePath), mask: await dataUri(maskPath), prompt };
if (steps) body.num_inference_steps = Number(steps);
const job = await call("POST", "/v1/jobs", body);
console.error(`submitted ${job.id} (queue position ${job.queue_position})`);
for await (const event of events(job.id)) {
  console.error(`${event.type}: ${event.state} ${event.step}/${event.total_steps}`);
}
const final = await call("GET", `/v1/jobs/${job.id}`);
console.log(JSON.stringify(final));
process.exit(final.state === "succeeded" ? 0 : 1);
