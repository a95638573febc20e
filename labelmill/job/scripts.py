"""The ledger's Lua scripts: each runs atomically inside Redis.

They are what makes counting idempotent (the done bitmap's previous bit
decides whether a batch counts) and the manifest claim exactly-once
(``HSETNX manifest_claim``). Job states are written ``$running`` and the like,
filled in from :class:`JobState`.
"""

from string import Template

from labelmill.job.model import JobState


def _states(lua: str) -> str:
    return Template(lua).substitute({s.value: s.value for s in JobState})


# Marks a batch finished (once), updates counters and reports whether the job
# just finished. KEYS: job, done, outstanding, dead. ARGV: batch, member,
# n_ok, n_err, dead(0/1), kinds-json, claim token, weights tag ('' if none).
# The token is unique to one delivery: when Redis dies after the script ran
# but before its reply arrived, the same delivery's retry learns that the
# claim is still its own, while another copy of the batch never does.
COMPLETE = _states(
    """
if ARGV[8] ~= '' then redis.call('HSETNX', KEYS[1], 'model_weights', ARGV[8]) end
local prev = redis.call('SETBIT', KEYS[2], ARGV[1], 1)
redis.call('ZREM', KEYS[3], ARGV[2])
if prev == 1 then
  if redis.call('HGET', KEYS[1], 'manifest_claim') == ARGV[7] then return {0, 1} end
  return {0, 0}
end
redis.call('HINCRBY', KEYS[1], 'batches_done', 1)
redis.call('HINCRBY', KEYS[1], 'images_ok', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'images_error', ARGV[4])
for kind, n in pairs(cjson.decode(ARGV[6])) do
  redis.call('HINCRBY', KEYS[1], 'err:' .. kind, n)
end
if ARGV[5] == '1' then
  redis.call('SADD', KEYS[4], ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'batches_dead', 1)
end
"""
    + """
local f = redis.call('HMGET', KEYS[1], 'state', 'enqueue_complete', 'batches_total', 'batches_done')
if f[1] == '$running' and f[2] == '1' and tonumber(f[3] or 0) == tonumber(f[4] or 0) then
  return {1, redis.call('HSETNX', KEYS[1], 'manifest_claim', ARGV[7])}
end
return {1, 0}
"""
)

# Ends enqueuing; returns 1 when the job is already complete and this caller
# owns the manifest. KEYS: job. ARGV: batches_total, fields-json.
FINISH_ENQUEUE = _states("""
if redis.call('HGET', KEYS[1], 'state') == '$cancelled' then return 0 end
for k, v in pairs(cjson.decode(ARGV[2])) do redis.call('HSET', KEYS[1], k, v) end
redis.call('HSET', KEYS[1], 'enqueue_complete', 1, 'batches_total', ARGV[1])
if redis.call('HGET', KEYS[1], 'state') == '$enqueuing' then
  redis.call('HSET', KEYS[1], 'state', '$running')
end
local f = redis.call('HMGET', KEYS[1], 'state', 'batches_total', 'batches_done')
if f[1] == '$running' and tonumber(f[2] or 0) == tonumber(f[3] or 0) then
  return redis.call('HSETNX', KEYS[1], 'manifest_claim', 1)
end
return 0
""")

# Reopens a dead batch for `retry`: undoes its counts exactly once.
# KEYS: job, done, outstanding, dead, attempts. ARGV: batch, member, n_images, now.
REOPEN_DEAD = _states("""
if redis.call('SREM', KEYS[4], ARGV[1]) == 0 then return 0 end
redis.call('SETBIT', KEYS[2], ARGV[1], 0)
redis.call('HINCRBY', KEYS[1], 'batches_done', -1)
redis.call('HINCRBY', KEYS[1], 'batches_dead', -1)
redis.call('HINCRBY', KEYS[1], 'images_error', -tonumber(ARGV[3]))
redis.call('HINCRBY', KEYS[1], 'err:dead', -tonumber(ARGV[3]))
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('HDEL', KEYS[1], 'manifest_claim')
if redis.call('HGET', KEYS[1], 'state') == '$done' then
  redis.call('HSET', KEYS[1], 'state', '$running')
end
return 1
""")
