-- The users of a room held by at least one live replica (unsorted), with the room's presence
-- version they are the set of, read in the same step.
--
-- KEYS[1] users hash (user -> replicas holding the user)   KEYS[2] holders hash (node -> count)
-- KEYS[3] the room's presence version
-- ARGV[1] the prefix of the room's per-node sets (it carries the room's hash tag, so the keys
-- built from it live in the same Cluster slot as KEYS)   ARGV[2..] the live nodes
--
-- Returns {version, users, hidden}: `hidden` are users still counted (their `leave` comes
-- when their replica is reaped) but held only by replicas whose lease ran out.
--
-- When every holder is live (the usual case) the answer is the users hash as it is. Otherwise
-- the members of the dead holders, whose reaping has not run yet, are subtracted from the
-- counts: the cost is the room's users plus the dead holders' members, never a scan per user.
local version = tonumber(redis.call('GET', KEYS[3]) or '0')
local live = {}
for i = 2, #ARGV do live[ARGV[i]] = true end
local dead = {}
for _, node in ipairs(redis.call('HKEYS', KEYS[2])) do
  if not live[node] then dead[#dead + 1] = node end
end
if #dead == 0 then return {version, redis.call('HKEYS', KEYS[1]), {}} end
local flat = redis.call('HGETALL', KEYS[1])
local count = {}
for i = 1, #flat, 2 do count[flat[i]] = tonumber(flat[i + 1]) end
for _, node in ipairs(dead) do
  for _, user in ipairs(redis.call('SMEMBERS', ARGV[1] .. node)) do
    if count[user] then count[user] = count[user] - 1 end
  end
end
local users, hidden = {}, {}
for user, n in pairs(count) do
  if n > 0 then users[#users + 1] = user else hidden[#hidden + 1] = user end
end
return {version, users, hidden}
