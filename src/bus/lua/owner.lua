-- Which process runs under a node id: each holds the owner key with its random instance
-- token, renewed with the lease, so two processes given one `server.node_id` see each other.
--
-- KEYS[1] owner key   ARGV[1] 'hold' | 'release'   ARGV[2] token   ARGV[3] lease, ms
-- hold:    takes or renews the key when it is free or already ours; returns 1, else 0.
-- release: deletes the key if it is ours (a clean shutdown frees the id at once); returns 1.
local current = redis.call('GET', KEYS[1])
if ARGV[1] == 'release' then
  if current == ARGV[2] then redis.call('DEL', KEYS[1]) end
  return 1
end
if current and current ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
