-- Moves a room's archived mark after a copy committed in PostgreSQL (see archive.lua): only if
-- the caller still holds the room's archiver lease and the room is still on the epoch it
-- copied, and never backwards. A lease lost meanwhile (a pause longer than the lease) leaves
-- the mark to the new holder, which copies again from it: the copy is idempotent.
--
-- KEYS[1] meta hash   KEYS[2] archiver lease
-- ARGV[1] token   ARGV[2] epoch copied   ARGV[3] newest offset copied (decimal string)
-- Returns how many messages remain after the mark (the lease is let go at 0), or -1 when the
-- mark was not moved.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'offset', 'aepoch', 'archived')
if meta[1] ~= ARGV[2] then return -1 end
local mark = tonumber(ARGV[3])
if meta[3] == ARGV[2] and tonumber(meta[4] or '0') >= mark then
  mark = tonumber(meta[4])
else
  redis.call('HSET', KEYS[1], 'aepoch', ARGV[2], 'archived', ARGV[3])
end
local rest = tonumber(meta[2]) - mark
if rest <= 0 then redis.call('DEL', KEYS[2]) end
return rest
