"""The knowledge base on disk: the generated world as an SQLite file, and queries over it.

Tables: `meta` (version, seed, digest), `entities` (name, type, canonical description),
`attributes` (entity, field, kind, value; values keep their SQLite type), and `entity_search`,
an FTS5 index over names and descriptions when SQLite has FTS5 (otherwise search scans the
descriptions in Python, which is fast enough for a few thousand entities).

The file is built on first use, atomically (a temporary file renamed into place), so that
concurrent first uses cannot see half a database. A file built by another world version or
seed is rebuilt; a file that is not a knowledge base at all is never overwritten.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

from tools.errors import ToolError, UnknownEntity, UnknownField, WorldError
from tools.kb.schema import SCHEMA, Value, field_names, resolve_field
from tools.kb.world import DEFAULT_SEED, WORLD_VERSION, World, close_names, generate_world

logger = logging.getLogger(__name__)

MAX_HITS = 50
# Words that carry no meaning in a search over entity descriptions.
_STOPWORD_LINES = (
    "a an and are as at by did does for from has have how in is it its many much of on or",
    "than that the their there to was were what when where which who whom whose with",
)
STOPWORDS = frozenset(word for line in _STOPWORD_LINES for word in line.split())

_TABLES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entities (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE COLLATE NOCASE,
    type TEXT NOT NULL,
    description TEXT NOT NULL
);
CREATE TABLE attributes (
    entity_id INTEGER NOT NULL REFERENCES entities(id),
    field TEXT NOT NULL,
    kind TEXT NOT NULL,
    value,  -- no declared type: every value keeps its own (integer, real, text)
    PRIMARY KEY (entity_id, field)
) WITHOUT ROWID;
-- Reverse look-ups ("which companies have their headquarters in X?").
CREATE INDEX attributes_by_value ON attributes (field, value);
"""
_FTS = """
CREATE VIRTUAL TABLE entity_search USING fts5(name, type, description, tokenize = 'porter unicode61');
INSERT INTO entity_search (rowid, name, type, description) SELECT id, name, type, description FROM entities;
"""


def default_path(seed: int = DEFAULT_SEED) -> Path:
    """Where the database for `seed` is cached: $XDG_CACHE_HOME/compound (or ~/.cache/compound)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "compound" / f"kb-v{WORLD_VERSION}-seed{seed}.sqlite"


def fts5_available() -> bool:
    """Whether this SQLite build has the FTS5 full-text extension."""
    with closing(sqlite3.connect(":memory:")) as db:
        try:
            db.execute("CREATE VIRTUAL TABLE probe USING fts5(text)")
        except sqlite3.OperationalError:
            return False
    return True


def build_database(path: str | Path, world: World, *, fts: bool | None = None) -> Path:
    """Write `world` to an SQLite file at `path` (replacing it atomically); return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    use_fts = fts5_available() if fts is None else fts
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with closing(sqlite3.connect(temporary)) as db:
            _fill(db, world, use_fts=use_fts)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    logger.info("built knowledge base %s (%d entities, seed %d)", target, len(world), world.seed)
    return target


def _fill(db: sqlite3.Connection, world: World, *, use_fts: bool) -> None:
    db.executescript(_TABLES)
    meta = {
        "version": WORLD_VERSION,
        "seed": world.seed,
        "digest": world.digest(),
        "entities": len(world),
        "fts": int(use_fts),
    }
    db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
    db.executemany(
        "INSERT INTO entities VALUES (?, ?, ?, ?)",
        [(i, e.name, e.type, world.describe(e.name)) for i, e in enumerate(world.entities, 1)],
    )
    kinds = {(t, s.name): s.kind for t, specs in SCHEMA.items() for s in specs}
    db.executemany(
        "INSERT INTO attributes VALUES (?, ?, ?, ?)",
        [
            (i, field, kinds[e.type, field], value)
            for i, e in enumerate(world.entities, 1)
            for field, value in e.fields.items()
        ],
    )
    if use_fts:
        db.executescript(_FTS)
    db.commit()


