-- Raises a room whose Redis copy went back (a restored snapshot, a failover to a lagging
-- replica) to the archive's head (docs/design.md, "The archive"): the meta is there, in the
-- epoch PostgreSQL has, but at a lower offset, and the publish script would hand offsets out
-- again that the archive already holds for other messages. Only if the room is still on that
-- epoch and still lower (another replica may have raised it, or a renewal moved it on). The
-- archived mark moves to the head too (everything up to it is in PostgreSQL). The stream's
-- entries are all at or below the old offset, so archived: it is dropped, so that history and
-- resume read the raised part from PostgreSQL rather than take the stream for the whole epoch
-- (the stream would start at the epoch's start and hide the missing stretch).
--
-- KEYS[1] meta hash   KEYS[2] history stream
-- ARGV[1] epoch   ARGV[2] the archive's head (decimal string)
-- Returns {1, offset before} if this call raised the meta, else {0, offset now}.
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'offset')
local offset = tonumber(meta[2] or '0')
if meta[1] ~= ARGV[1] or offset >= tonumber(ARGV[2]) then
  return {0, offset}
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'offset', ARGV[2], 'aepoch', ARGV[1], 'archived', ARGV[2])
return {1, offset}
