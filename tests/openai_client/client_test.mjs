// The official `openai` npm client against kvrelay's OpenAI HTTP API. Prints one JSON
// object: the text of each call, for the C++ test to compare with the gRPC path.
//   node client_test.mjs BASE_URL PROMPT_TEXT
import OpenAI from "openai";

const [baseURL, prompt] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
const common = { model: "", max_tokens: 12, temperature: 0, ignore_eos: true };
const messages = [{ role: "user", content: prompt }];
const out = {};

const c = await client.completions.create({ ...common, prompt });
out.completion = c.choices[0].text;
out.completion_usage = c.usage;
out.completion_finish = c.choices[0].finish_reason;

let s = await client.completions.create({ ...common, prompt, stream: true });
out.completion_stream = "";
for await (const chunk of s) out.completion_stream += chunk.choices[0]?.text ?? "";

const chat = await client.chat.completions.create({ ...common, messages });
out.chat = chat.choices[0].message.content;
out.chat_role = chat.choices[0].message.role;

s = await client.chat.completions.create({
  ...common, messages, stream: true, stream_options: { include_usage: true } });
out.chat_stream = "";
for await (const chunk of s) {
  out.chat_stream += chunk.choices[0]?.delta?.content ?? "";
  if (chunk.usage) out.chat_stream_usage = chunk.usage;
}

// Errors come back as the client's typed errors.
try {
  await client.completions.create({ ...common, prompt, n: 2 });
} catch (e) {
  out.error_status = e.status;
  out.error_param = e.param;
}

// A stream abandoned after its first chunk (the request must be cancelled server-side).
s = await client.completions.create({ ...common, prompt, max_tokens: 480, stream: true });
for await (const chunk of s) {
  out.aborted_first = chunk.choices[0]?.text ?? "";
  s.controller.abort();
  break;
}
console.log(JSON.stringify(out));
