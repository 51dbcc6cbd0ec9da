-- Replica leases on Redis's clock (TIME), so the replicas' own clocks need not agree.
--
-- KEYS[1] nodes sorted set (node -> lease expiry, ms)
-- ARGV[1] 'renew' | 'live'   ARGV[2] node   ARGV[3] lease, ms
-- renew: extends ARGV[2]'s lease and returns the nodes whose lease ran out.
-- live:  returns the nodes whose lease has not run out.
-- Before Redis 5 a script may not write after TIME unless it replicates effects.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] == 'renew' then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
end
return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
