-- GET: ARGV = id. Answers {body, att, pending score, in-flight deadline, dead since,
-- last error, cancelled-in-flight flag} as one consistent snapshot.
local id = ARGV[1]
local att = redis.call('HGET', K_ATT, id)
local _, s = att_of(att)
local deadline = false
if s then deadline = redis.call('ZSCORE', K_RUN, id .. '\1' .. s) end
return {
  redis.call('HGET', K_ITEMS, id),
  att,
  redis.call('ZSCORE', K_DUE, id),
  deadline,
  redis.call('ZSCORE', K_DEAD, id),
  redis.call('HGET', K_ERR, id),
  redis.call('SISMEMBER', K_CX, id),
}
