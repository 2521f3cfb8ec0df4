// Verify an inpaint-fleet webhook in Node.js (18+) with nothing but node:crypto (Standard Webhooks, v1 signatures).
// The npm package `standardwebhooks` does the same: new Webhook(secret).verify(body, headers).
//
// As a script (what the tests run): reads {"secret", "headers", "body"} as JSON on stdin, prints the event's type
// and exits 0, or prints why it refused and exits 1.
import { createHmac, timingSafeEqual } from "node:crypto";

const TOLERANCE_S = 5 * 60; // refuse replays of old messages (and clocks far apart)

export function verifyWebhook(secret, headers, body) {
  const id = headers["webhook-id"], timestamp = headers["webhook-timestamp"];
  const signatures = headers["webhook-signature"];
  if (!id || !timestamp || !signatures) throw new Error("missing webhook-id, webhook-timestamp or webhook-signature");
  if (Math.abs(Date.now() / 1000 - Number(timestamp)) > TOLERANCE_S) throw new Error("timestamp out of tolerance");
  const key = Buffer.from(secret.replace(/^whsec_/, ""), "base64");
  // Sign the raw body exactly as received: re-serialized JSON would not match.
  const expected = createHmac("sha256", key).update(`${id}.${timestamp}.${body}`).digest();
  for (const versioned of signatures.split(" ")) {
    const [version, signature] = versioned.split(",");
    const given = Buffer.from(signature ?? "", "base64");
    if (version === "v1" && given.length === expected.length && timingSafeEqual(given, expected)) {
      return JSON.parse(body);
    }
  }
  throw new Error("no matching signature");
}

if (import.meta.url === `file://${process.argv[1]}`) {
  let input = "";
  for await (const chunk of process.stdin) input += chunk;
  const { secret, headers, body } = JSON.parse(input);
  try {
    console.log(verifyWebhook(secret, headers, body).type);
  } catch (error) {
    console.log(`refused: ${error.message}`);
    process.exit(1);
  }
}
