"""Temporary re-export while modules move to :mod:`kvcache_engine.contract` (removed at the end of
this refactor; import from ``kvcache_engine.contract``)."""

from kvcache_engine.contract import *  # noqa: F403
from kvcache_engine.contract import __all__  # noqa: F401
from kvcache_engine.contract.cache import _camel, _env_overrides  # noqa: F401
