-- FENCE: installs a leader's fencing token unless a newer one is there.
--   KEYS[1]  fence   STRING the newest fencing token installed
-- ARGV = fence. Answers 1 installed, 0 refused (stale).
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) < cur then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
