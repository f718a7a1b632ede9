"""Search quality and speed (`python -m bench --figures i`): recall@5 of the labelled
queries in db/demo/search_queries.json over the demo catalogue, and the latency of a search,
for the fused ranking (full text, trigrams, vectors) against words alone, in the same run on
the same database. Runs on a database of its own, so the figures do not depend on what else
a stack holds.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from activities.embeddings import LocalEmbedder
from activities.search import CatalogSearch
from activities.shop_db import PostgresShopDb
from bench.orders import Report, Row, percentile, ratio

QUERIES_FILE = Path(__file__).resolve().parent.parent / "db/demo/search_queries.json"
TOP = 5


def labelled_queries() -> list[dict[str, Any]]:
    return json.loads(QUERIES_FILE.read_text(encoding="utf-8"))


@dataclass
class Recall:
    recall: float
    seconds: list[float] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)


async def recall_at(
    search: CatalogSearch, queries: list[dict[str, Any]], k: int = TOP, by_meaning: bool = True
) -> Recall:
    """The share of queries with an expected product (by name prefix) in the first k."""
    hits, seconds, misses = 0, [], []
    for q in queries:
        started = time.perf_counter()
        found = await search.search(q["query"], limit=k, by_meaning=by_meaning)
        seconds.append(time.perf_counter() - started)
        names = [p["name"] for p in found]
        if any(n.startswith(e) for e in q["expected"] for n in names):
            hits += 1
        else:
            misses.append(f"{q['query']!r} -> {names}")
    return Recall(hits / len(queries), seconds, misses)


async def search_figures(database_url: str, report: Report) -> None:
    name = f"bench_search_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        from workers.stack import apply_migrations, load_demo_catalog

        dsn = _database(database_url, name)
        await apply_migrations(dsn)
        await load_demo_catalog(dsn)
        db = await PostgresShopDb.connect(dsn, max_size=2)
        try:
            search = CatalogSearch(db, LocalEmbedder(), stars_per_unit=50)
            await search.refresh()
            queries = labelled_queries()
            await recall_at(search, queries[:3])  # warm the model and the plans
            words = await recall_at(search, queries, by_meaning=False)
            fused = await recall_at(search, queries)
        finally:
            await db.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    report.add(
        "i",
        Row(
            f"i. search recall@{TOP} ({len(queries)} labelled queries, ru + en)",
            f"{fused.recall:.2f}",
            f"{words.recall:.2f} (words alone)",
            ratio(fused.recall, words.recall),
            ">= 0.9",
            "ok" if fused.recall >= 0.9 else "MISSED",
        ),
    )
    report.add(
        "i",
        Row(
            "i. search latency p50 / p99 (query embedding included)",
            f"{percentile(fused.seconds, 50) * 1000:.1f} / "
            f"{percentile(fused.seconds, 99) * 1000:.1f} ms",
            f"{percentile(words.seconds, 50) * 1000:.1f} / "
            f"{percentile(words.seconds, 99) * 1000:.1f} ms",
        ),
    )


def _database(dsn: str, name: str) -> str:
    """The same server's other database (the dsn names /<db>?...)."""
    head, _, tail = dsn.partition("?")
    return head.rsplit("/", 1)[0] + f"/{name}" + (f"?{tail}" if tail else "")
