// tokenrelay's /v1/responses through the official openai Node SDK. Run by tests/test_v1_responses.py:
//   TOKENRELAY_V1=http://127.0.0.1:PORT/v1 node responses.mjs
// Each check throws on a mismatch; the last line printed is a JSON summary.
import assert from "node:assert/strict";
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.TOKENRELAY_V1, apiKey: "unused", maxRetries: 0, timeout: 30_000 });
const input = 'Weather in "Zürich" ✓ today?';
const weather = {
  type: "function",
  name: "get_weather",
  parameters: { type: "object", properties: { city: { type: "string" }, days: { type: "integer" } } },
};
const summary = {};

// Streamed text, with usage on response.completed; the same text as the whole answer.
const stream = await client.responses.create({ model: "sim:ttft=0,tps=0,tokens=15", input, stream: true });
let text = "";
let pieces = 0;
let completed = null;
let seq = -1;
for await (const event of stream) {
  assert.equal(event.sequence_number, seq + 1);
  seq = event.sequence_number;
  if (event.type === "response.output_text.delta") {
    text += event.delta;
    pieces += 1;
  }
  if (event.type === "response.completed") completed = event.response;
}
const whole = await client.responses.create({ model: "sim:ttft=0,tps=0,tokens=15", input });
assert.equal(text, whole.output_text);
assert.equal(completed.output_text ?? completed.output[0].content[0].text, text);
summary.streamed = pieces;
summary.usage = completed.usage.output_tokens;

// A tool call: the stream helper accumulates the argument fragments.
const runner = client.responses.stream({ model: "sim:ttft=0,tps=0", input, tools: [weather] });
let fragments = 0;
runner.on("response.function_call_arguments.delta", () => { fragments += 1; });
const final = await runner.finalResponse();
const call = final.output.find((item) => item.type === "function_call");
assert.equal(call.name, "get_weather");
assert.deepEqual(JSON.parse(call.arguments), { city: 'Weather in "Zürich"', days: 3 });
summary.tool_fragments = fragments;

// A failure midway: the SDK throws while iterating.
const broken = await client.responses.create({
  model: "sim:ttft=0,tps=0,tokens=20,fault=error-mid", input, stream: true,
});
await assert.rejects(
  (async () => { for await (const event of broken) void event; })(),
  (err) => err instanceof OpenAI.APIError && /simulated upstream/.test(err.message),
);
summary.failure = "raised";

// Resume after a cut connection: exactly the events after the cursor.
const controller = new AbortController();
const background = await client.responses.create(
  { model: "sim:ttft=0,tps=60,tokens=40", input, stream: true, background: true },
  { signal: controller.signal },
);
const first = [];
try {
  for await (const event of background) {
    first.push(event);
    if (event.sequence_number === 5) controller.abort();
  }
} catch (err) {
  if (!(err instanceof OpenAI.APIUserAbortError) && err.name !== "AbortError") throw err;
}
const id = first[0].response.id;
const rest = [];
for await (const event of await client.responses.retrieve(id, { stream: true, starting_after: 5 })) rest.push(event);
assert.equal(rest[0].sequence_number, 6);
assert.equal(rest.at(-1).type, "response.completed");
const all = [];
for await (const event of await client.responses.retrieve(id, { stream: true })) all.push(event);
assert.deepEqual([...first.slice(0, 6), ...rest], all);
summary.resumed = "exact";

// Cancel a background response.
const slow = await client.responses.create({ model: "sim:ttft=0,tps=10,tokens=500", input, background: true });
const cancelled = await client.responses.cancel(slow.id);
assert.equal(cancelled.status, "cancelled");
summary.cancelled = (await client.responses.retrieve(slow.id)).status;

console.log(JSON.stringify(summary));
