"""Product search for the assistant's `search_products` tool: the query's vector and words
go to the `search_products` SQL function, which fuses full text, trigrams and pgvector.

Before each search, products whose text changed since they were embedded (or that another
model embedded) are embedded again, a bounded batch at a time and within a time budget, so
an edit to the catalog is searchable by meaning at the next question. Neither that nor the
query's own embedding may hold up a customer: each has a budget of its own, well inside the
tool's timeout, past which the search goes on by words alone.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from activities.embeddings import Embedder
from activities.shop_db import ShopDb

log = logging.getLogger(__name__)

REFRESH_BATCH = 32
# Products embedded before one search at most; the next search goes on with the rest.
REFRESH_AT_MOST = 512
# Time a search gives the catalog's embedding (what is stored stays; the next search goes
# on), and the query's own embedding.
REFRESH_BUDGET_SECONDS = 4.0
QUERY_EMBED_SECONDS = 5.0


class CatalogSearch:
    def __init__(self, db: ShopDb, embedder: Embedder, stars_per_unit: float) -> None:
        self._db = db
        self._embedder = embedder
        self._stars_per_unit = stars_per_unit

    @property
    def model(self) -> str:
        return self._embedder.model

    async def refresh(self, at_most: int = REFRESH_AT_MOST) -> int:
        """Embeds products that need it, a batch at a time, up to `at_most`; returns how
        many were stored."""
        stored = 0
        for _ in range(max(1, at_most // REFRESH_BATCH)):
            todo = await self._db.rpc(
                "products_to_embed", {"p_model": self._embedder.model, "p_limit": REFRESH_BATCH}
            )
            if not todo:
                break
            vectors = await self._embedder.embed_documents([p["text"] for p in todo])
            for product, vector in zip(todo, vectors, strict=True):
                result = await self._db.rpc(
                    "set_product_embedding",
                    {
                        "p_product_id": product["id"],
                        "p_model": self._embedder.model,
                        "p_text_hash": product["text_hash"],
                        "p_embedding": vector,
                    },
                )
                stored += bool(result and result.get("stored"))
            if len(todo) < REFRESH_BATCH:
                break
        return stored

    async def search(
        self, query: str, limit: int = 5, *, by_meaning: bool = True
    ) -> list[dict[str, Any]]:
        """Active products best first (the catalog's shape plus `score`)."""
        vector = None
        if by_meaning:
            try:
                async with asyncio.timeout(REFRESH_BUDGET_SECONDS):
                    await self.refresh()
            except Exception as err:  # a product that fails to embed never stops a search
                log.warning("embedding the catalog deferred: %r", err)
            try:
                async with asyncio.timeout(QUERY_EMBED_SECONDS):
                    [vector] = await self._embedder.embed_queries([query])
            except Exception as err:
                # The words still find most things: a customer gets an answer now rather
                # than a search that waits for the embedding model to come back.
                log.warning("searching by words alone: embedding failed: %r", err)
                vector = None
        return await self._db.rpc(
            "search_products",
            {
                "p_query": query,
                "p_embedding": vector,
                "p_model": self._embedder.model,
                "p_limit": limit,
                "p_stars_per_unit": self._stars_per_unit,
            },
        )
