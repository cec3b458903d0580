-- GET: ARGV = id. Answers {meta, body, pending score, deadline, dead since, last
-- error, cancelled-in-flight flag} as one consistent snapshot.
local id = ARGV[1]
return {
  redis.call('HGET', K_META, id),
  redis.call('HGET', K_ITEMS, id),
  redis.call('ZSCORE', K_DUE, id),
  redis.call('ZSCORE', K_RUN, id),
  redis.call('ZSCORE', K_DEAD, id),
  redis.call('HGET', K_ERR, id),
  redis.call('SISMEMBER', K_CX, id),
}
