"""The knowledge-base tools `kb.lookup`, `kb.search` and `kb.describe`, over one KnowledgeBase."""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta

from tools.kb.schema import Value
from tools.kb.store import MAX_HITS, KnowledgeBase
from tools.registry import ToolRegistry

SearchLimit = Annotated[int, Meta(ge=1, le=MAX_HITS)]


def register_kb_tools(registry: ToolRegistry, kb: KnowledgeBase) -> None:
    """Register kb.lookup, kb.search and kb.describe answering from `kb`."""

    def lookup(entity: str, field: str) -> Value:
        """Look up one field of an entity of the knowledge base.

        Entities are countries, cities, mountains, rivers, companies and people; an unknown
        name or field fails with the closest names or the entity's valid fields.

        Args:
            entity: the entity's exact name (case does not matter), e.g. "Zarnoth".
            field: the field, e.g. "population", "area_km2" (or "area"), "headquarters", "type".
        """
        return kb.lookup(entity, field)

    def search(query: str, limit: SearchLimit = 5) -> dict[str, Any]:
        """Search the knowledge base by words; returns {"hits": [{entity, type, snippet, fields}]}.

        Args:
            query: free text; entity names in it rank their entities first.
            limit: the most hits to return.
        """
        return {"hits": kb.search(query, limit=limit)}

    def describe(entity: str) -> str:
        """Describe an entity of the knowledge base in plain sentences, one per field.

        Args:
            entity: the entity's exact name (case does not matter).
        """
        return kb.describe(entity)

    registry.register("kb.lookup", lookup)
    registry.register("kb.search", search)
    registry.register("kb.describe", describe)
