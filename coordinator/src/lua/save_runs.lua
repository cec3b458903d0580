-- SAVE_RUNS: creates or replaces runs, in ARGV's order, and trims their jobs' history.
--   KEYS[1]  runs    ZSET   every run id, score = fired at (ms)
--   KEYS[2]  active  ZSET   run ids not final yet
--   KEYS[3]  events  STREAM runs that ended badly (failed, timed out, skipped),
--                           read by the leader's alert evaluator
--   KEYS[4..] two per run, in ARGV's order:
--     run:<run id>  STRING the run's JSON (EX run ttl)
--     runs:<job>    ZSET   the job's run ids, score = fired at (ms)
-- ARGV = ttl_s, keep per job, the most events kept (about), then per run: run id,
-- json, fired at, final (0/1), the run's event (JSON; empty: none).
-- Answers the run ids trimmed from their job's history (beyond `keep`): the caller
-- deletes their `run:<id>` keys (a key is never built inside a script; one left
-- behind expires with its TTL).
-- Every key shares one hash tag (one Cluster slot). One call saves a whole batch of
-- the history writer: the per-call cost (a round trip, the script's set-up) is paid
-- once per batch instead of once per run.
local ttl_ms = tonumber(ARGV[1]) * 1000
local keep = tonumber(ARGV[2])
local old = {}
local newest = nil
local k = 4
for i = 4, #ARGV, 5 do
  local k_run, k_jobruns = KEYS[k], KEYS[k + 1]
  k = k + 2
  local id, fired = ARGV[i], ARGV[i + 2]
  redis.call('SET', k_run, ARGV[i + 1], 'EX', ARGV[1])
  redis.call('ZADD', k_jobruns, fired, id)
  redis.call('ZADD', KEYS[1], fired, id)
  if ARGV[i + 3] == '1' then
    redis.call('ZREM', KEYS[2], id)
    -- In the same script as the final save: an alert can be late, never lost.
    if ARGV[i + 4] ~= '' then
      redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[i + 4])
    end
  else
    redis.call('ZADD', KEYS[2], fired, id)
  end
  local n = redis.call('ZCARD', k_jobruns)
  if n > keep then
    local gone = redis.call('ZRANGE', k_jobruns, 0, n - keep - 1)
    redis.call('ZREMRANGEBYRANK', k_jobruns, 0, n - keep - 1)
    for _, g in ipairs(gone) do
      redis.call('ZREM', KEYS[1], g)
      old[#old + 1] = g
    end
  end
  local f = tonumber(fired)
  redis.call('ZREMRANGEBYSCORE', k_jobruns, '-inf', f - ttl_ms)
  if newest == nil or f > newest then newest = f end
end
-- Once for the batch: what is older than the newest run's horizon is older than
-- every run's in it.
if newest ~= nil then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', newest - ttl_ms)
end
return old
