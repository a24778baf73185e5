-- wrk script for `just bench`: POST /v1/chat/completions with a ~200-byte OpenAI request body.
--
--   BENCH_STREAM=1  streaming request ("stream": true) WITH "stream_options": {"include_usage": true},
--                   so llm-meter has nothing to inject (inject_stream_usage would otherwise rewrite
--                   the request and cut the usage chunk from the stream: extra work the other
--                   setups do not do). Default: a non-streaming request.
--   BENCH_KEYS=N    rotate N distinct x-api-key values (default 8): the rate-limit rules of setup
--                   (c) key on it, so each key gets its own buckets.
--   BENCH_AUTH=KEY  the bearer token in `authorization` (scripts/bench.py sets LiteLLM's master key).
--
-- Every setup gets exactly the same requests (same bytes, same headers).

local stream = os.getenv("BENCH_STREAM") == "1"
local nkeys = tonumber(os.getenv("BENCH_KEYS") or "8")
-- Sent to every setup as OpenAI clients do; LiteLLM's proxy checks it (its master key).
local auth = os.getenv("BENCH_AUTH") or "sk-bench"

local body
if stream then
  body = '{"model":"gpt-4o","messages":[{"role":"system","content":"You are a helpful assistant."},'
    .. '{"role":"user","content":"Summarize Hamlet in two sentences."}],'
    .. '"stream":true,"stream_options":{"include_usage":true},"max_tokens":256}'
else
  body = '{"model":"gpt-4o","messages":[{"role":"system","content":"You are a helpful assistant."},'
    .. '{"role":"user","content":"Summarize the plot of Hamlet in two sentences, please."}],'
    .. '"max_tokens":256,"temperature":0.7}'
end

-- Pre-format one request per key; request() only picks the next one.
local requests = {}
for i = 1, nkeys do
  requests[i] = wrk.format("POST", nil, {
    ["Host"] = wrk.host .. ":" .. wrk.port,
    ["content-type"] = "application/json",
    ["x-api-key"] = string.format("sk-bench-%04d", i),
    ["x-app-id"] = "bench",
    ["authorization"] = "Bearer " .. auth,
  }, body)
end

local n = 0
function request()
  n = n + 1
  return requests[(n % nkeys) + 1]
end
