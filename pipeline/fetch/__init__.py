"""Polite HTTP fetching: robots.txt, opt-outs, private-address guard, retries, size caps."""
from pipeline.fetch.http import STATUS_CLASSES, FetchResult, Fetcher, is_opted_out, parse_retry_after
from pipeline.fetch.netguard import GuardedResolver, PrivateAddressError, check_literal_host, is_public_ip
from pipeline.fetch.robots import RobotsCache, RobotsRules, rules_from_response

__all__ = [
    "STATUS_CLASSES",
    "FetchResult",
    "Fetcher",
    "GuardedResolver",
    "PrivateAddressError",
    "RobotsCache",
    "RobotsRules",
    "check_literal_host",
    "is_opted_out",
    "is_public_ip",
    "parse_retry_after",
    "rules_from_response",
]
