"""Storage adapters: the durable record (SQLite, Redis) and the in-memory kNN index (FAISS)."""
