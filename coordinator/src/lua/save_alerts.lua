-- SAVE_ALERTS: saves the alert evaluator's state, only for the newest leader.
--   KEYS[1]  fence   STRING the newest fencing token installed
--   KEYS[2]  alerts  STRING the evaluator's state (JSON: what fires, the notices
--                           not yet delivered, the run-event cursor)
-- ARGV = the saving leader's fence, the state. Answers 1 saved, 0 refused (a newer
-- leader installed its token: a deposed leader never overwrites its successor's
-- state, so no notice is sent twice or forgotten because of it).
if tonumber(redis.call('GET', KEYS[1]) or '0') ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1
