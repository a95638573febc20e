"""The ledger's Lua scripts: each runs atomically inside Redis.

They are what makes counting idempotent (the done bitmap's previous bit
decides whether a batch counts) and the manifest claim a lease: the caller
that completes a job holds it for ``lease`` seconds (``manifest_claim``,
``manifest_until``), and another may take it over only once it has lapsed
(its holder died or gave up). The job's ``finished_at`` is set once, at the
first claim, so every writer of the manifest writes the same bytes. Times
are Redis's own (``TIME``): no caller's clock is trusted. Job states are
written ``$running`` and the like, filled in from :class:`JobState`.
"""

from string import Template

from labelmill.job.model import JobState


def _states(lua: str) -> str:
    return Template(lua).substitute({s.value: s.value for s in JobState})


# Claims the manifest of the job at KEYS[1] for `token` for `lease` seconds,
# when the job is complete and nobody else holds a live claim; the job is
# then listed in KEYS[2] (closing jobs, scored by when the claim lapses).
_CLAIM = _states("""
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local function complete(job)
  local f = redis.call('HMGET', job, 'state', 'enqueue_complete', 'batches_total', 'batches_done')
  return f[1] == '$running' and f[2] == '1' and tonumber(f[3] or 0) == tonumber(f[4] or 0)
end
local function claim(job, closing, job_id, token, lease)
  local t = now()
  local holder = redis.call('HGET', job, 'manifest_claim')
  local til = tonumber(redis.call('HGET', job, 'manifest_until') or 0)
  if holder and holder ~= token and til > t then return 0 end
  redis.call('HSET', job, 'manifest_claim', token, 'manifest_until', t + lease)
  redis.call('HSETNX', job, 'finished_at', t)
  redis.call('ZADD', closing, t + lease, job_id)
  return 1
end
""")


# Marks a batch finished (once), updates counters and reports whether the job
# just finished. KEYS: job, done, outstanding, dead, closing. ARGV: batch,
# member, n_ok, n_err, dead(0/1), kinds-json, claim token, weights tag ('' if
# none), job id, lease seconds.
# The token is unique to one delivery: when Redis dies after the script ran
# but before its reply arrived, the same delivery's retry learns that the
# claim is still its own, while another copy of the batch never does.
COMPLETE = _CLAIM + _states(
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
if complete(KEYS[1]) then
  return {1, claim(KEYS[1], KEYS[5], ARGV[9], ARGV[7], tonumber(ARGV[10]))}
end
return {1, 0}
"""
)

# Ends enqueuing; returns 1 when the job is already complete and this caller
# owns the manifest. KEYS: job, closing. ARGV: batches_total, fields-json,
# claim token, job id, lease seconds.
FINISH_ENQUEUE = _CLAIM + _states("""
if redis.call('HGET', KEYS[1], 'state') == '$cancelled' then return 0 end
for k, v in pairs(cjson.decode(ARGV[2])) do redis.call('HSET', KEYS[1], k, v) end
redis.call('HSET', KEYS[1], 'enqueue_complete', 1, 'batches_total', ARGV[1])
if redis.call('HGET', KEYS[1], 'state') == '$enqueuing' then
  redis.call('HSET', KEYS[1], 'state', '$running')
end
if complete(KEYS[1]) then return claim(KEYS[1], KEYS[2], ARGV[4], ARGV[3], tonumber(ARGV[5])) end
return 0
""")

# Takes over the manifest of a complete job whose claim lapsed (or that none
# made); a job no longer complete (cancelled, expired) leaves the closing
# set. KEYS: job, closing. ARGV: token, job id, lease seconds.
TAKE_OVER = _CLAIM + _states("""
if complete(KEYS[1]) then return claim(KEYS[1], KEYS[2], ARGV[2], ARGV[1], tonumber(ARGV[3])) end
redis.call('ZREM', KEYS[2], ARGV[2])
return 0
""")

# Reopens a dead batch for `retry`: undoes its counts exactly once.
# KEYS: job, done, outstanding, dead, attempts, closing. ARGV: batch, member,
# n_images, now, job id.
REOPEN_DEAD = _states("""
if redis.call('SREM', KEYS[4], ARGV[1]) == 0 then return 0 end
redis.call('SETBIT', KEYS[2], ARGV[1], 0)
redis.call('HINCRBY', KEYS[1], 'batches_done', -1)
redis.call('HINCRBY', KEYS[1], 'batches_dead', -1)
redis.call('HINCRBY', KEYS[1], 'images_error', -tonumber(ARGV[3]))
redis.call('HINCRBY', KEYS[1], 'err:dead', -tonumber(ARGV[3]))
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('HDEL', KEYS[1], 'manifest_claim', 'manifest_until', 'finished_at')
redis.call('ZREM', KEYS[6], ARGV[5])
if redis.call('HGET', KEYS[1], 'state') == '$done' then
  redis.call('HSET', KEYS[1], 'state', '$running')
end
return 1
""")
