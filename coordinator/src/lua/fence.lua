-- FENCE: installs a leader's fencing token unless a newer one is there, and takes
-- the hand-over note the previous leader left, if it left one.
--   KEYS[1]  fence     STRING the newest fencing token installed
--   KEYS[2]  handover  STRING "<fence>\n<unsent run ids, JSON>": the leader with that
--                             token stopped and saved every run it left (HANDOVER)
-- ARGV = fence. Answers {0, nil} refused (stale); {1, nil} installed over a leader that left
-- no note (it crashed or lost its lease: its runs need the adoption grace); or
-- {1, unsent} installed over the leader that handed over, with the ids of the runs
-- it recorded ahead of their instant and never sent. The note is consumed, and it
-- names the token it follows, so it is never taken for a later leader's. (Without an
-- election every process has token 1: a restart follows its own previous life.)
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) < cur then return { 0, false } end
redis.call('SET', KEYS[1], ARGV[1])
local note = redis.call('GET', KEYS[2])
redis.call('DEL', KEYS[2])
if note then
  local from, unsent = string.match(note, '^(%d+)\n(.*)$')
  if from and tonumber(from) == cur then
    return { 1, unsent }
  end
end
return { 1, false }
