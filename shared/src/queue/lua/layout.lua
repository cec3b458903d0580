-- LAYOUT: KEYS[1] = the family's layout key (JSON). ARGV = mode, ...
--   'apply', count, revision: a newer revision with another count starts a new
--     epoch; the old (epoch, count) joins `draining`. Creates the layout if absent.
--   'retire', epoch: every queue is clean for `epoch`, so the draining layouts go.
--   'get': answers the layout ('' when none).
-- Answers the layout JSON.
local raw = redis.call('GET', KEYS[1])
local mode = ARGV[1]
if mode == 'get' then return raw or '' end
local L
if raw then L = cjson.decode(raw) end
if mode == 'apply' then
  local count, rev = tonumber(ARGV[2]), tonumber(ARGV[3])
  if not L then
    L = { epoch = 1, count = count, revision = rev, draining = {} }
  elseif rev > L.revision then
    if count ~= L.count then
      table.insert(L.draining, { L.epoch, L.count })
      L.epoch = L.epoch + 1
      L.count = count
    end
    L.revision = rev
  else
    return raw
  end
elseif mode == 'retire' then
  if not L or L.epoch ~= tonumber(ARGV[2]) then return raw or '' end
  L.draining = {}
else
  return redis.error_reply('unknown layout mode')
end
-- cjson encodes an empty table as an object; keep `draining` an array.
local d = {}
for _, e in ipairs(L.draining) do d[#d + 1] = '[' .. num(e[1]) .. ',' .. num(e[2]) .. ']' end
local out = '{"epoch":' .. num(L.epoch) .. ',"count":' .. num(L.count) .. ',"revision":'
  .. num(L.revision) .. ',"draining":[' .. table.concat(d, ',') .. ']}'
redis.call('SET', KEYS[1], out)
return out
