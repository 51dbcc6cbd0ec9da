-- Reads a room's head and part of its history in one consistent snapshot, creating the
-- room's epoch if it has none (so every replica agrees on it).
--
-- A room created here has no message yet: it lives `empty ttl` unless somebody is in it (the
-- presence scripts extend it on a join and shorten it again when the last one leaves), so a
-- client that opens thousands of rooms leaves nothing behind for long.
--
-- KEYS[1] meta hash   KEYS[2] history stream   KEYS[3] presence users hash
-- ARGV[1] 'since' | 'before' | 'head'   ARGV[2] offset (since: after it; before: below it, 0 = none)
-- ARGV[3] limit (before: how many; since: at most how many, 0 = all)   ARGV[4] epoch to use if none
-- ('' when PostgreSQL archives the rooms: a room without meta is answered {'seed'} instead of
-- given a new epoch, see publish.lua)   ARGV[5] ttl secs   ARGV[6] empty room ttl secs
-- Returns {epoch, offset, entries, base} with entries as XRANGE gives them, oldest first, and
-- base the offset a renewed epoch continues after (0 for an epoch that started empty): a
-- 'since' read never returns entries up to it, which belong to the epoch before.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch and ARGV[4] == '' then
  return {'seed'}
end
if not epoch then
  epoch = ARGV[4]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  if redis.call('EXISTS', KEYS[3]) == 1 then
    redis.call('EXPIRE', KEYS[1], ARGV[5])
  else
    redis.call('EXPIRE', KEYS[1], ARGV[6])
  end
end
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset'))
local base = redis.call('HGET', KEYS[1], 'base') or '0'
-- ARGV[2] is a decimal string and is used as one: Lua numbers print 1e14 as '1e+14', which is
-- no stream id.
local entries = {}
if ARGV[1] == 'since' then
  local since = ARGV[2]
  if tonumber(base) > tonumber(since) then since = base end
  -- Paged: a resume from far back never reads a whole history into one reply.
  if ARGV[3] ~= '0' then
    entries = redis.call('XRANGE', KEYS[2], '(' .. since .. '-0', '+', 'COUNT', ARGV[3])
  else
    entries = redis.call('XRANGE', KEYS[2], '(' .. since .. '-0', '+')
  end
elseif ARGV[1] == 'before' then
  local stop = '+'
  if ARGV[2] ~= '0' then stop = '(' .. ARGV[2] .. '-0' end
  local newest_first = redis.call('XREVRANGE', KEYS[2], stop, '-', 'COUNT', ARGV[3])
  for i = #newest_first, 1, -1 do
    entries[#entries + 1] = newest_first[i]
  end
end
return {epoch, offset, entries, tonumber(base)}
