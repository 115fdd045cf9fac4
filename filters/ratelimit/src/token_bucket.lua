-- wasmgate ratelimit, backend: redis. One run per request: the token buckets of every limit
-- that applies (KEYS[i]; ARGV[2i-1] tokens per second, ARGV[2i] burst) are refilled from the
-- time since their last update, then a token is taken from each only if each has one (all or
-- nothing). Redis's clock is the only clock, so gateways with skewed clocks agree. A bucket
-- expires once it would be full again: an absent bucket reads as full, so expiry loses nothing.
-- Reply: {1 admitted | 0 denied, tokens of KEYS[1] after this request, ...} (numbers as text).
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local tokens = {}
local admitted = 1
for i = 1, #KEYS do
  local rate, burst = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local b = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tk, ts = tonumber(b[1]), tonumber(b[2])
  if tk == nil or ts == nil then
    tk = burst
  elseif now > ts then
    tk = math.min(burst, tk + (now - ts) * rate / 1000000)
  end
  tokens[i] = tk
  if tk < 1 then admitted = 0 end
end
local out = {admitted}
for i = 1, #KEYS do
  local tk = tokens[i]
  if admitted == 1 then
    local rate, burst = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
    tk = tk - 1
    redis.call('HSET', KEYS[i], 'tokens', string.format('%.17g', tk), 'ts', string.format('%.0f', now))
    redis.call('PEXPIRE', KEYS[i], math.ceil((burst - tk) * 1000 / rate) + 1000)
  end
  out[i + 1] = string.format('%.17g', tk)
end
return out
