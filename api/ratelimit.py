"""Order creation limited per client address (ORDER_RATE_LIMIT) or per Telegram user.

The address is the connection's peer as uvicorn reports it. Behind a reverse proxy, uvicorn
itself replaces it with the forwarded one, and only for proxies listed in
FORWARDED_ALLOW_IPS (workers/api.py): a header a client wrote is never believed here.
An IPv6 client is its /64, since one host commonly holds a whole /64 and picks addresses in
it at will. Counts live in this process's memory, so each API process limits on its own.
"""

from __future__ import annotations

import ipaddress
import math
import time

from fastapi import Request
from limits import RateLimitItem
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from api.errors import ApiError


def client_address(request: Request) -> str:
    """Who a request counts as, for the order rate and the stream caps."""
    return client_group(request.client.host if request.client else "")


def client_group(host: str) -> str:
    """An IPv4 address as itself (also when written as IPv4-mapped IPv6), an IPv6 address as
    its /64."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host or "unknown"  # not an IP address: a Unix socket's peer, say
    if address.version == 4:
        return str(address)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


class OrderRateLimit:
    """Orders per client: per address for the video studio (ORDER_RATE_LIMIT), per Telegram
    user for the shop (SHOP_ORDER_RATE_LIMIT, never per address: buyers share addresses
    behind mobile NAT)."""

    def __init__(self, items: list[RateLimitItem], who: str = "your address") -> None:
        self._items = items
        self._who = who
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self.rejected_total = 0

    async def hit(self, address: str) -> None:
        """Counts one order from the client, or raises 429 with an honest Retry-After."""
        # Tested first and counted after, so that a refused request uses up no window.
        waits = [await self._wait(item, address) for item in self._items]
        if not any(waits):
            for item in self._items:
                if not await self._limiter.hit(item, "orders", address):
                    # Another request from the address took the last place meanwhile.
                    waits.append(await self._wait(item, address))
                    break
            else:
                return
        self.rejected_total += 1
        retry_after = max(waits)
        raise ApiError(
            429,
            "rate_limited",
            f"Too many orders from {self._who}: please try again in {retry_after} seconds.",
            headers={"Retry-After": str(retry_after)},
        )

    async def _wait(self, item: RateLimitItem, address: str) -> int:
        """Whole seconds until the address may order again under this limit; 0 if now."""
        if await self._limiter.test(item, "orders", address):
            return 0
        stats = await self._limiter.get_window_stats(item, "orders", address)
        # The window frees a place when its oldest order leaves it.
        return max(1, math.ceil(stats.reset_time - time.time()))


async def check_order_rate(request: Request) -> None:
    await request.app.state.order_rate.hit(client_address(request))
