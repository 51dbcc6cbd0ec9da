-- A clean shutdown gives up an archiver lease (see archive.lua): deletes it only if it still holds
-- the caller's token, so a lease that ran out and was taken by another replica is left alone.
--
-- KEYS[1] archiver lease   ARGV[1] token
-- Returns 1 if the lease was this token's and is gone, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
