-- SAVE_RUN: creates or replaces a run and trims its job's history.
--   KEYS[1]  run:<run id>  STRING the run's JSON (EX run ttl)
--   KEYS[2]  runs:<job>    ZSET   the job's run ids, score = fired at (ms)
--   KEYS[3]  runs          ZSET   every run id, score = fired at (ms)
--   KEYS[4]  active        ZSET   run ids not final yet
--   KEYS[5]  events        STREAM runs that ended badly (failed, timed out, skipped),
--                                 read by the leader's alert evaluator
-- ARGV = run id, json, fired at, ttl_s, keep per job, final (0/1), the run's event
-- (JSON; empty: none), the most events kept (about).
-- Answers the run ids trimmed from the job's history (beyond `keep`): the caller
-- deletes their `run:<id>` keys (a key is never built inside a script; one left
-- behind expires with its TTL).
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
if ARGV[6] == '1' then
  redis.call('ZREM', KEYS[4], ARGV[1])
  -- In the same script as the final save: an alert can be late, never lost.
  if ARGV[7] ~= '' then
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[8], '*', 'e', ARGV[7])
  end
else
  redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
end
local keep = tonumber(ARGV[5])
local n = redis.call('ZCARD', KEYS[2])
local old = {}
if n > keep then
  old = redis.call('ZRANGE', KEYS[2], 0, n - keep - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, n - keep - 1)
  for _, id in ipairs(old) do redis.call('ZREM', KEYS[3], id) end
end
local oldest = tonumber(ARGV[3]) - tonumber(ARGV[4]) * 1000
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', oldest)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', oldest)
return old
