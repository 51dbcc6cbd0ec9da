-- An archiver's claim and read of one room (docs/design.md, "The archive"): takes or renews the
-- room's archiver lease unless another replica holds it, and reads the messages after the room's
-- archived mark, in one snapshot. The mark lives in the room's meta hash (`aepoch`, `archived`:
-- the epoch it counts in and the newest offset known to be in PostgreSQL), so it is in the room's
-- hash slot and vanishes with the room. A mark of another epoch (a new or renewed one) counts as
-- the epoch's `base`: its own messages start after it.
--
-- KEYS[1] meta hash   KEYS[2] history stream   KEYS[3] archiver lease (string: holder's token)
-- ARGV[1] token   ARGV[2] lease ms   ARGV[3] most entries to read
-- Returns {'busy', lease ms left} | {'gone'} (no room) | {'done', epoch, offset, archived, base}
-- (nothing to copy; the lease is let go) | {'copy', epoch, offset, archived, base, entries, ms}.
-- `ms` is Redis's clock at the claim (the room's slot: one clock per room also on a Cluster),
-- never below the meta's `tfloor` (the claim time of the row it was seeded from, in case this
-- Redis's clock is behind the lost one's): it orders epochs in the archive's `rooms` row.
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[1] then
  return {'busy', redis.call('PTTL', KEYS[3])}
end
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'offset', 'base', 'aepoch', 'archived', 'tfloor')
local epoch = meta[1]
if not epoch then
  if holder then redis.call('DEL', KEYS[3]) end
  return {'gone'}
end
local offset = tonumber(meta[2] or '0')
local base = tonumber(meta[3] or '0')
local archived = base
if meta[4] == epoch then archived = math.max(tonumber(meta[5] or '0'), base) end
if archived >= offset then
  if holder then redis.call('DEL', KEYS[3]) end
  return {'done', epoch, offset, archived, base}
end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
-- Printed with %d: a Lua number concatenated as it is turns 1e14 into '1e+14'.
local from = '(' .. string.format('%d', archived) .. '-0'
local entries = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', ARGV[3])
local now = redis.call('TIME')
local ms = math.max(tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000),
  tonumber(meta[6] or '0'))
return {'copy', epoch, offset, archived, base, entries, ms}