def read_meta(path: str | Path) -> dict[str, str] | None:
    """The `meta` table of a knowledge-base file; None if the file is not one."""
    try:
        with closing(sqlite3.connect(_read_only_uri(Path(path)), uri=True)) as db:
            return dict(db.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError:
        return None


def _read_only_uri(path: Path) -> str:
    return f"{path.resolve().as_uri()}?mode=ro"


class KnowledgeBase:
    """Read access to the knowledge-base file for `seed`, built on first use.

    Each query opens its own read-only connection: tools run in worker threads, and SQLite
    connections must not cross threads.
    """

    def __init__(self, path: str | Path | None = None, *, seed: int = DEFAULT_SEED) -> None:
        self.path = Path(path) if path is not None else default_path(seed)
        self.seed = seed
        self._lock = threading.Lock()
        self._names: list[str] | None = None
        self._fts = False

    def ensure(self) -> None:
        """Build the database unless a current one for this seed exists; load the name list."""
        with self._lock:
            if self._names is not None:
                return
            meta = self._current_meta()
            with closing(self._connect()) as db:
                self._names = [n for (n,) in db.execute("SELECT name FROM entities ORDER BY id")]
            self._fts = meta.get("fts") == "1"

    def _current_meta(self) -> dict[str, str]:
        if self.path.exists():
            meta = read_meta(self.path)
            if meta is None:
                raise WorldError(f"{self.path} exists but is not a knowledge-base database")
            if meta.get("version") == str(WORLD_VERSION) and meta.get("seed") == str(self.seed):
                return meta
        build_database(self.path, generate_world(self.seed))
        return read_meta(self.path) or {}

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(_read_only_uri(self.path), uri=True)

    def names(self) -> list[str]:
        """Every entity name, in generation order."""
        self.ensure()
        return list(self._names or ())

    def lookup(self, entity: str, field: str) -> Value:
        """The value of `field` of `entity` (see World.lookup for the accepted field spellings)."""
        name, entity_type, entity_id = self._entity(entity)
        if field.strip().lower() == "type":
            return entity_type
        spec = resolve_field(entity_type, field)
        if spec is None:
            valid = (*field_names(entity_type), "type")
            raise UnknownField(name, entity_type, field, valid=valid)
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT kind, value FROM attributes WHERE entity_id = ? AND field = ?",
                (entity_id, spec.name),
            ).fetchone()
        kind, value = row
        return bool(value) if kind == "bool" else value

    def record(self, entity: str) -> dict[str, Value]:
        """Every field of `entity` with its value, in schema order."""
        _, _, entity_id = self._entity(entity)
        with closing(self._connect()) as db:
            return self._fields(db, entity_id)

    def describe(self, entity: str) -> str:
        """The canonical plain-text description of `entity`."""
        _, _, entity_id = self._entity(entity)
        with closing(self._connect()) as db:
            (text,) = db.execute(
                "SELECT description FROM entities WHERE id = ?", (entity_id,)
            ).fetchone()
        return text

    def search(self, query: str, *, limit: int = 5) -> list[dict[str, Any]]:
        """Entities matching the words of `query`, best first: entity, type, snippet, fields."""
        self.ensure()
        words = search_words(query)
        if not words:
            return []
        limit = max(1, min(limit, MAX_HITS))
        with closing(self._connect()) as db:
            ranked = _fts_search(db, words, limit) if self._fts else _scan_search(db, words, limit)
            return [
                {"entity": name, "type": kind, "snippet": snippet, "fields": self._fields(db, i)}
                for i, name, kind, snippet in ranked
            ]

    def _entity(self, entity: str) -> tuple[str, str, int]:
        self.ensure()
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT name, type, id FROM entities WHERE name = ?", (entity.strip(),)
            ).fetchone()
        if row is None:
            raise UnknownEntity(entity, suggestions=close_names(entity, self._names or []))
        return row

    @staticmethod
    def _fields(db: sqlite3.Connection, entity_id: int) -> dict[str, Value]:
        rows = db.execute(
            "SELECT a.field, a.kind, a.value, e.type FROM attributes a "
            "JOIN entities e ON e.id = a.entity_id WHERE a.entity_id = ?",
            (entity_id,),
        ).fetchall()
        values = {f: (bool(v) if kind == "bool" else v) for f, kind, v, _ in rows}
        order = field_names(rows[0][3]) if rows else ()
        return {f: values[f] for f in order}


def search_words(query: str) -> list[str]:
    """The searchable words of a query: lower-case letters and digits, without stopwords."""
    words = re.findall(r"[a-z0-9]+", query.lower())
    return list(dict.fromkeys(w for w in words if w not in STOPWORDS))


def _fts_search(
    db: sqlite3.Connection, words: list[str], limit: int
) -> list[tuple[int, str, str, str]]:
    # Any word may match; bm25 weighs a hit in the name far above one in a description, so the
    # entity a query names comes before the entities whose descriptions mention it.
    match = " OR ".join(f'"{w}"' for w in words)
    try:
        return db.execute(
            "SELECT s.rowid, e.name, e.type, snippet(entity_search, 2, '', '', '…', 16) "
            "FROM entity_search s JOIN entities e ON e.id = s.rowid "
            "WHERE entity_search MATCH ? "
            "ORDER BY bm25(entity_search, 20.0, 2.0, 1.0), e.id LIMIT ?",
            (match, limit),
        ).fetchall()
    except sqlite3.OperationalError as e:
        raise ToolError(f"search failed: {e}") from e


def _scan_search(
    db: sqlite3.Connection, words: list[str], limit: int
) -> list[tuple[int, str, str, str]]:
    scored = []
    for entity_id, name, kind, description in db.execute(
        "SELECT id, name, type, description FROM entities ORDER BY id"
    ):
        text = set(re.findall(r"[a-z0-9]+", description.lower()))
        score = sum(10 if w == name.lower() else 1 for w in words if w in text)
        score += sum(2 for w in words if w == kind)
        if score:
            scored.append((-score, entity_id, name, kind, _first_sentence(description, words)))
    scored.sort()
    return [(i, name, kind, snippet) for _, i, name, kind, snippet in scored[:limit]]


def _first_sentence(description: str, words: list[str]) -> str:
    sentences = description.split(". ")
    for sentence in sentences:
        if set(re.findall(r"[a-z0-9]+", sentence.lower())) & set(words):
            return sentence.rstrip(".") + "."
    return sentences[0]
