-- MV_UNMARK: ARGV = move token. Drops the import tombstone once the source has
-- forgotten the moved items, and any tombstone older than a day.
redis.call('ZREM', K_IMPORTED, ARGV[1])
redis.call('ZREMRANGEBYSCORE', K_IMPORTED, '-inf', num(now_ms() - 86400000))
return 1
