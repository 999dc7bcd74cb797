"""Client-side rate limits: run at a provider's limit without tripping 429s.

One contract, three places to keep a quota:

==========================  ==========================================================
``_contract.py``            :class:`Limiter` and :class:`Permit`, the protocols every
                            limiter implements (every feedback method a coroutine), and
                            :class:`LimiterStatistics`
``_config.py``              :class:`Limits`, the dimension table, what limits allow
                            (:func:`request_rate`, :func:`request_burst`)
``_headers.py``             :class:`RateLimitHeaders` and the header-correction rule
``_bucket.py``              the leaky bucket of one dimension, on the loop's clock
``_permit.py``              :class:`BucketPermit`, issued by the two bucket limiters
``memory.py``               :class:`RateLimiter` (this event loop) and the registry
                            (:func:`get_limiter`, :func:`quota_name`)
``redis.py`` + ``lua/``     :class:`RedisRateLimiter` (many processes, one Redis)
==========================  ==========================================================

The third limiter, :class:`~llmbatch.integrations.ray.RayQuotaLimiter`, keeps a
:class:`RateLimiter` in a Ray actor for a whole cluster.
"""

from llmbatch.errors import RequestTooLarge
from llmbatch.limits._config import Limits, refunds, request_burst, request_rate
from llmbatch.limits._contract import Limiter, LimiterStatistics, Permit
from llmbatch.limits._headers import RateLimitHeaders, parse_go_duration, parse_reset
from llmbatch.limits._permit import BucketPermit, plausible_limit, send_lag
from llmbatch.limits.memory import RateLimiter, get_limiter, key_fingerprint, quota_name
from llmbatch.limits.redis import RedisRateLimiter

__all__ = [
    "BucketPermit",
    "Limiter",
    "LimiterStatistics",
    "Limits",
    "Permit",
    "RateLimitHeaders",
    "RateLimiter",
    "RedisRateLimiter",
    "RequestTooLarge",
    "get_limiter",
    "key_fingerprint",
    "parse_go_duration",
    "parse_reset",
    "plausible_limit",
    "quota_name",
    "refunds",
    "request_burst",
    "request_rate",
    "send_lag",
]

# The names defined in the private modules say they live here, where users import them
# from (in reprs, docs and pickles: Ray sends LimiterStatistics between processes).
for _name in __all__:
    _member = globals()[_name]
    if getattr(_member, "__module__", "").startswith("llmbatch.limits._"):
        _member.__module__ = __name__
del _name, _member
