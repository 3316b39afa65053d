"""The synthetic world and its knowledge base: generation, SQLite storage, and the kb.* tools."""

from tools.kb.builtin import register_kb_tools
from tools.kb.schema import ENTITY_TYPES, SCHEMA, FieldSpec, Value, field_names
from tools.kb.store import KnowledgeBase, build_database, default_path
from tools.kb.world import (
    DEFAULT_SEED,
    DEFAULT_SIZES,
    WORLD_VERSION,
    Entity,
    World,
    describe_entity,
    generate_world,
)

__all__ = [
    "DEFAULT_SEED",
    "DEFAULT_SIZES",
    "ENTITY_TYPES",
    "SCHEMA",
    "WORLD_VERSION",
    "Entity",
    "FieldSpec",
    "KnowledgeBase",
    "Value",
    "World",
    "build_database",
    "default_path",
    "describe_entity",
    "field_names",
    "generate_world",
    "register_kb_tools",
]
