// tokenrelay's /v1 through the official openai Node SDK. Run by tests/test_v1_node.py:
//   TOKENRELAY_V1=http://127.0.0.1:PORT/v1 node v1.mjs
// Each check throws on a mismatch; the last line printed is a JSON summary.
import assert from "node:assert/strict";
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.TOKENRELAY_V1, apiKey: "unused", maxRetries: 0, timeout: 30_000 });
const messages = [{ role: "user", content: 'Weather in "Zürich" ✓ today?' }];
const weather = {
  type: "function",
  function: {
    name: "get_weather",
    parameters: { type: "object", properties: { city: { type: "string" }, days: { type: "integer" } } },
  },
};
const summary = {};

// Non-streaming.
const whole = await client.chat.completions.create({ model: "sim:echo,ttft=0,tps=0", messages });
assert.equal(whole.choices[0].message.content, messages[0].content);
assert.equal(whole.choices[0].finish_reason, "stop");
summary.whole = whole.usage.completion_tokens;

// Streaming, with usage.
const stream = await client.chat.completions.create({
  model: "sim:ttft=0,tps=0,tokens=25", messages, stream: true, stream_options: { include_usage: true },
});
let text = "";
let usage = null;
let pieces = 0;
for await (const chunk of stream) {
  if (chunk.choices.length && chunk.choices[0].delta.content) {
    text += chunk.choices[0].delta.content;
    pieces += 1;
  }
  if (chunk.usage) usage = chunk.usage;
}
const same = await client.chat.completions.create({ model: "sim:ttft=0,tps=0,tokens=25", messages });
assert.equal(text, same.choices[0].message.content);
assert.equal(pieces, 25);
assert.equal(usage.completion_tokens, 25);
summary.streamed = pieces;

// Tool calls: the stream helper accumulates the argument fragments.
const runner = client.chat.completions.stream({ model: "sim:ttft=0,tps=0", messages, tools: [weather] });
let fragments = 0;
runner.on("chunk", (chunk) => { if (chunk.choices[0]?.delta?.tool_calls) fragments += 1; });
const final = await runner.finalChatCompletion();
const call = final.choices[0].message.tool_calls[0];
assert.equal(final.choices[0].finish_reason, "tool_calls");
assert.equal(call.function.name, "get_weather");
assert.deepEqual(JSON.parse(call.function.arguments), { city: 'Weather in "Zürich"', days: 3 });
assert.ok(fragments > 3, `arguments in ${fragments} fragments`);
summary.tool_fragments = fragments;

// Errors before the first byte are the SDK's status errors.
await assert.rejects(
  client.chat.completions.create({ model: "sim:fault=http-429", messages, stream: true }),
  (err) => err instanceof OpenAI.RateLimitError && err.status === 429,
);
await assert.rejects(
  client.chat.completions.create({ model: "sim", messages: [] }),
  (err) => err instanceof OpenAI.BadRequestError && err.param === "messages",
);
// After it, an error event: the SDK throws while iterating.
const broken = await client.chat.completions.create({
  model: "sim:ttft=0,tps=0,tokens=20,fault=error-mid", messages, stream: true,
});
let before = 0;
await assert.rejects(
  (async () => { for await (const chunk of broken) if (chunk.choices[0]?.delta?.content) before += 1; })(),
  (err) => err instanceof OpenAI.APIError && !(err.status) && /simulated upstream/.test(err.message),
);
assert.equal(before, 10);
summary.errors = "ok";

// What is routable.
const models = [];
for await (const model of client.models.list()) models.push(model.id);
assert.ok(models.includes("sim"), models.join(","));
summary.models = models.length;

console.log(JSON.stringify(summary));
