-- RELEASE: ARGV = lease_token. Deletes the lease only if it is still ours.
if redis.call('GET', K_LEASE) == ARGV[1] then return redis.call('DEL', K_LEASE) end
return 0
