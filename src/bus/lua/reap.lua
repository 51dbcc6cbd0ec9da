-- Removes a dead replica's members from one room's presence.
--
-- KEYS[1] presence hash, fields "<node>\t<user>"   ARGV[1] the dead node
-- Returns the users who are now gone from the room (no other replica holds them).
local prefix = ARGV[1] .. '\t'
local removed = {}
local fields = redis.call('HKEYS', KEYS[1])
for _, field in ipairs(fields) do
  if string.sub(field, 1, #prefix) == prefix then
    redis.call('HDEL', KEYS[1], field)
    removed[#removed + 1] = string.sub(field, #prefix + 1)
  end
end
local gone = {}
for _, user in ipairs(removed) do
  local suffix = '\t' .. user
  local still = false
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(field, -#suffix) == suffix then still = true break end
  end
  if not still then gone[#gone + 1] = user end
end
return gone
