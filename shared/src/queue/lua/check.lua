-- CHECK: ARGV = layout epoch, then ids. A producer with a newer layout asks an old
-- home of its items whether they exist here (in any state, moving included), and
-- seals the queue so producers with the old layout can no longer add any.
-- Answers per id 1 (exists) or 0, or {'STALE', epoch}.
local newer = seal(ARGV[1])
if newer then return { 'STALE', newer } end
local res = {}
for i = 2, #ARGV do res[i - 1] = redis.call('HEXISTS', K_ITEMS, ARGV[i]) end
return res
