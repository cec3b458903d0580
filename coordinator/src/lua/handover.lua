-- HANDOVER: a leader that stopped (engine stopped, every run saved) leaves a note
-- for its successor, if its token is still the newest.
--   KEYS[1]  fence     STRING the newest fencing token installed
--   KEYS[2]  handover  STRING the note (see FENCE), kept a day at most
-- ARGV = fence, unsent run ids (JSON). Answers 1 left, 0 refused (a newer leader).
if tonumber(redis.call('GET', KEYS[1]) or '0') ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], ARGV[1] .. '\n' .. ARGV[2], 'EX', 86400)
return 1
