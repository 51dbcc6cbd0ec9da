-- Sets a room's meta from the archive (docs/design.md, "The archive") when Redis lost it
-- (restarted empty, or the room idled out): the room keeps its epoch and offsets, and its
-- archived mark is where the archive ends, so nothing is copied twice or skipped. Only if the
-- meta is still missing: another replica may have seeded it, or a publish created it, meanwhile.
-- A stream left without its meta is another epoch's remains and is dropped, as publish.lua does.
--
-- KEYS[1] meta hash   KEYS[2] history stream
-- ARGV[1] epoch   ARGV[2] offset   ARGV[3] base   ARGV[4] ttl secs
-- Returns 1 if this call set the meta, else 0.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'offset', ARGV[2], 'base', ARGV[3],
  'aepoch', ARGV[1], 'archived', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
