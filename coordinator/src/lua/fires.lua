-- FIRES: records a batch of fires under the leader's fencing token.
--   KEYS[1]  fence   STRING the newest fencing token installed
--   KEYS[2]  last    HASH   job -> instant of its newest recorded fire
--   KEYS[3]  runs    ZSET   every run id, score = fired at (ms)
--   KEYS[4]  active  ZSET   run ids not final yet, score = fired at (ms)
--   KEYS[5..] three per fire, in ARGV's order:
--     memory        STRING remembers the fire (SET NX: a second record is refused):
--                          `fired:<fire id>`, or, for a fire whose run id is its
--                          fire id (a schedule's tick), `run:<run id>` itself
--     run:<run id>  STRING the run's JSON
--     runs:<job>    ZSET   the job's run ids, score = fired at (ms)
-- ARGV = fence, fire ttl_s, run ttl_s, then per fire: job, instant, run id, fired at,
-- run json, final (0/1), own (1: the run's key is the fire's memory).
-- Answers per fire 1 recorded, 0 duplicate, or {-1} when the fence is stale.
-- Every key shares one hash tag (one Cluster slot).
--
-- Why a tick needs no key of its own: a tick is fired again only if it is newer
-- than its job's newest recorded instant (`last`), so its run's key, kept for the
-- run's retention, remembers it as long as a second record could come; one key
-- and one command less per tick (at 10,000 ticks a second, 2.6 billion fewer keys
-- over the three days a `fired:` key is kept).
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) < cur then return { -1 } end
local out = {}
local k = 5
for i = 4, #ARGV, 7 do
  local k_memory, k_run, k_jobruns = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  k = k + 3
  local ok
  if ARGV[i + 6] == '1' then
    ok = redis.call('SET', k_run, ARGV[i + 4], 'NX', 'EX', ARGV[3])
  else
    ok = redis.call('SET', k_memory, '1', 'NX', 'EX', ARGV[2])
    if ok then redis.call('SET', k_run, ARGV[i + 4], 'EX', ARGV[3]) end
  end
  if ok then
    out[#out + 1] = 1
    local job, at, run, fired_at = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local last = tonumber(redis.call('HGET', KEYS[2], job) or '0')
    if tonumber(at) > last then redis.call('HSET', KEYS[2], job, at) end
    redis.call('ZADD', k_jobruns, fired_at, run)
    redis.call('ZADD', KEYS[3], fired_at, run)
    if ARGV[i + 5] == '0' then redis.call('ZADD', KEYS[4], fired_at, run) end
  else
    out[#out + 1] = 0
  end
end
return out
