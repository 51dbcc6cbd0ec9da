-- Sets a room's meta from the archive (docs/design.md, "The archive") when Redis lost it
-- (restarted empty, or the room idled out): the room keeps its epoch and offsets, and its
-- archived mark is where the archive ends, so nothing is copied twice or skipped. Only if the
-- meta is still missing: another replica may have seeded it, or a publish created it, meanwhile.
-- A stream left without its meta is another epoch's remains and is dropped, as publish.lua does.
--
-- The archive's row may say Redis had handed out more of the epoch than it copied (its seen
-- head above its head): the caller then passes a new epoch that starts after the seen head, so
-- no offset a client may have seen is handed out again (docs/design.md, "The archive").
--
-- KEYS[1] meta hash   KEYS[2] history stream
-- ARGV[1] epoch   ARGV[2] offset   ARGV[3] base   ARGV[4] ttl secs   ARGV[5] the row's claim
-- time (ms): the archive's claims of this room never stamp an older one (`tfloor`, archive.lua)
-- Returns 1 if this call set the meta, else 0.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'offset', ARGV[2], 'base', ARGV[3],
  'aepoch', ARGV[1], 'archived', ARGV[2], 'tfloor', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
